"""The cross entropy of one chunk of logits, turned into its gradient in place: one Triton program per row.

Each program reads its row twice: once for the running maximum and sum of exponentials (the log-sum-exp), once to
write ``(softmax - one_hot(target)) * scale`` over the logits. The second read finds the row in L2, so the chunk
crosses memory about once each way. Inductor, given the same arithmetic in PyTorch, makes two kernels that each
stream the whole chunk (it will not fuse a reduction with a write over the tensor it reduces).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # columns a program holds at once: 8 steps over a 32K vocabulary


@triton.jit
def _cross_entropy_grad_rows(logits, row_stride, labels, scale, token_loss, vocab, ignore_index,
                             BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    logits += row * row_stride
    label = tl.load(labels + row)
    valid = label != ignore_index
    running_max = tl.full([], -float("inf"), tl.float32)
    running_sum = tl.full([], 0.0, tl.float32)
    for start in range(0, vocab, BLOCK):
        columns = start + tl.arange(0, BLOCK)
        x = tl.load(logits + columns, mask=columns < vocab, other=-float("inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, 0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), 0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    target = tl.where(valid, label, 0)
    # read before the row is overwritten; a label outside the vocabulary reads nothing and makes the loss NaN (a
    # check on the host would wait for the GPU)
    in_vocab = (target >= 0) & (target < vocab)
    target_logit = tl.load(logits + target, mask=in_vocab, other=float("nan")).to(tl.float32)
    tl.store(token_loss + row, tl.where(valid, lse - target_logit, 0.0))
    coefficient = tl.where(valid, tl.load(scale).to(tl.float32), 0.0)
    for start in range(0, vocab, BLOCK):
        columns = start + tl.arange(0, BLOCK)
        inside = columns < vocab
        x = tl.load(logits + columns, mask=inside, other=0.0).to(tl.float32)
        grad = (tl.exp(x - lse) - (columns == target).to(tl.float32)) * coefficient
        tl.store(logits + columns, grad.to(logits.dtype.element_ty), mask=inside)


def cross_entropy_grad_(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """As ``linear_cross_entropy.cross_entropy_grad_``, on a CUDA chunk: [rows, vocab] with unit column stride. A
    label outside the vocabulary (and not ``ignore_index``) gives a NaN loss, where the eager version raises."""
    rows, vocab = logits.shape
    token_loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    _cross_entropy_grad_rows[(rows,)](logits, logits.stride(0), labels, scale, token_loss, vocab, ignore_index,
                                      BLOCK=BLOCK, num_warps=16)
    return token_loss.sum()
