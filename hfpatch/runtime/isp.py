"""ISP (Intern Sequence Parallel) attention: the functions patched models call.

Activations arrive sharded along the sequence (each rank of the TENSOR group holds a
contiguous slice). An all-to-all turns ``[S/sp, H, D]`` into ``[S, H/sp, D]``, every
rank runs attention for its heads over the full sequence with the GLOBAL
cu_seqlens, and the inverse all-to-all restores the sequence sharding. With sp == 1
(or no runtime) there is no communication at all. With ``$HFPATCH_ISP_OVERLAP=N`` the packed path
takes the heads in N groups and overlaps each group's exchanges with another group's attention.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .attention import dense_attention, varlen_attention
from .attention_op import traced_varlen_attention
from .context import ParallelMode, gpc

# head groups whose all-to-alls overlap attention compute (1 = one exchange of all heads)
OVERLAP_ENV = "HFPATCH_ISP_OVERLAP"


def _all_to_all(x: torch.Tensor, group, world: int, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    shape = list(x.shape)
    shape[scatter_dim : scatter_dim + 1] = [world, shape[scatter_dim] // world]
    # Piece i (of the scattered dim) goes to rank i.
    send = x.reshape(shape).movedim(scatter_dim, 0).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv[i] came from rank i, whose slice comes i-th along the gathered dim.
    recv = recv.movedim(0, gather_dim)
    out_shape = list(recv.shape)
    out_shape[gather_dim : gather_dim + 2] = [world * out_shape[gather_dim + 1]]
    return recv.reshape(out_shape)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, world, scatter_dim, gather_dim):
        ctx.args = (group, world, gather_dim, scatter_dim)
        return _all_to_all(x, group, world, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        # The inverse exchange routes every gradient back to the rank it came from.
        return _all_to_all(grad, *ctx.args), None, None, None, None


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group=None) -> torch.Tensor:
    """Differentiable all-to-all: split ``scatter_dim`` across ranks, concatenate
    ``gather_dim`` in rank order. ``group`` defaults to the TENSOR (ISP) group."""
    if group is None:
        group = gpc.get_group(ParallelMode.TENSOR)
    world = 1 if group is None else dist.get_world_size(group)
    if world == 1:
        return x
    if x.shape[scatter_dim] % world:
        raise ValueError(
            f"dim {scatter_dim} of size {x.shape[scatter_dim]} is not divisible by the "
            f"group size {world}"
        )
    return _AllToAll.apply(x, group, world, scatter_dim, gather_dim)


def _start_all_to_all(x: torch.Tensor, group, world: int, scatter_dim: int):
    """Launch ``_all_to_all`` without waiting: (receive buffer, work, finish(recv) -> result)."""
    shape = list(x.shape)
    shape[scatter_dim : scatter_dim + 1] = [world, shape[scatter_dim] // world]
    send = x.reshape(shape).movedim(scatter_dim, 0).contiguous()
    recv = torch.empty_like(send)
    return recv, dist.all_to_all_single(recv, send, group=group, async_op=True)


def _finish_all_to_all(recv: torch.Tensor, work, gather_dim: int) -> torch.Tensor:
    work.wait()
    recv = recv.movedim(0, gather_dim)
    shape = list(recv.shape)
    shape[gather_dim : gather_dim + 2] = [shape[gather_dim] * shape[gather_dim + 1]]
    return recv.reshape(shape)


class _PipelinedISPAttention(torch.autograd.Function):
    """ISP attention with its all-to-alls overlapped with compute, heads taken in ``chunks`` groups.

    Forward: the exchange (sequence -> heads) of group c+1 runs while group c's attention computes,
    and group c's output goes back (heads -> sequence) while group c+1 computes. Backward mirrors it
    with the gradients. Each group's attention keeps its own autograd graph; the result equals the
    unchunked exchange exactly (attention is per head). q ``[S_local, H, D]``, k/v ``[S_local, H_kv, D]``.
    """

    @staticmethod
    def forward(ctx, q, k, v, attend, group, sp, chunks):
        ctx.group, ctx.sp, ctx.chunks = group, sp, chunks
        heads = [t.chunk(chunks, dim=1) for t in (q, k, v)]  # contiguous groups keep GQA's q -> kv mapping
        start = lambda c: [_start_all_to_all(t[c], group, sp, 1) for t in heads]  # noqa: E731
        pending, graphs, outs = start(0), [], []
        for c in range(chunks):
            nxt = start(c + 1) if c + 1 < chunks else None
            with torch.enable_grad():
                leaves = [_finish_all_to_all(r, w, 0).detach().requires_grad_() for r, w in pending]
                out = attend(*leaves)
            graphs.append((leaves, out))
            outs.append(_start_all_to_all(out.detach(), group, sp, 0))
            pending = nxt
        ctx.graphs = graphs
        return torch.cat([_finish_all_to_all(r, w, 1) for r, w in outs], dim=1)

    @staticmethod
    def backward(ctx, grad):
        group, sp, chunks = ctx.group, ctx.sp, ctx.chunks
        grads = grad.contiguous().chunk(chunks, dim=1)
        pending, sent = _start_all_to_all(grads[0], group, sp, 1), []
        for c in range(chunks):
            nxt = _start_all_to_all(grads[c + 1], group, sp, 1) if c + 1 < chunks else None
            leaves, out = ctx.graphs[c]
            parts = torch.autograd.grad(out, leaves, _finish_all_to_all(*pending, 0))
            sent.append([_start_all_to_all(p, group, sp, 0) for p in parts])
            pending = nxt
        ctx.graphs = None
        dq, dk, dv = ([_finish_all_to_all(r, w, 1) for r, w in (s[i] for s in sent)] for i in range(3))
        return torch.cat(dq, 1), torch.cat(dk, 1), torch.cat(dv, 1), None, None, None, None


def _overlap_chunks(heads: int, kv_heads: int, sp: int) -> int:
    """Head groups for the overlapped exchange: $HFPATCH_ISP_OVERLAP (default 1 = plain exchange),
    lowered until every group splits evenly over sp for both q and kv heads."""
    chunks = int(os.environ.get(OVERLAP_ENV) or 1)
    while chunks > 1 and (heads % (chunks * sp) or kv_heads % (chunks * sp)):
        chunks -= 1
    return chunks


def _split_heads_for_sp(q, k, v, sp: int, head_dim: int):
    """Check head counts for sp and replicate kv heads when there are fewer than sp."""
    heads, kv_heads = q.shape[head_dim], k.shape[head_dim]
    if heads % sp:
        raise ValueError(
            f"query heads ({heads}) are not divisible by the sequence parallel size ({sp})"
        )
    if kv_heads % sp:
        if sp % kv_heads:
            raise ValueError(
                f"key/value heads ({kv_heads}) must divide or be a multiple of the "
                f"sequence parallel size ({sp})"
            )
        # Each rank needs the kv head its query heads use; autograd sums the replicas.
        k = k.repeat_interleave(sp // kv_heads, dim=head_dim)
        v = v.repeat_interleave(sp // kv_heads, dim=head_dim)
    return k, v


def _no_probs(return_attn_probs: bool) -> None:
    if return_attn_probs:
        raise NotImplementedError("return_attn_probs=True is not supported by hfpatch.runtime")


def _sp_group():
    sp = gpc.get_world_size(ParallelMode.TENSOR)
    return sp, gpc.get_group(ParallelMode.TENSOR)


def isp_flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = False,
    softmax_scale: float | None = None,
    attention_dropout: float = 0.0,
    return_attn_probs: bool = False,
    *,
    window_size: tuple[int, int] = (-1, -1),
    backend: str | None = None,
) -> torch.Tensor:
    """Packed attention under ISP. q ``[1, S_local, H, D]`` (or ``[S_local, H, D]``),
    k/v ``[1, S_local, H_kv, D]``; cu_seqlens are global over the full pack.

    Without ISP a ``[B, S, ...]`` input is read as one pack of B*S tokens, as
    InternEvo does; under ISP the pack must be a single row (B == 1)."""
    _no_probs(return_attn_probs)
    if torch.compiler.is_compiling():  # one rank, FA4 or the reference: the op keeps the compiled layer one graph
        out = traced_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, softmax_scale=softmax_scale,
                                      dropout_p=attention_dropout, window_size=window_size, backend=backend)
        if out is not None:
            return out
    return _isp_varlen_eager(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
                             attention_dropout, window_size, backend)


# Out of torch.compile graphs: the kernels are opaque, cu_seqlens are checked on the host, and the all-to-all is a
# collective; a compiled decoder layer runs them eagerly between graphs.
@torch.compiler.disable
def _isp_varlen_eager(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
                      attention_dropout, window_size, backend):
    sp, group = _sp_group()
    batch_shape = q.shape[:-3]
    if q.dim() == 4:
        if sp > 1 and (q.shape[0] != 1 or k.shape[0] != 1):
            raise ValueError(f"ISP packed attention expects batch size 1, got q shape {tuple(q.shape)}")
        q, k, v = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
    def attend(q, k, v):
        return varlen_attention(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            causal=causal, softmax_scale=softmax_scale, dropout_p=attention_dropout,
            window_size=window_size, backend=backend,
        )

    if sp == 1:
        out = attend(q, k, v)
    else:
        k, v = _split_heads_for_sp(q, k, v, sp, head_dim=1)
        chunks = _overlap_chunks(q.shape[1], k.shape[1], sp)
        if chunks > 1:
            out = _PipelinedISPAttention.apply(q, k, v, attend, group, sp, chunks)
        else:
            q, k, v = (all_to_all(t, scatter_dim=1, gather_dim=0, group=group) for t in (q, k, v))
            out = all_to_all(attend(q, k, v), scatter_dim=0, gather_dim=1, group=group)
    return out.reshape(*batch_shape, -1, *out.shape[1:]) if batch_shape else out


@torch.compiler.disable  # eager between a compiled layer's graphs, as _isp_varlen_eager
def isp_flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    attention_dropout: float = 0.0,
    return_attn_probs: bool = False,
    *,
    window_size: tuple[int, int] = (-1, -1),
    backend: str | None = None,
) -> torch.Tensor:
    """Batched attention under ISP: q ``[B, S_local, H, D]``, k/v ``[B, S_local, H_kv, D]``;
    every row is one sequence sharded along dim 1."""
    _no_probs(return_attn_probs)
    sp, group = _sp_group()
    if sp > 1:
        k, v = _split_heads_for_sp(q, k, v, sp, head_dim=2)
        q, k, v = (all_to_all(t, scatter_dim=2, gather_dim=1, group=group) for t in (q, k, v))
    out = dense_attention(
        q, k, v, causal=causal, softmax_scale=softmax_scale, dropout_p=attention_dropout,
        window_size=window_size, backend=backend,
    )
    if sp > 1:
        out = all_to_all(out, scatter_dim=1, gather_dim=2, group=group)
    return out
