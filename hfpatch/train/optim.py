"""AdamW and its learning-rate schedule: linear warmup, then cosine to ``final_lr``."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    # No weight decay on biases and norm weights (1-D tensors).
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": float(cfg.weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]
    # On GPU the fused kernel: one launch for every tensor instead of a chain of foreach ops per step.
    on_gpu = all(p.device.type == "cuda" for p in decay + no_decay)
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=float(cfg.lr), betas=tuple(cfg.adam_betas), eps=float(cfg.adam_eps),
        fused=True if on_gpu else None,
    )


def lr_factor(step: int, *, warmup: int, total: int, final_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (1-based)."""
    if warmup and step <= warmup:
        return step / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    ratio = cfg.final_lr / float(cfg.lr) if cfg.lr else 0.0
    warmup, total = cfg.warmup, cfg.total_steps
    # LambdaLR's counter is the number of steps already taken; the next step is counter + 1.
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda taken: lr_factor(taken + 1, warmup=warmup, total=total, final_ratio=ratio)
    )
