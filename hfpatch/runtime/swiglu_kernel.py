"""The SwiGLU MLP's elementwise halves as Triton kernels (``swiglu.SwiGLUMLP`` on a GPU), in float32 arithmetic.

Backward reads the gradient of h, the gate and up at each element and writes h, the gate's gradient and up's over
those three: no new buffer. Both kernels rebuild ``silu(gate) * up`` in the same operations, so backward's h equals
forward's bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # elements a program: 16 per thread at 8 warps, two 16-byte loads of bfloat16


@triton.jit
def _load_gate_up(gate, up, numel, BLOCK: tl.constexpr):
    """This program's offsets, their mask, and gate and up there in float32."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < numel
    g = tl.load(gate + offsets, mask=inside).to(tl.float32)
    u = tl.load(up + offsets, mask=inside).to(tl.float32)
    return offsets, inside, g, u


@triton.jit
def _swiglu_forward(gate, up, out, numel, BLOCK: tl.constexpr):
    offsets, inside, g, u = _load_gate_up(gate, up, numel, BLOCK)
    silu = g * tl.sigmoid(g)
    tl.store(out + offsets, (silu * u).to(out.dtype.element_ty), mask=inside)


@triton.jit
def _swiglu_backward(gate, up, grad, numel, BLOCK: tl.constexpr):
    offsets, inside, g, u = _load_gate_up(gate, up, numel, BLOCK)
    d = tl.load(grad + offsets, mask=inside).to(tl.float32)
    sigmoid = tl.sigmoid(g)
    silu = g * sigmoid
    tl.store(grad + offsets, (silu * u).to(grad.dtype.element_ty), mask=inside)
    tl.store(gate + offsets, (d * u * sigmoid * (1.0 + g * (1.0 - sigmoid))).to(gate.dtype.element_ty), mask=inside)
    tl.store(up + offsets, (d * silu).to(up.dtype.element_ty), mask=inside)


def _grid(*tensors: torch.Tensor) -> tuple[int]:
    if not all(t.is_contiguous() for t in tensors):
        raise ValueError("the SwiGLU kernels take contiguous tensors (matmul outputs)")
    return (triton.cdiv(tensors[0].numel(), BLOCK),)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(gate)
    _swiglu_forward[_grid(gate, up)](gate, up, out, gate.numel(), BLOCK=BLOCK, num_warps=8)
    return out


def swiglu_backward_(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor) -> None:
    """As ``swiglu.swiglu_backward_``: ``grad`` becomes h, ``gate`` and ``up`` their gradients."""
    _swiglu_backward[_grid(gate, up, grad)](gate, up, grad, gate.numel(), BLOCK=BLOCK, num_warps=8)
