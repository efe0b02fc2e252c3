"""The output projection fused into the cross entropy: logits exist one chunk of tokens at a time.

Forward projects a chunk, turns its logits into their gradient in place (the softmax in float32, minus the target's
one-hot, times the loss scale; one Triton kernel on a GPU, ``cross_entropy_kernel``) and at once forms the chunk's
share of the hidden states' and the head's gradients; backward only scales them. So no full or float32 copy of the logits is ever held,
no projection is recomputed and nothing waits on the GPU. The head's gradient accumulates in the weight's dtype over
the chunks, as liger-kernel's does by default: a float32 accumulator would be twice the head's size at the step's
memory peak.
"""

from __future__ import annotations

import torch

from .kernel_choice import kernel_choice


def cross_entropy_grad_(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The token-loss sum of ``logits`` (float32 or wider); ``logits`` becomes its gradient times ``scale``."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    valid = labels != ignore_index
    target = torch.where(valid, labels, 0)[:, None]
    token_loss = torch.where(valid, lse[:, 0] - x.gather(1, target)[:, 0], 0)
    vocab = torch.arange(x.shape[-1], device=x.device)
    grad = (torch.exp(x - lse) - (vocab == target).to(x.dtype)) * torch.where(valid, scale, 0)[:, None]
    logits.copy_(grad)
    return token_loss.sum()


def fused_loss_kernel(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str:
    """What turns each chunk's logits into their gradient for ``dtype`` hidden states on ``device``: ``triton``
    (CUDA, float32 or narrower) or ``eager``."""
    return kernel_choice(device, dtype)


def chunk_rows(tokens: int, hidden: int, vocab: int) -> int:
    """Tokens per chunk: the largest power of two whose logits are no larger than the hidden states."""
    budget = max(1, tokens * hidden // vocab)
    return max(1, min(tokens, 1 << (budget.bit_length() - 1)))


class LinearCrossEntropy(torch.autograd.Function):
    """``sum of token cross entropies of hidden @ weight.T`` times ``scale``; ``hidden`` [N, H], ``labels`` [N]."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, scale, ignore_index, chunk, overwrite_hidden):
        cross_entropy = cross_entropy_grad_
        if fused_loss_kernel(hidden.device, hidden.dtype) == "triton":
            from .cross_entropy_kernel import cross_entropy_grad_ as cross_entropy
        grad_hidden = hidden if overwrite_hidden else torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight) if weight.requires_grad else None
        logits = hidden.new_empty(min(chunk, hidden.shape[0]), weight.shape[0])
        token_sum = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            rows = hidden[start:start + chunk]
            part = torch.mm(rows, weight.t(), out=logits[:rows.shape[0]])
            token_sum += cross_entropy(part, labels[start:start + chunk], scale, ignore_index)
            if grad_weight is not None:  # before the rows' storage may take their gradient
                grad_weight.addmm_(part.t(), rows)
            torch.mm(part, weight, out=grad_hidden[start:start + chunk])
        ctx.grads = [grad_hidden, grad_weight]
        return token_sum * scale

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("the fused linear cross-entropy's gradients were used already; it runs backward once")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        # in place: these buffers are this loss's alone, and a copy at the step's memory peak would raise it
        grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight.mul_(grad_loss.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None, None, None
