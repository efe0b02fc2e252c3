"""A model family as one unit, registered by the manifest's ``family``: causal LMs, LLaVA, Flux.

Each :class:`~.base.Family` owns its model config, data, micro-batches, loss, FLOPs shape and the
options it refuses; the training loop asks the entry's family and knows none of them by name.
"""

from __future__ import annotations

from typing import Mapping

import torch

from hfpatch import zoo

from ..config import TrainConfig
from ..errors import TrainError
from .base import Family, Workload
from .causal_lm import CausalLM
from .flux import Flux
from .llava import Llava

FAMILIES: tuple[Family, ...] = (CausalLM(), Llava(), Flux())
_BY_MANIFEST = {name: family for family in FAMILIES for name in family.manifest_families}
LANGUAGE_FAMILIES = CausalLM.manifest_families

__all__ = ["FAMILIES", "LANGUAGE_FAMILIES", "CausalLM", "Family", "Flux", "Llava", "Workload", "family_of", "load_workload", "model_config",
           "resolve_entry", "trainable_models"]


def family_of(entry) -> Family | None:
    """The family that trains ``entry``, or None when the trainer has no loop for its manifest family."""
    return _BY_MANIFEST.get(entry.family)


def model_config(entry, cfg: TrainConfig, vocab_size: int | None, special_ids: Mapping[str, int | None] | None = None):
    return family_of(entry).model_config(entry, cfg, vocab_size, special_ids)


def load_workload(entry, cfg: TrainConfig, rank: int, dtype: torch.dtype) -> Workload:
    family = family_of(entry)
    family.check_supported(entry, cfg)
    return family.load(entry, cfg, rank, dtype)


def trainable_models() -> list[str]:
    return [e.name for e in zoo.load_zoo() if e.has_patch and family_of(e) is not None]


def resolve_entry(name: str) -> zoo.Entry:
    """The zoo entry ``name``, which must have a patch and a family the trainer has a loop for."""
    entry = zoo.resolve(name)
    if not entry.has_patch:
        raise TrainError(f"{entry.name} has no patch yet, so it cannot train packed/ISP; trainable models: {', '.join(trainable_models())}")
    if family_of(entry) is None:
        raise TrainError(f"{entry.name} ({entry.family}) is patched for varlen + ISP, but `hfpatch train` has no "
                         f"{entry.family} loop yet; trainable models: {', '.join(trainable_models())}")
    return entry
