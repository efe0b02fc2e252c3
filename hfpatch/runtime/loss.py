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
from torch.utils.checkpoint import checkpoint

from .context import ParallelMode, gpc
from .linear_cross_entropy import LinearCrossEntropy, chunk_rows

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
    return _divide(token_sum, num_valid_tokens)


def _divide(token_sum: torch.Tensor, num_valid_tokens: int | torch.Tensor) -> torch.Tensor:
    if torch.is_tensor(num_valid_tokens):
        num_valid_tokens = num_valid_tokens.to(token_sum.device)
    # A batch with no targets anywhere contributes 0, not NaN.
    denom = num_valid_tokens.clamp(min=1) if torch.is_tensor(num_valid_tokens) else max(int(num_valid_tokens), 1)
    return token_sum / denom


def _chunk_token_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    logits = hidden.to(weight.dtype) @ weight.t()  # Mamba hands its head float32 states
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels,
                           ignore_index=ignore_index, reduction="sum")


def chunked_causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_tokens: int = 4096,
    num_valid_tokens: int | torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """:func:`causal_lm_loss` of ``hidden_states @ lm_head_weight.T`` without ever holding all the logits.

    The output projection and cross entropy run ``chunk_tokens`` tokens at a time and are
    recomputed in backward, so the logits of one chunk (not of the whole long sequence)
    are alive at once: at 64K tokens and a 32K vocab the full fp32 logits alone are 8 GiB.
    """
    if hidden_states.shape[:-1] != labels.shape:
        raise ValueError(f"hidden_states {tuple(hidden_states.shape)} and labels {tuple(labels.shape)} do not line up")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    flat = labels.reshape(-1)
    token_sum = sum(
        checkpoint(_chunk_token_sum, hidden[i:i + chunk_tokens], lm_head_weight, flat[i:i + chunk_tokens],
                   ignore_index, use_reentrant=False)
        for i in range(0, hidden.shape[0], chunk_tokens)
    )
    if num_valid_tokens is None:
        num_valid_tokens = count_valid_tokens(labels, ignore_index=ignore_index)
    return _divide(token_sum, num_valid_tokens)


def fused_linear_causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_valid_tokens: int | torch.Tensor | None = None,
    chunk_tokens: int | None = None,
    overwrite_hidden_states: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """:func:`causal_lm_loss` of ``hidden_states @ lm_head_weight.T`` with the projection fused into the loss
    (:mod:`.linear_cross_entropy`): logits exist one chunk at a time in the compute dtype, and the gradients are
    formed in forward, so nothing is recomputed. ``chunk_tokens``: tokens per chunk, by default as many as keep a
    chunk's logits no larger than the hidden states. ``overwrite_hidden_states``: their storage takes their gradient
    (one hidden-states-sized buffer less at the step's memory peak); only for a caller that reads them no more, and
    autograd refuses the backward if anything saved them. A label outside the vocabulary (not ``ignore_index``)
    raises on the host and makes the loss NaN on a GPU.
    """
    if hidden_states.shape[:-1] != labels.shape:
        raise ValueError(f"hidden_states {tuple(hidden_states.shape)} and labels {tuple(labels.shape)} do not line up")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    own_copy = hidden.dtype != lm_head_weight.dtype  # Mamba hands its head float32 states
    hidden = hidden.to(lm_head_weight.dtype)
    if num_valid_tokens is None:
        num_valid_tokens = count_valid_tokens(labels, ignore_index=ignore_index)
    # 1 / the count, formed on the device (a fill, not a copy from the host: nothing waits on the GPU)
    one = torch.ones((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
    scale = _divide(one, num_valid_tokens)
    chunk = chunk_tokens or chunk_rows(hidden.shape[0], hidden.shape[1], lm_head_weight.shape[0])
    return LinearCrossEntropy.apply(hidden, lm_head_weight, labels.reshape(-1), scale, ignore_index, chunk,
                                    overwrite_hidden_states or own_copy)


def global_loss(loss: torch.Tensor, mode: ParallelMode = ParallelMode.GLOBAL) -> float:
    """The full loss for logging: the sum of every rank's share (no autograd)."""
    value = loss.detach().clone()
    group = gpc.get_group(mode)
    if group is not None and gpc.get_world_size(mode) > 1:
        dist.all_reduce(value, group=group)
    return float(value)
