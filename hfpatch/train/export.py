"""Export the trained weights as a plain Hugging Face checkpoint (safetensors).

The weights are gathered to full tensors (FSDP2 shards included), loaded into the
STOCK transformers (or diffusers) class for the config -- not the patched one -- and
saved with ``save_pretrained``, so the library loads the result without hfpatch
installed. The tokenizer, if the run has one, is saved beside it. Models that
transformers does not ship (first-party ports) are saved with the patched class;
loading those needs hfpatch.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from .tokenizer import TextTokenizer


StockModel = Callable[[torch.nn.Module, dict], torch.nn.Module]  # (trained model, full state dict) -> stock model


def export_hf(model: torch.nn.Module, tokenizer: TextTokenizer | None, directory: str | Path, *, rank: int,
              stock_model: StockModel) -> Path:
    """Collective (every rank gathers); rank 0 writes ``directory`` atomically. ``stock_model``: the family's
    (:func:`transformers_stock_model`, :func:`diffusers_stock_model`)."""
    directory = Path(directory)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        _write(stock_model(model, full), tokenizer, directory)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    return directory


def _unwrapped_class(model: torch.nn.Module) -> type:
    # FSDP2 swaps in a generated subclass; save the model's real class.
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def stock_class(config) -> type | None:
    """transformers' own causal-LM (or image-text-to-text: LLaVA) class for this config, or None (not shipped)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        try:
            return auto._model_mapping[type(config)]
        except KeyError:
            continue
    return None


def diffusers_stock_model(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The trained weights in diffusers' own class (FluxTransformer2DModel...), built on the meta device."""
    import diffusers

    cls = getattr(diffusers, model.config["_class_name"], None) or _unwrapped_class(model)
    with torch.device("meta"):
        stock = cls.from_config(model.config)
    stock.load_state_dict(state_dict, strict=True, assign=True)
    return stock


def transformers_stock_model(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The trained weights in transformers' own class, built on the meta device (no random init)."""
    config = copy.deepcopy(model.config)
    config.use_cache = True  # training turned the KV cache off; inference wants it
    config.dtype = next(iter(state_dict.values())).dtype
    cls = stock_class(config) or _unwrapped_class(model)
    with torch.device("meta"):
        stock = cls(config)
    stock.load_state_dict(state_dict, strict=True, assign=True)
    stock.tie_weights()
    return stock


def _write(stock: torch.nn.Module, tokenizer: TextTokenizer | None, directory: Path) -> None:
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    stock.save_pretrained(str(tmp), safe_serialization=True)
    if tokenizer is not None:  # Flux trains on precomputed text embeddings: no tokenizer
        tokenizer.save(tmp)
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(directory)
