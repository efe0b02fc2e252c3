"""InternEvo's config language: which of its keys mean what here.

A config file that sets one of InternEvo's own sections (``ckpt``, ``adam``,
``lr_scheduler``...) is read as an InternEvo config (InternEvo's ``configs/7B_sft.py``,
InternEvo-HFModels' ``examples/*/config.py``). Its keys fall in four groups, all data
below or on the settings in ``config.SETTINGS``:

- mapped: read into an hfpatch setting (``adam.lr`` -> ``lr``), declared with the setting;
- neutral: accepted at the value that matches what hfpatch does (``loss.label_smoothing=0``),
  anything else is refused in one line naming the key;
- no effect here: accepted and listed once in a single warning line;
- the ``model`` section: InternEvo's description of its own InternLM model, mapped onto
  a language model's transformers config (``num_layers`` -> ``num_hidden_layers``) and
  ignored for the other families (Flux's file carries such a section too).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

from .errors import ConfigError

# Top-level names only InternEvo configs set: one of them makes a file an InternEvo config.
MARKERS = ("ckpt", "adam", "lr_scheduler", "hybrid_zero_optimizer", "grad_scaler", "beta2_scheduler", "loss", "monitor",
           "model_type")
# Informational names: accepted silently.
INFORMATIONAL = ("model_type",)

# Keys (or whole sections) that change nothing here. Sections are listed whole when InternEvo
# has many keys there; a mapped or neutral key inside one is still read first.
NO_EFFECT = (
    # logging, alerts, profiling, kernels, numerics switches of InternEvo's own modules
    "monitor", "grad_scaler", "cudnn_deterministic", "cudnn_benchmark", "use_fp32_norm", "use_apex_adam", "metric_dtype",
    "enable_tb", "generation", "hf", "fsdp_wrap_cls", "flux", "moe",
    # optimizer internals: the ZeRO buckets and overlap switches; beta2 stays constant (c=0 checked below)
    "hybrid_zero_optimizer", "beta2_scheduler", "loss.op_type",
    # ckpt: snapshots, async uploads, the legacy load folder, InternEvo->HF conversion
    "ckpt",
    # data loading of InternEvo's own readers; evaluation (hfpatch has none)
    "data.type", "data.valid_micro_num", "data.valid_every", "data.valid_folder", "data.skip_batches",
    "data.rampup_batch_size", "data.min_length", "data.empty_cache_and_diag_interval", "data.diag_outlier_ratio",
    "data.use_shm", "data.shm_path", "data.num_worker", "data.is_multimodal", "data.image_size", "data.patch_size",
    "data.fixed_random_dataset_seqlen",
    # communication overlap / memory pools / InternEvo's FSDP switch: FSDP2 decides
    "parallel.pipeline.interleaved_overlap", "parallel.pipeline.zero_bubble", "parallel.pipeline.mode",
    "parallel.weight.overlap", "parallel.weight.memory_pool", "parallel.weight.launch_allgather_before",
    "parallel.zero1.fsdp", "parallel.fsdp", "parallel.sequence_parallel",
)
# data.type values whose meaning hfpatch follows: train_folder / tokenizer_path may name hub repos,
# which resolve through the local Hugging Face cache (any path setting does that).
HONOURED = {"data.type": ("hf", "streaming")}

# Keys accepted only where their value is what hfpatch does; (accepts(value, file names), what we do).
NEUTRAL: dict[str, tuple[Callable[[Any, Mapping[str, Any]], bool], str]] = {
    "loss.label_smoothing": (lambda v, _: v == 0, "hfpatch's loss has no label smoothing; set it to 0"),
    "lr_scheduler.init_steps": (lambda v, _: v == 0, "the schedule starts warming up at step 0; set it to 0"),
    "lr_scheduler.last_epoch": (lambda v, _: v == -1, "a resumed run restores the schedule from its checkpoint; set it to -1"),
    "lr_scheduler.total_steps": (
        lambda v, names: v == _get(names, "data.total_steps", v),
        "the schedule spans data.total_steps; make them equal (lr_scheduler.total_steps=data[\"total_steps\"])"),
    "adam.adam_beta2_c": (lambda v, _: v == 0, "beta2 stays adam.adam_beta2 (no beta2 schedule); set it to 0"),
    "beta2_scheduler.c": (lambda v, _: v == 0, "beta2 stays adam.adam_beta2 (no beta2 schedule); set it to 0"),
    "data.pack_sample_into_one": (
        lambda v, _: v is False,
        "hfpatch packs documents with attention inside each document only (use_packed_dataset); set it to False"),
}

# InternEvo's model section describes its own InternLM model. For a language model these keys
# reach the transformers config; mlp_ratio the way InternEvo's FeedForward sizes its hidden layer.
MODEL_TO_HF = {
    "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_kv_attention_heads": "num_key_value_heads",
    "vocab_size": "vocab_size",
    "max_position_embeddings": "max_position_embeddings",
    "mlp_ratio": "intermediate_size",
}
LANGUAGE_FAMILIES = ("decoder-lm", "decoder-moe", "state-space")
# InternLM model switches with no counterpart in a transformers model (its config decides them).
MODEL_NO_EFFECT = (
    "embed_split_hidden", "embed_grad_scale", "parallel_output", "apply_post_layer_norm", "norm_type",
    "layer_norm_epsilon", "use_flash_attn", "qk_interleaved", "num_chunks", "adapt_hf", "inject_info", "no_bias",
    "use_dynamic_ntk_rope", "residual_in_fp32", "dropout_selective_checkpoint", "use_scaled_init", "use_swiglu",
    "drop_rate", "attn_drop_rate", "multiple_of", "mlp_layer_fusion", "is_reward",
)
# InternEvo's FeedForward rounds int(hidden_size * mlp_ratio) up to this (4096 * 8/3 -> 11008, Llama-2-7B's).
MLP_MULTIPLE_OF = 256

IGNORED = object()  # returned by a converter for a value InternEvo itself would not use
HF_CHECKPOINTS = ("hf", "hf_model", "hf_llama")
_BACKEND = re.compile(r"^([a-z0-9]+):(.*)$", re.S)


def is_internevo(names: Mapping[str, Any]) -> bool:
    return any(name in names for name in MARKERS)


def no_effect(path: str) -> bool:
    """``path`` or its section is in NO_EFFECT."""
    return any(path == entry or path.startswith(entry + ".") for entry in NO_EFFECT)


def check_neutral(path: str, value: Any, names: Mapping[str, Any]) -> bool:
    """True if ``path`` is a neutral key (and its value fits); a value that does not fit is refused."""
    if path not in NEUTRAL:
        return False
    accepts, instead = NEUTRAL[path]
    if not accepts(value, names):
        raise ConfigError(f"{path}={value!r} is not supported: {instead}")
    return True


def intermediate_size(hidden_size: int, mlp_ratio: float) -> int:
    hidden = int(hidden_size * mlp_ratio)
    return MLP_MULTIPLE_OF * -(-hidden // MLP_MULTIPLE_OF)


def model_section(model: Mapping[str, Any], family: str) -> tuple[list[tuple[str, str, Any]], list[str]]:
    """InternEvo model keys -> ([(key as written, transformers config key, value)], keys with no effect)."""
    overrides, ignored = [], []
    language = family in LANGUAGE_FAMILIES
    for key, value in model.items():
        if key in MODEL_NO_EFFECT or (key in MODEL_TO_HF and not language):
            ignored.append(f"model.{key}")
        elif key == "mlp_ratio":
            if "hidden_size" not in model:
                raise ConfigError("model.mlp_ratio needs model.hidden_size in the same section (intermediate_size is "
                                  "hidden_size x mlp_ratio); or set model.intermediate_size")
            overrides.append((key, "intermediate_size", intermediate_size(model["hidden_size"], value)))
        else:
            overrides.append((key, MODEL_TO_HF.get(key, key), value))
    return overrides, ignored


# -- value converters (InternEvo spelling -> hfpatch's), referenced by config.SETTINGS ----------------

def dtype(value: Any, where: str) -> Any:
    """``torch.bfloat16`` & co. InternEvo's bf16 keeps float32 master weights in its optimizer: that is
    hfpatch's ``auto`` (bf16 compute over float32 weights on GPU)."""
    if not isinstance(value, str) or not value.startswith("torch."):
        return value
    spelled = {"torch.bfloat16": "auto", "torch.float32": "float32", "torch.float": "float32",
               "torch.float64": "float64", "torch.double": "float64"}
    if value in spelled:
        return spelled[value]
    if value in ("torch.float16", "torch.half"):
        raise ConfigError(f"{where}={value!r}: fp16 training needs InternEvo's loss scaler (grad_scaler), which hfpatch "
                          f"does not have; use 'torch.bfloat16'")
    raise ConfigError(f"{where}={value!r} is not supported; use 'torch.bfloat16' or 'torch.float32'")


def local_folder(value: Any, where: str) -> Any:
    """``local:DIR`` -> ``DIR``; object storage (``boto3:``, ``oss2:``, ``volc:``) is refused."""
    if not isinstance(value, str):
        return value
    match = _BACKEND.match(value)
    if match is None:
        return value
    backend, rest = match.groups()
    if backend != "local":
        raise ConfigError(f"{where}={value!r}: {backend} storage is not supported; use a local folder ('local:DIR' or DIR)")
    return rest


def save_folder(value: Any, section: Mapping[str, Any], where: str) -> Any:
    return local_folder(value, where)


def auto_resume(value: Any, section: Mapping[str, Any], where: str) -> Any:
    """True: continue from the newest checkpoint of the run, if any; False: start afresh."""
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be True or False, got {value!r}")
    return "auto" if value else "never"


def starting_weights(value: Any, section: Mapping[str, Any], where: str) -> Any:
    """``load_ckpt_info=dict(path=..., content=..., ckpt_type=...)`` -> the HF checkpoint to start from.

    HF checkpoints are taken whatever ``auto_resume`` says (a run's own checkpoint, when
    resuming, still wins). InternEvo's own checkpoint format cannot be read here; InternEvo
    itself reads ``load_ckpt_info`` only with ``auto_resume=False``, so only then is it refused.
    """
    if value is None:
        return None
    if not isinstance(value, Mapping) or "path" not in value:
        raise ConfigError(f"{where} must be dict(path=..., content=(...), ckpt_type=...), got {value!r}")
    path, kind = value["path"], value.get("ckpt_type", "internevo")
    if path is None:
        return None
    if kind in HF_CHECKPOINTS:
        return local_folder(path, f"{where}.path")
    if section.get("auto_resume", True):
        return IGNORED
    raise ConfigError(f"{where}: ckpt_type={kind!r} checkpoints cannot be loaded by hfpatch; point path at an HF "
                      f"checkpoint dir with ckpt_type='hf', or set load_ckpt_info=None to start from a random init")


def _get(names: Mapping[str, Any], dotted: str, default: Any) -> Any:
    node: Any = names
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node
