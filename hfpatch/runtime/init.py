"""InternEvo's weight initialisers: factories returning in-place init functions."""

from __future__ import annotations

import math
from typing import Callable

import torch

InitFn = Callable[[torch.Tensor], torch.Tensor]


def normal_(mean: float = 0.0, std: float = 0.02) -> InitFn:
    """``normal_(std=0.02)(tensor)`` fills ``tensor`` from N(mean, std^2) in place."""

    def initializer(tensor: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return tensor.normal_(mean, std)

    return initializer


def scaled_init_method_normal(sigma: float = 0.02, num_layers: int = 1) -> InitFn:
    """N(0, (sigma / sqrt(2 * num_layers))^2): GPT-2 style scaling for output projections."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    return normal_(0.0, sigma / math.sqrt(2.0 * num_layers))
