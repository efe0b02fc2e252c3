"""Packed attention as a torch.library op, so a compiled decoder layer stays one graph.

Eagerly nothing changes. Traced by torch.compile, a call on one rank (no ISP exchange) whose kernel is FA4 (or the
reference) becomes ``torch.ops.hfpatch.packed_attention``: opaque to the compiler, its backward registered beside it.
The layer then compiles whole: the norms, RoPE and residual adds on both sides of attention fuse in one graph, and
the residual stream's two gradients are summed inside it (before, a graph break and an eager add per layer). The op
takes no max_seqlen: it reads the boundaries' host copy (``set_packed_batch`` keeps it, so nothing waits on the GPU)
and hands the longest segments to its backward, so no number in the graph changes with the pack: nothing recompiles.
"""

from __future__ import annotations

import math

import torch

from .attention import (
    AttentionCall, _reference_varlen, _window, fa4_window, reference_varlen_backward, resolve_call, validate_pack,
)
from .context import ParallelMode, gpc

IN_GRAPH_BACKENDS = ("fa4", "reference")
# Changing either op's signature needs a new op name: inductor's on-disk cache keys a compiled graph without the
# schemas of the ops it calls, and a graph cached before the change would call the op with the old arguments.


@torch.compiler.assume_constant_result
def in_graph_backend(device: torch.device, dtype: torch.dtype, head_dim: int, dropout_p: float,
                     window: tuple[int, int], requested: str | None) -> str | None:
    """The backend a traced call runs through the op, or None (ISP, dropout, another kernel: eager, as before).
    Decided once when the graph is traced."""
    if dropout_p > 0 or gpc.get_world_size(ParallelMode.TENSOR) > 1:
        return None
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    name = resolve_call(requested, AttentionCall(device.type, capability, dtype, head_dim, False, window))
    return name if name in IN_GRAPH_BACKENDS else None


def _longest(bounds: list[int]) -> int:
    return max(b - a for a, b in zip(bounds, bounds[1:]))


@torch.library.custom_op("hfpatch::packed_attention", mutates_args=())
def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, causal: bool, softmax_scale: float, window_left: int,
                     window_right: int, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [T, H, D] -> out [T, H, Dv], and for backward: the kernel's state (FA4's LSE [H, T], else empty) and the
    longest query and key segments (a host tensor: backward reads them without waiting on the GPU)."""
    cu_q, cu_k = validate_pack(q, k, v, cu_seqlens_q, cu_seqlens_k)
    longest = torch.tensor([_longest(cu_q), _longest(cu_k)])
    window = (window_left, window_right)
    if backend != "fa4":
        return _reference_varlen(q, k, v, cu_q, cu_k, window, softmax_scale, 0.0), q.new_empty(0), longest
    from flash_attn.cute.interface import _flash_attn_fwd

    cu_seqlens_q, cu_seqlens_k = (t.to(q.device, non_blocking=True) for t in (cu_seqlens_q, cu_seqlens_k))
    left, right = fa4_window(window, causal) or (None, None)
    out, lse, *_ = _flash_attn_fwd(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                   max_seqlen_q=int(longest[0]), max_seqlen_k=int(longest[1]),
                                   softmax_scale=softmax_scale, causal=causal, window_size_left=left,
                                   window_size_right=right, return_lse=True)
    return out, lse, longest


@packed_attention.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale, window_left, window_right, backend):
    state = q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32) if backend == "fa4" else q.new_empty(0)
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2]), state, torch.empty(2, dtype=torch.int64)


@torch.library.custom_op("hfpatch::packed_attention_backward", mutates_args=())
def packed_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              out: torch.Tensor, state: torch.Tensor, longest: torch.Tensor, cu_seqlens_q: torch.Tensor,
                              cu_seqlens_k: torch.Tensor, causal: bool, softmax_scale: float, window_left: int,
                              window_right: int, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    window = (window_left, window_right)
    if backend != "fa4":
        return reference_varlen_backward(dout, q, k, v, cu_seqlens_q.tolist(), cu_seqlens_k.tolist(), window,
                                         softmax_scale)
    from flash_attn.cute.interface import _flash_attn_bwd

    cu_seqlens_q, cu_seqlens_k = (t.to(q.device, non_blocking=True) for t in (cu_seqlens_q, cu_seqlens_k))
    left, right = fa4_window(window, causal) or (None, None)
    max_q, max_k = longest.tolist()
    dq, dk, dv = _flash_attn_bwd(q, k, v, out, dout.contiguous(), state, softmax_scale, causal,
                                 window_size_left=left, window_size_right=right, cu_seqlens_q=cu_seqlens_q,
                                 cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_q, max_seqlen_k=max_k)[:3]
    return dq, dk, dv


@packed_attention_backward.register_fake
def _(dout, q, k, v, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _save(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, *ctx.settings = inputs
    ctx.save_for_backward(q, k, v, *output, cu_seqlens_q, cu_seqlens_k)


def _backward(ctx, dout, dstate, dlongest):
    grads = packed_attention_backward(dout, *ctx.saved_tensors, *ctx.settings)
    return *grads, None, None, None, None, None, None, None


packed_attention.register_autograd(_backward, setup_context=_save)


def traced_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal, softmax_scale, dropout_p, window_size,
                            backend) -> torch.Tensor | None:
    """Under torch.compile, attention of one pack q [(B,) T, H, D] through the op; None where it does not apply."""
    window = _window(window_size, causal)
    name = in_graph_backend(q.device, q.dtype, q.shape[-1], dropout_p, window, backend)
    if name is None or q.dim() not in (3, 4):
        return None
    flat = [t.reshape(-1, *t.shape[-2:]) for t in (q, k, v)]  # [B, S] rows read as one pack, as eagerly
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out, _, _ = packed_attention(*flat, cu_seqlens_q, cu_seqlens_k, causal, scale, window[0], window[1], name)
    return out.reshape(*q.shape[:-2], *out.shape[-2:])
