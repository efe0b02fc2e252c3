"""Mamba's packed selective scan: the patch's chunked parallel scan vs a token-by-token loop, side by side.

Both compute h_t = a_t h_{t-1} + b_t over [batch 1, channels, time, state] (a = 0 at document starts)
forward and backward, on the device given (CPU default, or CUDA). The loop is the recurrence the patch
used before (one step per token, as transformers' slow path does). Also checks the two agree.

    python scripts/bench_mamba_scan.py --out docs/bench/mamba_scan_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def token_loop(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    h, states = torch.zeros_like(b[:, :, 0]), []
    for t in range(a.shape[2]):
        h = a[:, :, t] * h + b[:, :, t]
        states.append(h)
    return torch.stack(states, dim=2)


def timed(fn, a, b, repeats: int) -> float:
    def once():
        x, y = a.detach().requires_grad_(), b.detach().requires_grad_()
        fn(x, y).square().sum().backward()

    once()  # warm-up
    if a.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    if a.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--channels", type=int, default=256, help="Mamba's intermediate size")
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--lengths", default="512,2048")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from hfpatch import modeling, zoo

    scan = modeling.load_patched_module(zoo.resolve("mamba")).scan_linear_recurrence
    rows = []
    for length in map(int, args.lengths.split(",")):
        g = torch.Generator().manual_seed(length)
        a = torch.rand(1, args.channels, length, args.state, generator=g)
        a[:, :, torch.rand(length, generator=g) < 1 / 350] = 0.0  # document starts, median length ~350
        b = torch.randn(1, args.channels, length, args.state, generator=g)
        a, b = a.to(args.device), b.to(args.device)
        error = (scan(a, b)[1] - token_loop(a, b)).abs().max().item()
        loop_s, scan_s = timed(token_loop, a, b, args.repeats), timed(lambda x, y: scan(x, y)[1], a, b, args.repeats)
        rows.append({"length": length, "token_loop_s": loop_s, "parallel_scan_s": scan_s, "speedup": loop_s / scan_s,
                     "max_abs_difference": error})
        print(json.dumps(rows[-1]), flush=True)
    cpu = f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu
    report = {"device": device, "torch": torch.__version__, "channels": args.channels, "state": args.state,
              "dtype": "float32", "what": "forward + backward", "rows": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
