"""Memory levers for long sequences, resolved from the settings and the ``--long-context`` preset.

The preset turns on activation checkpointing, activation offload and a tiled MLP; an option given
explicitly (file or command line) wins over the preset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import TrainConfig
from .errors import ConfigError

PRESET_TILE_TOKENS = 8192


@dataclass(frozen=True)
class MemoryLevers:
    checkpointing: bool | float  # True / False, or the fraction of decoder layers
    offload_activations: bool
    tile_mlp: int  # tokens a chunk; 0 = off
    cpu_offload: bool

    def describe(self) -> list[str]:
        parts = []
        if self.checkpointing:
            parts.append("activation checkpointing" + (f" ({self.checkpointing:g} of layers)"
                                                       if self.checkpointing is not True and self.checkpointing < 1 else ""))
        if self.offload_activations:
            parts.append("activations offloaded to host")
        if self.tile_mlp:
            parts.append(f"MLP in {self.tile_mlp}-token tiles")
        if self.cpu_offload:
            parts.append("parameters and optimizer in host memory")
        return parts


def _explicit(cfg: TrainConfig, key: str) -> bool:
    source = cfg.sources.get(key)
    return source is not None and source.origin != "default"


def resolve_levers(cfg: TrainConfig, device: torch.device) -> MemoryLevers:
    preset = bool(cfg.long_context)
    checkpointing = cfg.activation_checkpointing
    if preset and not _explicit(cfg, "model.checkpoint"):
        checkpointing = True
    offload = cfg.offload_activations if cfg.offload_activations is not None else preset
    tile = cfg.tile_mlp if cfg.tile_mlp is not None else (PRESET_TILE_TOKENS if preset else 0)
    if offload and not checkpointing:
        raise ConfigError("--offload-activations offloads the checkpointed layer inputs: it needs "
                          "--activation-checkpointing (or --long-context)")
    if cfg.cpu_offload and device.type != "cuda":
        raise ConfigError("--cpu-offload moves parameters off a GPU; this run has none (drop --cpu-offload)")
    return MemoryLevers(checkpointing, bool(offload), int(tile), bool(cfg.cpu_offload))
