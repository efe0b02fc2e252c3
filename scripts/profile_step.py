"""Where a packed training step's GPU time goes: torch profiler, kernels grouped by kind.

The bench_isp model (Llama ~1B, 16 x 2048, bf16) on --tokens-per-gpu tokens of log-normal documents
(median 350) per GPU, ISP over all launched GPUs (sp = world; world 1 = plain packing), fwd+bwd.
Kernel time per category (GEMMs, attention, NCCL, everything else) over the profiled steps, on rank 0,
plus the top kernels. Also the GPU-busy fraction of the wall time.

    torchrun --standalone --nproc-per-node 1 scripts/profile_step.py --out docs/bench/profile_sp1.json
    torchrun --standalone --nproc-per-node 4 scripts/profile_step.py --out docs/bench/profile_sp4.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import defaultdict

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench_isp import isp_run, llama_config, lognormal_docs  # noqa: E402

CATEGORIES = (
    ("nccl (ISP all-to-all)", re.compile(r"nccl", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|cudnn", re.I)),
    ("gemm", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|sm90_", re.I)),
)


def category(name: str) -> str:
    return next((label for label, pattern in CATEGORIES if pattern.search(name)), "other (elementwise, norms, loss, copies)")


def is_annotation(event) -> bool:
    """A range on the GPU timeline (record_function's, such as "Optimizer.step#AdamW.step" or "FSDP::...", and
    NCCL's "nccl:*"): it spans kernels counted on their own, so counting it too would double their time."""
    return getattr(event, "is_user_annotation", False) or event.key.startswith("nccl:")


def kernel_breakdown(prof, top: int = 15) -> dict:
    """GPU time of a profile by kernel category, and its top kernels."""
    per_category: dict[str, float] = defaultdict(float)
    kernels = []
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None)
        if device_us is None:
            device_us = event.self_cuda_time_total
        if device_us <= 0 or event.device_type != torch.autograd.DeviceType.CUDA or is_annotation(event):
            continue
        per_category[category(event.key)] += device_us
        kernels.append({"kernel": event.key[:120], "ms": device_us / 1000, "calls": event.count,
                        "category": category(event.key)})
    busy_ms = sum(per_category.values()) / 1000
    return {
        "gpu_busy_ms": busy_ms,
        "categories_ms": {k: v / 1000 for k, v in sorted(per_category.items(), key=lambda kv: -kv[1])},
        "categories_share": {k: v / 1000 / busy_ms for k, v in per_category.items()},
        "top_kernels": sorted(kernels, key=lambda k: -k["ms"])[:top],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens-per-gpu", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    from torch.profiler import ProfilerActivity, profile

    from hfpatch import modeling, runtime, zoo

    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    world = dist.get_world_size()
    runtime.initialize(sequence_parallel=world)
    cfg = llama_config(args)
    torch.manual_seed(0)
    model = modeling.model_class(zoo.resolve("llama2"))(cfg).to(torch.bfloat16).cuda().train()
    docs = lognormal_docs(args.tokens_per_gpu * world, cfg.vocab_size, seed=0)
    isp_run(model, docs, world, argparse.Namespace(warmup=2, steps=2))  # warm up (kernels, NCCL)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        seconds, _ = isp_run(model, docs, world, argparse.Namespace(warmup=1, steps=args.steps))
        wall = time.perf_counter() - started
    breakdown = kernel_breakdown(prof)
    report = {
        "card": torch.cuda.get_device_name(), "torch": torch.__version__, "world": world, "sp": world,
        "tokens_per_gpu": args.tokens_per_gpu, "profiled_steps": args.steps + 1, "seconds_per_step": seconds,
        "wall_ms_profiled": wall * 1000,
        "attention_backend": runtime.resolve_backend(None, torch.empty(1, 1, 64, dtype=torch.bfloat16, device="cuda")),
        **breakdown,
    }
    if dist.get_rank() == 0:
        print(json.dumps(report, indent=2), flush=True)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=2)
    runtime.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
