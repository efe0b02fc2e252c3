"""Attention kernel benchmark: varlen fwd+bwd TFLOP/s vs dense causal on the same total tokens.

For each available CUDA backend of hfpatch.runtime, a pack of documents (log-normal lengths,
median 350, or fixed lengths) is run through varlen attention. Dense contenders: one causal sequence
of the same total length through SDPA, and for fixed lengths the same documents as a dense batch
[documents, length] (SDPA, and flash-attn 4's dense kernel when present) -- the very same work, so
varlen / dense-batch is what the packing costs. FLOPs count only the causal work each one needs
(sum of L_i^2 for varlen and the batch, T^2 for one sequence), so TFLOP/s are comparable.

    python scripts/bench_attention.py --out docs/bench/attention.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def timed(fn, repeats=20, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / repeats


def lengths_for(total, kind, seed=0):
    if kind.startswith("fixed"):
        length = int(kind[5:])
        return [length] * (total // length)
    gen = torch.Generator().manual_seed(seed)
    out = []
    while sum(out) < total:
        out.append(int(min(max(math.exp(math.log(350) + torch.randn(1, generator=gen).item()), 16), 4096)))
    out[-1] -= sum(out) - total
    return [n for n in out if n > 0]


def dense_batch_rows(kind, lengths, q, k, v, grad, flops) -> list[dict]:
    """The documents of a fixed-length mix as a dense [documents, length] causal batch: SDPA and FA4."""
    n, length = len(lengths), lengths[0]
    heads, dim = q.shape[-2:]
    batch = [t.detach().reshape(n, length, heads, dim).contiguous().requires_grad_() for t in (q, k, v)]
    g = grad.reshape(n, length, heads, dim)
    runs = {"dense_batch_sdpa": lambda: F.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in batch), is_causal=True).backward(g.transpose(1, 2))}
    try:
        from flash_attn.cute import flash_attn_func

        def fa4():
            out = flash_attn_func(*batch, causal=True)
            (out[0] if isinstance(out, tuple) else out).backward(g)
        runs["dense_batch_fa4"] = fa4
    except ImportError:
        pass
    rows = []
    for name, fn in runs.items():
        try:
            seconds = timed(fn)
        except Exception as exc:
            rows.append({"lengths": kind, "backend": name, "error": str(exc)[:200]})
            continue
        rows.append({"lengths": kind, "backend": name, "docs": n, "tokens": n * length, "seconds": seconds,
                     "tflops": flops / seconds / 1e12})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    from hfpatch import runtime

    rows = []
    h, d, total = args.heads, args.head_dim, args.tokens
    for kind in ("lognormal350", "fixed1024", "fixed4096"):
        lengths = lengths_for(total, kind)
        cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32).cuda()
        q, k, v = (torch.randn(1, total, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        grad = torch.randn(1, total, h, d, device="cuda", dtype=torch.bfloat16)
        varlen_flops = 4 * sum(n * n for n in lengths) / 2 * h * d * 3.5
        for backend in runtime.available_backends():
            if backend in ("reference",):
                continue

            def run_varlen():
                out = runtime.varlen_attention(q[0], k[0], v[0], cu, cu, max(lengths), max(lengths), causal=True,
                                               backend=backend)
                out.backward(grad[0])
            try:
                seconds = timed(run_varlen)
            except Exception as exc:  # a backend that cannot run this shape is reported, not fatal
                rows.append({"lengths": kind, "backend": backend, "error": str(exc)[:200]})
                continue
            rows.append({"lengths": kind, "backend": backend, "docs": len(lengths), "tokens": total,
                         "seconds": seconds, "tflops": varlen_flops / seconds / 1e12})
            print(json.dumps(rows[-1]), flush=True)
        # dense causal reference on the same total tokens: [B=1, H, T, D]
        qd, kd, vd = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
        gd = grad.transpose(1, 2).contiguous()

        def run_dense():
            F.scaled_dot_product_attention(qd, kd, vd, is_causal=True).backward(gd)
        seconds = timed(run_dense)
        dense_flops = 4 * total * total / 2 * h * d * 3.5
        rows.append({"lengths": kind, "backend": "dense_causal_sdpa", "tokens": total, "seconds": seconds,
                     "tflops": dense_flops / seconds / 1e12})
        print(json.dumps(rows[-1]), flush=True)
        if kind.startswith("fixed"):
            rows.extend(dense_batch_rows(kind, lengths, q, k, v, grad, varlen_flops))
    for row in rows:
        # the same documents as a dense batch where there is one, else one dense causal sequence
        same = [r for r in rows if r["lengths"] == row["lengths"] and r["backend"].startswith("dense_batch") and "tflops" in r]
        dense = max(same, key=lambda r: r["tflops"]) if same else next(
            r for r in rows if r["lengths"] == row["lengths"] and r["backend"] == "dense_causal_sdpa")
        if "tflops" in row:
            row["fraction_of_dense"] = row["tflops"] / dense["tflops"]
            row["dense_reference"] = dense["backend"]
    report = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "heads": h, "head_dim": d,
              "rows": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
