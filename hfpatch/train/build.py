"""Build the patched model for a zoo entry (weights, dtype) and the config helpers the families share.

Every zoo model goes through the same two calls: ``modeling.model_class`` (the
patched class) and ``modeling.tiny_config`` (the manifest's tiny config), so a newly
patched zoo entry of a known family trains without trainer changes.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from hfpatch import files, modeling, zoo

from .config import TrainConfig
from .errors import ConfigError, DataError, TrainError

PARAM_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def model_class(entry: zoo.Entry) -> type:
    """The patched class; a file lock keeps concurrent ranks from materializing its cached copy at once."""
    with files.file_lock(str(entry.directory.resolve())):
        return modeling.model_class(entry)


def tiny_config(entry: zoo.Entry, **overrides):
    with files.file_lock(str(entry.directory.resolve())):
        return modeling.tiny_config(entry, **overrides)


def param_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Stored parameter dtype. 'auto' keeps float32 master weights (see compute_dtype)."""
    return torch.float32 if dtype == "auto" else PARAM_DTYPES[dtype]


def compute_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """bf16 compute over float32 weights for 'auto' on GPU, via FSDP2 mixed precision.

    Not autocast: under autocast RoPE promotes q/k back to float32, and the varlen
    kernels (flash-attn, torch varlen_attn) then refuse them.
    """
    return torch.bfloat16 if dtype == "auto" and device.type == "cuda" else None


def check_override_keys(config, overrides: Mapping[str, Any], source: str) -> None:
    known = set(config) if isinstance(config, dict) else set(config.to_dict())
    for key in overrides:
        if key not in known and not hasattr(config, key):
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f"; did you mean model.{close[0]}?" if close else ""
            raise ConfigError(f"unknown config key 'model.{key}': not a setting of the {source} config{hint}")


def checkpoint_config(entry: zoo.Entry, cfg: TrainConfig, overrides: Mapping[str, Any]):
    """The ``--model-path`` checkpoint's config with the run's ``model.*`` settings applied."""
    config = pretrained_config(entry, model_class(entry), cfg.model_path)
    check_override_keys(config, overrides, str(cfg.model_path))
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def check_checkpoint_vocab(vocab_size: int | None, model_vocab: int, label: str, path: str) -> None:
    if vocab_size is not None and vocab_size > model_vocab:
        raise DataError(f"the tokenizer has {vocab_size} tokens but the model at {path} has {label}={model_vocab}; "
                        f"use the model's own tokenizer (--tokenizer DIR)")


def pretrained_config(entry: zoo.Entry, cls: type, path: str):
    """``path``'s config read by the patched class's own config class (first-party ports too, whose
    checkpoints otherwise need trust_remote_code), with the entry's official key names mapped."""
    if not Path(path, "config.json").exists():
        raise TrainError(f"--model-path {path} is not an HF checkpoint dir (no config.json)")
    try:
        config = cls.config_class.from_pretrained(path, local_files_only=True)
        official = json.loads(Path(path, "config.json").read_text())
    except Exception as exc:
        raise TrainError(f"cannot read the config in {path}: {str(exc).splitlines()[0]}") from None
    for key, attribute in entry.checkpoint_config_keys.items():
        if key in official:
            setattr(config, attribute, official[key])
    return config


def pretrained_diffusers_config(cls: type, path: str) -> dict:
    """``path``'s diffusers config (a transformer dir such as FLUX.1-dev/transformer) as a plain dict."""
    if not Path(path, "config.json").exists():
        raise TrainError(f"--model-path {path} is not a diffusers model dir (no config.json)")
    try:
        return dict(cls.load_config(path, local_files_only=True))
    except Exception as exc:
        raise TrainError(f"cannot read the config in {path}: {str(exc).splitlines()[0]}") from None


def check_heads(config, sp: int) -> None:
    heads = getattr(config, "num_attention_heads", None)
    if heads is not None and heads % sp:
        raise ConfigError(f"num_attention_heads={heads} is not divisible by the sequence parallel size {sp} (--sp)")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if kv_heads is not None and kv_heads % sp and sp % kv_heads:
        raise ConfigError(f"num_key_value_heads={kv_heads} must divide or be a multiple of --sp {sp}")


def build_model(entry: zoo.Entry, cfg: TrainConfig, config, device: torch.device, family) -> torch.nn.Module:
    """Weights from ``model_path`` or a seeded random init (identical on every rank); ``family`` knows the
    model's library (transformers or diffusers)."""
    cls = model_class(entry)
    dtype = param_dtype(cfg.dtype, device)
    if cfg.model_path:
        try:
            with quiet_loading():
                model, info = cls.from_pretrained(cfg.model_path, local_files_only=True, output_loading_info=True,
                                                  **family.pretrained_kwargs(config, dtype))
        except Exception as exc:
            raise TrainError(f"cannot load weights from {cfg.model_path}: {str(exc).splitlines()[0]}") from None
        check_loaded_weights(info, cfg.model_path, allow_missing=cfg.allow_missing_weights)
    else:
        torch.manual_seed(cfg.seed)
        model = family.new_model(cls, config)
        if hasattr(model, "reset_parameters"):
            model.reset_parameters(cfg.init_std)
        model = model.to(dtype)
    return model.to(device).train()


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No progress bar and no load report from transformers: check_loaded_weights says what matters."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def check_loaded_weights(info: Mapping[str, Any], path: str, *, allow_missing: bool) -> None:
    """A checkpoint that leaves weights at their random init (missing), brings weights the model has no
    place for (unexpected) or of another shape (mismatched) is an error, unless explicitly allowed."""
    problems = {kind: sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(f"{kind}_keys") or ())
                for kind in ("missing", "unexpected", "mismatched")}
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if not problems:
        return
    described = "; ".join(f"{len(keys)} {kind} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                          for kind, keys in problems.items())
    if not allow_missing:
        raise TrainError(f"--model-path {path} does not match the model: {described} weights; pass "
                         f"--allow-missing-weights to train with those left at their random init")
    print(f"warning: --model-path {path}: {described} weights left at their random init (--allow-missing-weights)",
          file=sys.stderr, flush=True)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, parameters outside the input embedding) -- the latter for FLOPs."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel() if hasattr(model, "get_input_embeddings") else 0
    tied = getattr(model.config, "tie_word_embeddings", False)
    # A tied lm_head shares the embedding tensor but still does a full matmul.
    return total, total - embedding + (embedding if tied else 0)
