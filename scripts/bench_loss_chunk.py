#!/usr/bin/env python
"""The fused loss's per-chunk kernel alone, one GPU: the Triton kernel against the same arithmetic compiled and eager.

The packing benchmark's step: 16 chunks of 1,024 x 32,000 bf16 logits, each turned into its gradient in place. Per
kernel: the fastest of 5 passes over the chunks (CUDA events), the logits' bandwidth (one read and one write), and the
first chunk's loss and gradient error against float64.

    python scripts/bench_loss_chunk.py --out docs/bench/loss_chunk.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def reference(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits.double()
    lse = torch.logsumexp(x, -1, keepdim=True)
    valid = labels != -100
    target = torch.where(valid, labels, 0)[:, None]
    loss = torch.where(valid, lse[:, 0] - x.gather(1, target)[:, 0], 0).sum()
    one_hot = (torch.arange(x.shape[1], device=x.device) == target).double()
    return loss, (torch.exp(x - lse) - one_hot) * torch.where(valid, scale.double(), 0)[:, None]


def main() -> None:
    from hfpatch.runtime import cross_entropy_kernel, linear_cross_entropy

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunks", type=int, default=16)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(args.chunks, args.rows, args.vocab, device="cuda", generator=gen) * 2).to(torch.bfloat16)
    labels = torch.randint(0, args.vocab, (args.chunks, args.rows), device="cuda", generator=gen)
    labels[:, ::37] = -100
    scale = torch.tensor(1e-3, device="cuda")
    kernels = {"triton": cross_entropy_kernel.cross_entropy_grad_,
               "compiled": torch.compile(linear_cross_entropy.cross_entropy_grad_, fullgraph=True),
               "eager": linear_cross_entropy.cross_entropy_grad_}
    want_loss, want_grad = reference(logits[0], labels[0], scale)
    results = []
    for name, kernel in kernels.items():
        work = logits.clone()
        for i in range(args.chunks):  # compiles first
            kernel(work[i], labels[i], scale, -100)
        work.copy_(logits)
        loss = kernel(work[0], labels[0], scale, -100)
        passes = []
        for _ in range(5):
            work.copy_(logits)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(args.chunks):
                kernel(work[i], labels[i], scale, -100)
            end.record()
            torch.cuda.synchronize()
            passes.append(start.elapsed_time(end))
        results.append({"kernel": name, "ms": min(passes), "passes_ms": passes,
                        "gb_per_s": 2 * logits.numel() * logits.element_size() / min(passes) / 1e6,
                        "loss_rel_err": abs(float(loss) - float(want_loss)) / abs(float(want_loss)),
                        "grad_rel_err": float((work[0].double() - want_grad).norm() / want_grad.norm())})
        print(json.dumps(results[-1]), flush=True)
    report = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "config": vars(args), "results": results}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
