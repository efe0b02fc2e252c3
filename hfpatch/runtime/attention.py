"""Local (single-rank) attention over packed sequences, with pluggable kernels.

Layout is flash-attn's: q ``[T, H, D]``, k/v ``[T_k, H_kv, D]`` with T the total
tokens of the pack and ``cu_seqlens`` its int32 segment boundaries. Backends:

``fa4``           flash-attn 4 ``flash_attn.cute`` (CuTe DSL; Hopper / Blackwell, fp16/bf16, no dropout)
``flash_attn``    flash-attn 2 ``flash_attn_varlen_func`` (CUDA, fp16/bf16)
``torch_varlen``  ``torch.nn.attention.varlen.varlen_attn`` (CUDA, torch >= 2.10)
``reference``     SDPA once per segment: any device, any dtype, autograd

``auto`` (the default, or ``HFPATCH_ATTN_BACKEND``) picks the first of fa4, flash_attn,
torch_varlen that can run the call, else reference, and logs once why each one before it
was passed over (``explain_backends`` gives the same table). ``window_size=(left, right)``
follows flash-attn: query i sees keys j with i-left <= j <= i+right, -1 = unbounded,
and ``causal`` forces right = 0; q and k are aligned at the bottom right.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import math
import os
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

BACKENDS = ("fa4", "flash_attn", "torch_varlen", "reference")
AUTO_ORDER = BACKENDS[:-1]  # the kernels auto tries, fastest first; reference is the last resort
ENV_VAR = "HFPATCH_ATTN_BACKEND"
_FLASH_DTYPES = (torch.float16, torch.bfloat16)
log = logging.getLogger(__name__)


class AttentionBackendError(RuntimeError):
    """A requested attention backend cannot run here."""


# -- input validation ------------------------------------------------------------------

# The host's copy of a cu_seqlens tensor as it is now (its version): the same tensor serves every layer of a step and
# reading it back from a GPU is a sync, so it is read once, or never when set_packed_batch moved it from the host.
# A weakref, not id(), so a new tensor at a reused address is read again.
_host_copies: deque = deque(maxlen=16)


def remember_host_values(cu_seqlens: torch.Tensor, values: list[int]) -> None:
    """Record that ``cu_seqlens`` (as it is now) holds ``values``; :func:`validate_cu_seqlens` uses them."""
    try:
        _host_copies.append((weakref.ref(cu_seqlens), cu_seqlens._version, values))
    except RuntimeError:  # inference tensors have no version counter
        pass


def _host_values(cu_seqlens: torch.Tensor) -> list[int]:
    try:
        version = cu_seqlens._version
    except RuntimeError:  # inference tensors have no version counter: no caching
        return cu_seqlens.tolist()
    for ref, seen, values in _host_copies:
        if ref() is cu_seqlens and seen == version:
            return values
    values = cu_seqlens.tolist()
    remember_host_values(cu_seqlens, values)
    return values


def validate_cu_seqlens(
    cu_seqlens: torch.Tensor, total: int, max_seqlen: int | None = None, name: str = "cu_seqlens"
) -> list[int]:
    """Check ``cu_seqlens`` against a pack of ``total`` tokens; return it as a list."""
    if not torch.is_tensor(cu_seqlens):
        raise TypeError(
            f"{name} must be a torch.Tensor of dtype torch.int32, got {type(cu_seqlens).__name__}"
        )
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype torch.int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    values = _host_values(cu_seqlens)
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    lengths = [b - a for a, b in zip(values, values[1:])]
    if min(lengths) < 0:
        bad = next(i for i, n in enumerate(lengths) if n < 0)
        raise ValueError(
            f"{name} must be non-decreasing, but {name}[{bad + 1}]={values[bad + 1]} "
            f"< {name}[{bad}]={values[bad]}"
        )
    if values[-1] != total:
        raise ValueError(
            f"{name} ends at {values[-1]} but the pack has {total} tokens; cu_seqlens "
            f"must be the GLOBAL boundaries covering the whole pack"
        )
    if max_seqlen is not None and int(max_seqlen) < max(lengths):
        raise ValueError(
            f"max_seqlen={max_seqlen} for {name} is smaller than its longest segment ({max(lengths)})"
        )
    return values


def validate_pack(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None) -> tuple[list[int], list[int]]:
    """Check a packed call's q/k/v [T, H, D] against its boundaries; return them as lists."""
    _check_qkv(q, k, v, token_dims=1)
    cu_q = validate_cu_seqlens(cu_seqlens_q, q.shape[0], max_seqlen_q, "cu_seqlens_q")
    cu_k = validate_cu_seqlens(cu_seqlens_k, k.shape[0], max_seqlen_k, "cu_seqlens_k")
    if len(cu_q) != len(cu_k):
        raise ValueError(f"cu_seqlens_q has {len(cu_q)} entries but cu_seqlens_k has {len(cu_k)}")
    return cu_q, cu_k


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, token_dims: int) -> None:
    want = token_dims + 2
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != want:
            raise ValueError(f"{name} must have {want} dims, got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    h, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or h % hkv:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hkv})")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q head dim {q.shape[-1]} differs from k head dim {k.shape[-1]}")


def _window(window_size, causal: bool) -> tuple[int, int]:
    left, right = (int(x) for x in (window_size if window_size is not None else (-1, -1)))
    return left, (0 if causal else right)


# -- backend discovery -----------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _load(name: str) -> tuple[Callable | None, Callable | None, str | None]:
    """(varlen fn, dense fn or None, reason it is missing or None)."""
    try:
        if name == "flash_attn":
            mod = importlib.import_module("flash_attn")
            return mod.flash_attn_varlen_func, mod.flash_attn_func, None
        if name == "torch_varlen":
            mod = importlib.import_module("torch.nn.attention.varlen")
            return mod.varlen_attn, None, None
        if name == "fa4":
            mod = importlib.import_module("flash_attn.cute")
            return mod.flash_attn_varlen_func, None, None
    except (ImportError, AttributeError) as exc:
        return None, None, f"{type(exc).__name__}: {exc}"
    return None, None, None  # reference


@functools.lru_cache(maxsize=None)
def _parameters(fn: Callable) -> frozenset[str]:
    """Keyword names a backend function takes (signatures differ across torch releases); cached:
    this runs on every attention call."""
    return frozenset(inspect.signature(fn).parameters)


_MISSING_HINT = {
    "flash_attn": "flash-attn 2 is not importable",
    "torch_varlen": f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn (needs torch >= 2.10)",
    "fa4": "flash-attn 4 (flash_attn.cute) is not importable",
}


def backend_unavailable_reason(name: str) -> str | None:
    """Why ``name`` cannot be used in this environment, or None if it can."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)} or 'auto'")
    if name == "reference":
        return None
    reason = _load(name)[2]
    return None if reason is None else f"{_MISSING_HINT[name]} ({reason})"


def available_backends() -> list[str]:
    return [b for b in BACKENDS if backend_unavailable_reason(b) is None]


@dataclass(frozen=True)
class AttentionCall:
    """What decides which kernels can run a call: the device, its compute capability, dtype, head dim,
    dropout and window (hashable: auto's pick is cached per kind of call)."""

    device_type: str
    capability: tuple[int, int] | None  # CUDA only
    dtype: torch.dtype
    head_dim: int
    dropout: bool = False
    window: tuple[int, int] = (-1, -1)

    @classmethod
    def of(cls, q: torch.Tensor, dropout_p: float = 0.0, window: tuple[int, int] = (-1, -1)) -> "AttentionCall":
        capability = torch.cuda.get_device_capability(q.device) if q.device.type == "cuda" else None
        return cls(q.device.type, capability, q.dtype, q.shape[-1], dropout_p > 0, tuple(int(w) for w in window))


def _fa4_problem(call: AttentionCall) -> str | None:
    major, minor = call.capability
    if major not in (9, 10, 11):
        return f"flash-attn 4 is built for Hopper and Blackwell (sm90 / sm100), this GPU is sm{major}{minor}"
    if call.dropout:
        return "flash-attn 4 has no attention dropout"
    widest = 256 if major == 9 else 128
    if call.head_dim % 8 or not 8 <= call.head_dim <= widest:
        return f"flash-attn 4 on sm{major}{minor} takes head dims of 8..{widest} in steps of 8, not {call.head_dim}"
    return None


def _call_problem(name: str, call: AttentionCall) -> str | None:
    """Why backend ``name`` (importable) cannot run ``call``, or None."""
    if name == "reference":
        return None
    if call.device_type != "cuda" or call.dtype not in _FLASH_DTYPES:
        return f"it needs CUDA tensors in float16/bfloat16, got {call.device_type} {call.dtype}"
    if name == "fa4":
        return _fa4_problem(call)
    if name == "flash_attn" and call.head_dim > 256:
        return f"flash-attn 2 takes head dims up to 256, not {call.head_dim}"
    if name == "torch_varlen":
        if call.dropout:
            return "torch varlen_attn has no dropout"
        if (call.window[0] >= 0 or call.window[1] > 0) and "window_size" not in _parameters(_load(name)[0]):
            return f"torch {torch.__version__} varlen_attn has no window_size"
    return None


def _problem(name: str, call: AttentionCall) -> str | None:
    reason = backend_unavailable_reason(name)
    return reason if reason is not None else _call_problem(name, call)


def backend_problem(name: str, q: torch.Tensor, dropout_p: float = 0.0, window: tuple[int, int] = (-1, -1)) -> str | None:
    """Why backend ``name`` cannot run a call on tensors like ``q`` here, or None if it can."""
    return _problem(name, AttentionCall.of(q, dropout_p, window))


def explain_backends(q: torch.Tensor, dropout_p: float = 0.0, window: tuple[int, int] = (-1, -1)) -> list[tuple[str, str | None]]:
    """(backend, why it cannot run or None) for every backend, in auto's order of preference."""
    call = AttentionCall.of(q, dropout_p, window)
    return [(name, _problem(name, call)) for name in BACKENDS]


@functools.lru_cache(maxsize=64)
def auto_backend(call: AttentionCall) -> str:
    """auto's pick for one kind of call: the first kernel that can run it, else the reference.
    Cached (it runs on every attention call), so each kernel passed over on a GPU is logged once."""
    for name in AUTO_ORDER:
        reason = _problem(name, call)
        if reason is None:
            return name
        if call.device_type == "cuda":  # on a CPU every kernel is passed over: nothing to tell
            log.info("attention: %s passed over (%s)", name, reason)
    return "reference"


def resolve_backend(
    requested: str | None, q: torch.Tensor, dropout_p: float = 0.0, window: tuple[int, int] = (-1, -1)
) -> str:
    """The backend that will run this call: argument, else env var, else auto."""
    return resolve_call(requested, AttentionCall.of(q, dropout_p, window))


def resolve_call(requested: str | None, call: AttentionCall) -> str:
    """:func:`resolve_backend` for a described call."""
    source = "argument"
    if requested is None:
        requested, source = os.environ.get(ENV_VAR) or "auto", ENV_VAR
    requested = requested.strip().lower()
    if requested == "auto":
        return auto_backend(call)
    reason = _problem(requested, call)
    if reason is not None:
        raise AttentionBackendError(
            f"attention backend {requested!r} was requested ({source}) but cannot run: {reason}"
        )
    return requested


# -- kernels ---------------------------------------------------------------------------


def _mask(lq: int, lk: int, window: tuple[int, int], device) -> torch.Tensor | None:
    """Boolean [lq, lk] keep-mask, or None when nothing is masked."""
    left, right = window
    if left < 0 and right < 0:
        return None
    i = torch.arange(lq, device=device).unsqueeze(1) + (lk - lq)
    j = torch.arange(lk, device=device).unsqueeze(0)
    keep = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if right >= 0:
        keep &= j <= i + right
    if left >= 0:
        keep &= j >= i - left
    return keep


def _sdpa(q, k, v, window, scale, dropout_p):
    """q [B, Lq, H, D], k/v [B, Lk, Hkv, D] -> [B, Lq, H, D]."""
    lq, lk = q.shape[1], k.shape[1]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    gqa = q.shape[1] != k.shape[1]
    if lq == lk and window == (-1, 0):
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale, enable_gqa=gqa
        )
    else:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=_mask(lq, lk, window, q.device), dropout_p=dropout_p,
            scale=scale, enable_gqa=gqa,
        )
    return out.transpose(1, 2)


def _reference_varlen(q, k, v, cu_q, cu_k, window, scale, dropout_p):
    outs = []
    for (q0, q1), (k0, k1) in zip(zip(cu_q, cu_q[1:]), zip(cu_k, cu_k[1:])):
        if q1 == q0:
            continue
        if k1 == k0:  # nothing to attend to: zeros, as flash-attn returns
            outs.append(q.new_zeros(q1 - q0, q.shape[1], v.shape[2]))
            continue
        seg = _sdpa(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], window, scale, dropout_p)
        outs.append(seg[0])
    return torch.cat(outs, 0) if outs else q.new_zeros(0, q.shape[1], v.shape[2])


def reference_varlen_backward(dout, q, k, v, cu_q, cu_k, window, scale):
    """(dq, dk, dv) of :func:`_reference_varlen` (no dropout) for ``dout``, in closed form: the packed attention
    op's backward runs below autograd, where the forward cannot be differentiated again."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    rep = q.shape[1] // k.shape[1]
    for (q0, q1), (k0, k1) in zip(zip(cu_q, cu_q[1:]), zip(cu_k, cu_k[1:])):
        if q1 == q0 or k1 == k0:
            continue
        qs, do = q[q0:q1].transpose(0, 1), dout[q0:q1].transpose(0, 1)  # [H, L, D]
        ks, vs = (t[k0:k1].repeat_interleave(rep, dim=1).transpose(0, 1) for t in (k, v))
        scores = qs @ ks.transpose(1, 2) * scale
        keep = _mask(q1 - q0, k1 - k0, window, q.device)
        if keep is not None:
            scores = scores.masked_fill(~keep, float("-inf"))
        p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query with no key gets no gradient
        dp = do @ vs.transpose(1, 2)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        dq[q0:q1] = (ds @ ks * scale).transpose(0, 1)
        for grad, part in ((dk, ds.transpose(1, 2) @ qs * scale), (dv, p.transpose(1, 2) @ do)):
            grad[k0:k1] = part.transpose(0, 1).unflatten(1, (k.shape[1], rep)).sum(2)  # GQA: sum the shared heads
    return dq, dk, dv


def _repeat_kv(k, v, heads):
    rep = heads // k.shape[-2]
    if rep == 1:
        return k, v
    return k.repeat_interleave(rep, dim=-2), v.repeat_interleave(rep, dim=-2)


def _torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, window, scale):
    fn = _load("torch_varlen")[0]
    params = _parameters(fn)
    kwargs = {"scale": scale}
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = q.shape[1] != k.shape[1]
    else:
        k, v = _repeat_kv(k, v, q.shape[1])
    if "window_size" in params:
        kwargs["window_size"] = window  # torch 2.11+: causal is exactly (-1, 0)
    if "is_causal" in params:
        kwargs["is_causal"] = window == (-1, 0)
    out = fn(q, k, v, cu_q, cu_k, int(max_q), int(max_k), **kwargs)
    return out[0] if isinstance(out, tuple) else out


def fa4_window(window: tuple[int, int], causal: bool) -> tuple[int | None, int | None] | None:
    """The window as FA4 takes it ("unbounded" is None), or None when causal alone says it all."""
    if window == (-1, -1) or (causal and window[0] < 0):
        return None
    return tuple(None if w < 0 else w for w in window)


def _fa4(q, k, v, cu_q, cu_k, max_q, max_k, causal, window, scale):
    fn = _load("fa4")[0]
    params = _parameters(fn)
    kwargs = {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k, "softmax_scale": scale, "causal": causal}
    for key, value in (("max_seqlen_q", int(max_q)), ("max_seqlen_k", int(max_k))):
        if key in params:
            kwargs[key] = value
    bounds = fa4_window(window, causal)
    if bounds is not None:
        left, right = bounds
        if "window_size" in params:
            kwargs["window_size"] = (left, right)
        else:
            kwargs["window_size_left"], kwargs["window_size_right"] = left, right
    out = fn(q, k, v, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    window_size: tuple[int, int] = (-1, -1),
    backend: str | None = None,
) -> torch.Tensor:
    """Attention within each segment of a pack: q [T, H, D] -> [T, H, D]."""
    window = _window(window_size, causal)
    cu_q, cu_k = validate_pack(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    name = resolve_backend(backend, q, dropout_p, window)
    if name == "reference":
        return _reference_varlen(q, k, v, cu_q, cu_k, window, scale, dropout_p)
    # GPU kernels read the boundaries on the device; a CPU copy is a common slip.
    cu_seqlens_q = cu_seqlens_q.to(q.device, non_blocking=True)
    cu_seqlens_k = cu_seqlens_k.to(q.device, non_blocking=True)
    if name == "flash_attn":
        return _load(name)[0](
            q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
            dropout_p=dropout_p, softmax_scale=scale, causal=causal, window_size=window,
        )
    if name == "torch_varlen":
        return _torch_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window, scale)
    return _fa4(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window, scale)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    window_size: tuple[int, int] = (-1, -1),
    backend: str | None = None,
) -> torch.Tensor:
    """Batched attention, every row one sequence: q [B, S, H, D] -> [B, S, H, D]."""
    _check_qkv(q, k, v, token_dims=2)
    window = _window(window_size, causal)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    name = resolve_backend(backend, q, dropout_p, window)
    if name == "reference":
        return _sdpa(q, k, v, window, scale, dropout_p)
    if name == "flash_attn":
        return _load(name)[1](q, k, v, dropout_p=dropout_p, softmax_scale=scale, causal=causal, window_size=window)
    # Kernels without a dense entry point: the batch is a pack of equal segments.
    b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
    cu_q = torch.arange(0, (b + 1) * sq, sq, dtype=torch.int32, device=q.device)
    cu_k = cu_q if sk == sq else torch.arange(0, (b + 1) * sk, sk, dtype=torch.int32, device=q.device)
    out = varlen_attention(
        q.reshape(b * sq, *q.shape[2:]), k.reshape(b * sk, *k.shape[2:]), v.reshape(b * sk, *v.shape[2:]),
        cu_q, cu_k, sq, sk, causal=causal, softmax_scale=scale, dropout_p=dropout_p,
        window_size=window, backend=name,
    )
    return out.reshape(b, sq, *out.shape[1:])
