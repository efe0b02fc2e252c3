#!/usr/bin/env python
"""The output projection + cross entropy alone, one GPU: hfpatch's fused loss against liger-kernel's.

The packing benchmark's head (16,384 tokens, hidden 2048, vocab 32,000, bf16) forward and backward, per contender:
milliseconds a call (CUDA events, after warm-up), the memory it adds at its peak over its inputs (the gradients it
returns included), and its error
against float32 logits (loss, the hidden states' and the head's gradients, relative L2).

    python scripts/bench_fused_loss.py --out docs/bench/fused_loss.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def contenders() -> dict:
    from hfpatch import runtime

    found = {"unfused_bf16_logits": lambda h, w, y, n: F.cross_entropy((h @ w.t()).float(), y, reduction="sum") / n,
             "hfpatch": lambda h, w, y, n: runtime.fused_linear_causal_lm_loss(h, w, y, num_valid_tokens=n)}
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return found
    def liger(accum):
        return lambda h, w, y, n: liger_fused_linear_cross_entropy(h, w, y, reduction="sum", accum_dtype=accum) / n

    found.update(liger=liger(None), liger_fp32_accum=liger(torch.float32))
    return found


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, generator=gen).cuda()
    weight = (torch.randn(args.vocab, args.hidden, generator=gen) * args.hidden ** -0.5).cuda()
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=gen).cuda()
    labels[::50] = -100
    n = int((labels != -100).sum())

    def run(fn, dtype):
        h, w = (t.detach().to(dtype, copy=True).requires_grad_(True) for t in (hidden, weight))
        loss = fn(h, w, labels, n)
        loss.backward()
        return loss.detach().float(), h.grad.float(), w.grad.float()

    golden = run(lambda h, w, y, n: F.cross_entropy(h @ w.t(), y, reduction="sum") / n, torch.float32)
    results = []
    for name, fn in contenders().items():
        h, w = (t.to(torch.bfloat16).requires_grad_(True) for t in (hidden, weight))
        for _ in range(3):  # compiles, and a shorter chunk's recompile, come first
            fn(h, w, labels, n).backward()
        h.grad = w.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.iters):
            h.grad = w.grad = None
            fn(h, w, labels, n).backward()
        end.record()
        torch.cuda.synchronize()
        errors = dict(zip(("loss", "d_hidden", "d_weight"),
                          (relative_error(a, b) for a, b in zip(run(fn, torch.bfloat16), golden))))
        results.append({"contender": name, "ms": start.elapsed_time(end) / args.iters,
                        "peak_over_inputs_mib": (torch.cuda.max_memory_allocated() - base) / 2**20,
                        "rel_err_vs_fp32": errors})
        print(json.dumps(results[-1]), flush=True)
    report = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "config": vars(args), "results": results}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
