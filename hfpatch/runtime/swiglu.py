"""A SwiGLU MLP, ``down(silu(x @ gate.T) * (x @ up.T))``, that keeps its input, gate and up for backward, not h.

The product ``h = silu(gate) * up`` is not kept: backward rebuilds it where the down projection's input gradient was
(each element is read before it is overwritten), and writes the gate's and up's gradients over the saved gate and
up. So backward allocates one intermediate-sized buffer (that input gradient), where autograd over the module, or
inductor over a compiled layer, keeps ``h`` from forward and allocates the gradients anew: a third less of the
MLP's memory held between forward and backward, and no new buffer at the step's memory peak (the last layer's MLP
backward). On a GPU one Triton kernel does each elementwise half (``swiglu_kernel.py``); elsewhere PyTorch's own
silu arithmetic, so float64 results equal the module's to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernel_choice import kernel_choice


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def swiglu_backward_(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor) -> None:
    """In place: ``grad`` (of h) becomes h, ``gate`` its gradient, ``up`` its gradient."""
    silu = F.silu(gate)
    grad_up = grad * silu
    grad_gate = torch.ops.aten.silu_backward(grad * up, gate)  # autograd's own formula
    grad.copy_(silu * up)
    gate.copy_(grad_gate)
    up.copy_(grad_up)


def swiglu_mlp_kernel(device: torch.device, dtype: torch.dtype) -> str:
    """What runs the elementwise halves for ``dtype`` on ``device``: ``triton`` (CUDA, float32 or narrower) or
    ``eager``."""
    return kernel_choice(device, dtype)


class SwiGLUMLP(torch.autograd.Function):
    """``x`` [..., H]; ``gate_weight`` and ``up_weight`` [I, H], ``down_weight`` [H, I]; no biases."""

    @staticmethod
    def forward(ctx, x, gate_weight, up_weight, down_weight):
        forward_kernel = swiglu
        if swiglu_mlp_kernel(x.device, x.dtype) == "triton":
            from .swiglu_kernel import swiglu as forward_kernel
        rows = x.reshape(-1, x.shape[-1])
        gate = torch.mm(rows, gate_weight.t())
        up = torch.mm(rows, up_weight.t())
        out = torch.mm(forward_kernel(gate, up), down_weight.t())
        ctx.save_for_backward(rows, gate, up, gate_weight, up_weight, down_weight)
        ctx.input_shape = x.shape
        ctx.spent = False
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.spent:
            raise RuntimeError("the SwiGLU MLP's saved projections hold their gradients now; it runs backward once")
        ctx.spent = True
        rows, gate, up, gate_weight, up_weight, down_weight = ctx.saved_tensors
        backward_kernel = swiglu_backward_
        if swiglu_mlp_kernel(rows.device, rows.dtype) == "triton":
            from .swiglu_kernel import swiglu_backward_ as backward_kernel
        grad_out = grad_out.reshape(-1, grad_out.shape[-1])
        grad_h = torch.mm(grad_out, down_weight)
        backward_kernel(gate, up, grad_h)
        h, grad_gate, grad_up = grad_h, gate, up  # the same buffers, renamed for what they now hold
        needs = ctx.needs_input_grad
        grad_x = None
        if needs[0]:
            grad_x = torch.mm(grad_gate, gate_weight).addmm_(grad_up, up_weight).view(ctx.input_shape)
        return (
            grad_x,
            torch.mm(grad_gate.t(), rows) if needs[1] else None,
            torch.mm(grad_up.t(), rows) if needs[2] else None,
            torch.mm(grad_out.t(), h) if needs[3] else None,
        )


def swiglu_mlp(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor, down_weight: torch.Tensor):
    return SwiGLUMLP.apply(x, gate_weight, up_weight, down_weight)
