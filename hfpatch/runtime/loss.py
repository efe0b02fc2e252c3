"""Token-weighted causal-LM loss that matches the single-process run under ISP/DP.

Every rank returns ``sum of its token losses / valid tokens of the whole world``.
These per-rank losses add up to the global mean, so gradients summed (not averaged)
across ranks equal the single-process gradients; :func:`apply_weight_parallel`
configures FSDP2 to sum. Labels are already shifted: ``labels[..., i]`` is the
target of position i, -100 where there is none.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .context import ParallelMode, gpc

IGNORE_INDEX = -100


def count_valid_tokens(
    labels: torch.Tensor, mode: ParallelMode = ParallelMode.GLOBAL, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Number of targets summed over the ranks of ``mode`` (a 0-d int64 tensor)."""
    count = (labels != ignore_index).sum().to(torch.int64)
    group = gpc.get_group(mode)
    if group is not None and gpc.get_world_size(mode) > 1:
        dist.all_reduce(count, group=group)
    return count


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_valid_tokens: int | torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """This rank's share of the global token-mean cross entropy.

    ``num_valid_tokens`` overrides the denominator, e.g. the count over all
    micro-batches of a gradient-accumulation step; by default it is this batch's
    count over the whole world (ISP and data-parallel ranks).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not line up")
    token_sum = F.cross_entropy(
        # half precision is upcast for the softmax; float64 stays float64
        logits.reshape(-1, logits.shape[-1]).to(torch.promote_types(logits.dtype, torch.float32)), labels.reshape(-1),
        ignore_index=ignore_index, reduction="sum",
    )
    if num_valid_tokens is None:
        num_valid_tokens = count_valid_tokens(labels, ignore_index=ignore_index)
    if torch.is_tensor(num_valid_tokens):
        num_valid_tokens = num_valid_tokens.to(token_sum.device)
    # A batch with no targets anywhere contributes 0, not NaN.
    denom = num_valid_tokens.clamp(min=1) if torch.is_tensor(num_valid_tokens) else max(int(num_valid_tokens), 1)
    return token_sum / denom


def global_loss(loss: torch.Tensor, mode: ParallelMode = ParallelMode.GLOBAL) -> float:
    """The full loss for logging: the sum of every rank's share (no autograd)."""
    value = loss.detach().clone()
    group = gpc.get_group(mode)
    if group is not None and gpc.get_world_size(mode) > 1:
        dist.all_reduce(value, group=group)
    return float(value)
