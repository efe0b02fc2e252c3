"""The matmul ceiling of the packing benchmark's model: what its GEMMs alone reach on this card.

bench_packing's Llama (16 x 2048, MLP 5632, vocab 32000) at --tokens tokens: every projection's forward
(x W^T) and backward (dY W, dY^T x) as the step runs them, bf16, timed with CUDA events. Reports each
shape's TFLOP/s, the whole step's GEMM time and the MFU a step would have if it were nothing but these GEMMs
(6 N tokens / GEMM time / 989 TFLOP/s): the bound any fusion of the rest can approach. Also the same with
q/k/v as one projection and gate/up as one, the shapes a fused-projection layer would run.

    python scripts/bench_gemm.py --out docs/bench/gemm.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from bench_attention import timed  # noqa: E402

BF16_PEAK = 989e12


def projection_ms(tokens: int, n_in: int, n_out: int, reps: int) -> dict:
    """Forward and both backward GEMMs of one Linear(n_in, n_out) over ``tokens`` tokens."""
    x = torch.randn(tokens, n_in, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(tokens, n_out, device="cuda", dtype=torch.bfloat16)
    ms = 1000 * sum(timed(fn, repeats=reps) for fn in (lambda: x @ w.t(), lambda: dy @ w, lambda: dy.t() @ x))
    flops = 6 * tokens * n_in * n_out
    return {"shape": [tokens, n_in, n_out], "ms": ms, "tflops": flops / ms / 1e9}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    t, h, i, v = args.tokens, args.hidden, args.intermediate, args.vocab
    layouts = {
        "separate": {"q/k/v/o": (4, h, h), "gate/up": (2, h, i), "down": (1, i, h)},
        "fused": {"qkv": (1, h, 3 * h), "o": (1, h, h), "gate_up": (1, h, 2 * i), "down": (1, i, h)},
    }
    n_params = args.layers * (4 * h * h + 3 * h * i) + v * h  # matmul parameters, as bench_packing counts them
    head = projection_ms(t, h, v, args.reps)
    report = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "config": vars(args), "params": n_params,
              "lm_head": head, "layouts": {}}
    for name, shapes in layouts.items():
        parts = {part: {**projection_ms(t, n_in, n_out, args.reps), "count": count}
                 for part, (count, n_in, n_out) in shapes.items()}
        step_ms = args.layers * sum(p["ms"] * p["count"] for p in parts.values()) + head["ms"]
        report["layouts"][name] = {"parts": parts, "step_gemm_ms": step_ms,
                                   "mfu_if_only_gemms": 6 * n_params * t / (step_ms / 1e3) / BF16_PEAK}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
