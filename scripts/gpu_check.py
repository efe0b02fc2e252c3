#!/usr/bin/env python
"""Numerics check of hfpatch.runtime attention on a GPU machine; writes a JSON report.

    python scripts/gpu_check.py --out docs/gpu_check.json
        every fast varlen backend present (torch varlen_attn, flash-attn 2/4) vs the
        reference per-segment SDPA path, bf16, forward + backward
    torchrun --nproc_per_node 2 scripts/gpu_check.py --out docs/gpu_check.json
        the above on rank 0, plus ISP sp=2 vs sp=1 attention and grads over NCCL
    python scripts/gpu_check.py --device cpu --out /tmp/check.json
        CPU smoke test: reference path only (gloo under torchrun)

On one GPU it also checks the rest of the default training path in bf16 against float32: the fused
linear cross-entropy (loss and gradients; a label outside the vocabulary makes its loss NaN) and a
patched Llama whose decoder layers are compiled whole (loss and gradients of a packed step).

A kernel passes when its error against an fp32 run of the reference is at most
twice the bf16 reference's own error (floor ``--atol``): "as accurate as bf16 SDPA".
Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hfpatch.runtime as rt  # noqa: E402
from hfpatch.runtime import ParallelMode, gpc  # noqa: E402

CASES = {
    # name: heads, kv_heads, causal, window
    "causal_mha": (8, 8, True, (-1, -1)),
    "causal_gqa": (8, 2, True, (-1, -1)),
    "noncausal_gqa": (8, 2, False, (-1, -1)),
    "causal_window": (8, 2, True, (128, -1)),
}
ISP_CASES = {
    "causal_mha": (8, 8, True, (-1, -1)),
    "causal_kv_lt_sp": (8, 1, True, (-1, -1)),  # kv heads replicated across ranks
}


def doc_lengths(total: int, seed: int) -> list[int]:
    """Log-normal document lengths (median ~total/12) filling ``total`` tokens, odd tail."""
    g = torch.Generator().manual_seed(seed)
    lengths, used = [], 0
    while used < total:
        n = int(torch.empty(1).log_normal_(math.log(total / 12), 0.8, generator=g).item())
        n = max(1, min(n, total - used))
        lengths.append(n)
        used += n
    lengths[-1] = max(1, lengths[-1] - 1)  # total not a multiple of the sp size
    return lengths


def make_inputs(lengths, heads, kv_heads, head_dim, seed, device):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths) + 8  # room for sequence-parallel padding
    make = lambda h: torch.randn(total, h, head_dim, generator=g).to(device)  # noqa: E731
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return make(heads), make(kv_heads), make(kv_heads), make(heads), cu, max(lengths)


def fwd_bwd(q, k, v, dout, fn, dtype):
    leaves = [t.to(dtype).clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(dout.to(dtype))
    return {"out": out.detach().float(), "dq": leaves[0].grad.float(),
            "dk": leaves[1].grad.float(), "dv": leaves[2].grad.float()}


def errors(got: torch.Tensor, ref: torch.Tensor) -> dict:
    diff = (got - ref).abs()
    return {"max_abs": diff.max().item(), "max_rel": (diff.max() / ref.abs().max().clamp_min(1e-12)).item()}


def varlen_fn(backend, cu, max_len, causal, window):
    return lambda q, k, v: rt.varlen_attention(
        q, k, v, cu, cu, max_len, max_len, causal=causal, window_size=window, backend=backend
    )


def check_backends(args, device) -> list[dict]:
    """Each usable fast backend (and the bf16 reference) against the fp32 reference."""
    candidates = [b for b in rt.available_backends() if b != "reference"] if device.type == "cuda" else []
    rows = []
    for seed, (name, (heads, kv, causal, window)) in enumerate(CASES.items()):
        lengths = doc_lengths(args.tokens, seed)
        q, k, v, dout, cu, max_len = make_inputs(lengths, heads, kv, args.head_dim, seed, device)
        total = sum(lengths)
        q, k, v, dout = q[:total], k[:total], v[:total], dout[:total]
        golden = fwd_bwd(q, k, v, dout, varlen_fn("reference", cu, max_len, causal, window), torch.float32)
        ref_lp = fwd_bwd(q, k, v, dout, varlen_fn("reference", cu, max_len, causal, window), args.dtype)
        ref_err = {t: errors(ref_lp[t], golden[t]) for t in golden}
        rows.append({"case": name, "backend": "reference", "dtype": str(args.dtype), "docs": len(lengths),
                     "tokens": total, "head_dim": args.head_dim, "vs_fp32": ref_err,
                     "passed": all(e["max_rel"] <= args.ref_rtol for e in ref_err.values())})
        for backend in candidates:
            row = {"case": name, "backend": backend, "dtype": str(args.dtype), "docs": len(lengths), "tokens": total,
                   "head_dim": args.head_dim}
            try:
                got = fwd_bwd(q, k, v, dout, varlen_fn(backend, cu, max_len, causal, window), args.dtype)
            except (rt.AttentionBackendError, RuntimeError, ValueError) as exc:
                row.update(skipped=f"{type(exc).__name__}: {exc}", passed=None)
                rows.append(row)
                continue
            row["vs_fp32"] = {t: errors(got[t], golden[t]) for t in golden}
            row["vs_reference_lowp"] = {t: errors(got[t], ref_lp[t]) for t in golden}
            row["passed"] = all(
                row["vs_fp32"][t]["max_abs"] <= max(2 * ref_err[t]["max_abs"], args.atol) for t in golden
            )
            rows.append(row)
    return rows


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


def check_fused_loss(args, device) -> list[dict]:
    """runtime.fused_linear_causal_lm_loss in bf16 vs float32 logits + cross entropy; the bf16 logits path
    (what the model computed before) sets the bar: at most twice its error."""
    g = torch.Generator().manual_seed(7)
    tokens, hidden, vocab = 8192, 2048, 32000
    h = (torch.randn(tokens, hidden, generator=g) * 0.5).to(device)
    w = (torch.randn(vocab, hidden, generator=g) * hidden ** -0.5).to(device)
    labels = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    labels[::97] = -100
    n = int((labels != -100).sum())

    def run(fn, dtype):
        hh, ww = (t.to(dtype).clone().requires_grad_(True) for t in (h, w))
        loss = fn(hh, ww)
        loss.backward()
        return loss.detach().float(), hh.grad.float(), ww.grad.float()

    plain = lambda hh, ww: torch.nn.functional.cross_entropy((hh @ ww.t()).float(), labels, reduction="sum") / n  # noqa: E731
    golden, lowp = run(plain, torch.float32), run(plain, args.dtype)
    fused = run(lambda hh, ww: rt.fused_linear_causal_lm_loss(hh, ww, labels, num_valid_tokens=n), args.dtype)
    names = ("loss", "d_hidden", "d_weight")
    bar = {k: _rel(a, b) for k, a, b in zip(names, lowp, golden)}
    got = {k: _rel(a, b) for k, a, b in zip(names, fused, golden)}
    outside = labels.clone()
    outside[5] = vocab  # no host check (it would wait for the GPU): the loss says so
    bad_label = rt.fused_linear_causal_lm_loss(h.to(args.dtype), w.to(args.dtype), outside, num_valid_tokens=n)
    return [{"case": "fused_linear_cross_entropy", "kernel": rt.fused_loss_kernel(device), "tokens": tokens,
             "vocab": vocab, "rel_err_vs_fp32": got, "bf16_logits_rel_err_vs_fp32": bar,
             "passed": all(got[k] <= max(2 * bar[k], 1e-3) for k in names)},
            {"case": "fused_linear_cross_entropy_label_outside_vocab", "loss": float(bad_label),
             "passed": bool(torch.isnan(bad_label))}]


def check_swiglu_mlp(args, device) -> list[dict]:
    """runtime.swiglu_mlp (its Triton kernels) in bf16 vs the plain SwiGLU in float32; the plain one in bf16 sets the
    bar. Its backward must also hold less at its peak than autograd over the plain one (h not kept, gradients in
    place)."""
    g = torch.Generator().manual_seed(5)
    tokens, hidden, inter = 8192, 2048, 5632
    x = torch.randn(tokens, hidden, generator=g).to(device)
    weights = [(torch.randn(*shape, generator=g) * shape[1] ** -0.5).to(device)
               for shape in ((inter, hidden), (inter, hidden), (hidden, inter))]
    dout = torch.randn(tokens, hidden, generator=g).to(device)
    plain = lambda x, wg, wu, wd: (F.silu(x @ wg.t()) * (x @ wu.t())) @ wd.t()  # noqa: E731

    def run(fn, dtype):
        inputs = [t.to(dtype, copy=True).requires_grad_(True) for t in (x, *weights)]
        out = fn(*inputs)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out.backward(dout.to(dtype))
        held = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        return [out.detach().float()] + [t.grad.float() for t in inputs], held

    names = ("out", "d_x", "d_gate", "d_up", "d_down")
    golden, _ = run(plain, torch.float32)
    lowp, plain_mib = run(plain, args.dtype)
    fused, fused_mib = run(rt.swiglu_mlp, args.dtype)
    bar = {k: _rel(a, b) for k, a, b in zip(names, lowp, golden)}
    got = {k: _rel(a, b) for k, a, b in zip(names, fused, golden)}
    return [{"case": "swiglu_mlp", "kernel": rt.swiglu_mlp_kernel(device, args.dtype), "tokens": tokens,
             "rel_err_vs_fp32": got, "plain_bf16_rel_err_vs_fp32": bar,
             "backward_peak_mib": {"swiglu_mlp": fused_mib, "plain_autograd": plain_mib},
             "passed": all(got[k] <= max(2 * bar[k], 1e-3) for k in names) and fused_mib < plain_mib}]


def check_compiled_model(args, device) -> list[dict]:
    """A packed step of a patched Llama (4 layers, hidden 1024, head dim 128) with its decoder layers
    compiled whole and the fused loss, bf16, vs the same model eager in float32; eager bf16 sets the bar."""
    from transformers import LlamaConfig

    from hfpatch import modeling, zoo
    from hfpatch.train.output_head import defer_output_projection, output_weight
    from hfpatch.train.parallelize import compile_decoder_layers

    cfg = LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=8192)
    torch.manual_seed(0)
    state = modeling.model_class(zoo.resolve("llama2"))(cfg).state_dict()
    rows = [[int(t) for t in torch.randint(3, 8192, (n,))] for n in doc_lengths(4096, 11)]
    batch = rt.build_packed_row(rows).as_batch()

    def run(dtype, compiled, steps=3):
        model = modeling.model_class(zoo.resolve("llama2"))(cfg)
        model.load_state_dict(state)
        defer_output_projection(model, "llama2")
        if compiled:
            compile_decoder_layers(model)
        model = model.to(device, dtype).train()
        for _ in range(steps):  # compiled: the first steps compile, the last is compared
            model.zero_grad(set_to_none=True)
            with rt.packed_batch(batch["cu_seqlens"].to(device), batch["max_seqlen"]):
                hidden = model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                               use_cache=False).logits
            loss = rt.fused_linear_causal_lm_loss(hidden, output_weight(model), batch["labels"].to(device))
            loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters()])
        return loss.detach().float(), grads

    golden, eager, compiled = run(torch.float32, False, 1), run(args.dtype, False, 1), run(args.dtype, True)
    bar = {"loss": _rel(eager[0], golden[0]), "grads": _rel(eager[1], golden[1])}
    got = {"loss": _rel(compiled[0], golden[0]), "grads": _rel(compiled[1], golden[1])}
    return [{"case": "patched_llama_compiled_layers_fused_loss", "rel_err_vs_fp32": got, "eager_bf16_rel_err_vs_fp32": bar,
             "passed": all(got[k] <= max(2 * bar[k], 1e-3) for k in got)}]


def check_isp(args, device) -> list[dict]:
    """ISP over all ranks vs the same attention run unsharded on every rank."""
    sp, rank = gpc.get_world_size(ParallelMode.TENSOR), gpc.get_local_rank(ParallelMode.TENSOR)
    group = gpc.get_group(ParallelMode.TENSOR)
    rows = []
    for seed, (name, (heads, kv, causal, window)) in enumerate(ISP_CASES.items()):
        lengths = doc_lengths(args.tokens, 100 + seed)
        q, k, v, dout, cu, max_len = make_inputs(lengths, heads, kv, args.head_dim, 100 + seed, device)
        total = sum(lengths)
        row = rt.build_packed_row([[0] * n for n in lengths])
        shard = rt.shard_for_sequence_parallel(row, rank, sp)
        padded = int(shard["cu_seqlens"][-1])
        cu_pad = shard["cu_seqlens"].to(device)
        # sp=1: the whole padded pack on this rank, no communication.
        full = fwd_bwd(q[:padded], k[:padded], v[:padded], dout[:padded],
                       varlen_fn(args.backend, cu_pad, shard["max_seqlen"], causal, window), args.dtype)
        local = padded // sp
        sl = slice(rank * local, (rank + 1) * local)
        isp = fwd_bwd(
            q[sl], k[sl], v[sl], dout[sl],
            lambda q, k, v: rt.isp_flash_attn_varlen_func(
                q[None], k[None], v[None], cu_pad, cu_pad, shard["max_seqlen"], shard["max_seqlen"],
                causal=causal, window_size=window, backend=args.backend,
            )[0],
            args.dtype,
        )
        errs = {}
        for t in full:
            # Compare this rank's real tokens; padding rows are ignored.
            stop = min(sl.stop, total)
            n = max(stop - sl.start, 0)
            e = errors(isp[t][:n], full[t][sl.start:stop]) if n else {"max_abs": 0.0, "max_rel": 0.0}
            vals = torch.tensor([e["max_abs"], e["max_rel"]], device=device)
            torch.distributed.all_reduce(vals, op=torch.distributed.ReduceOp.MAX, group=group)
            errs[t] = {"max_abs": vals[0].item(), "max_rel": vals[1].item()}
        rows.append({"case": name, "sp": sp, "heads": heads, "kv_heads": kv, "tokens": total, "padded": padded,
                     "dtype": str(args.dtype), "isp_vs_sp1": errs,
                     "passed": all(e["max_rel"] <= args.isp_rtol for e in errs.values())})
    return rows


def environment(device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
            "attention_backends": rt.available_backends(), "auto_backend_bf16": None}
    if device.type == "cuda":
        info["card"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        probe = torch.zeros(1, 1, 8, device=device, dtype=torch.bfloat16)
        info["auto_backend_bf16"] = rt.resolve_backend(None, probe)
    return info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON report path (written by rank 0)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="precision under test (default bfloat16)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per pack (default 4096 cuda, 256 cpu)")
    p.add_argument("--head-dims", default=None, help="comma-separated (default 64,128 cuda, 16 cpu)")
    p.add_argument("--backend", default=None, help="backend for the ISP check (default: auto)")
    p.add_argument("--atol", type=float, default=1e-2, help="absolute error floor for kernels vs fp32")
    p.add_argument("--ref-rtol", type=float, default=5e-2, help="bf16 reference vs fp32, relative")
    p.add_argument("--isp-rtol", type=float, default=2e-2, help="ISP vs sp=1, relative to max |ref|")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.dtype = getattr(torch, args.dtype or "bfloat16")
    args.tokens = args.tokens or (4096 if cuda else 256)
    args.head_dims = [int(d) for d in (args.head_dims or ("64,128" if cuda else "16")).split(",")]
    args.head_dim = args.head_dims[0]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: pass --device cpu for the CPU smoke test", file=sys.stderr)
        return 2
    if world > 1:
        rt.initialize(sequence_parallel=world, backend="nccl" if args.device == "cuda" else "gloo")
    device = rt.current_device() if world > 1 else torch.device(args.device)
    rank = gpc.get_global_rank()
    started = time.time()
    report = {"environment": environment(device), "world_size": world}
    if rank == 0:
        report["backends"] = [row for args.head_dim in args.head_dims for row in check_backends(args, device)]
        if device.type == "cuda" and world == 1:
            report["training_path"] = (check_fused_loss(args, device) + check_swiglu_mlp(args, device)
                                      + check_compiled_model(args, device))
    if world > 1:
        report["isp"] = check_isp(args, device)
        rt.destroy()
    if rank != 0:
        return 0
    report["seconds"] = round(time.time() - started, 2)
    checks = report.get("backends", []) + report.get("training_path", []) + report.get("isp", [])
    report["passed"] = all(c["passed"] is not False for c in checks)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    for c in checks:
        status = "skip" if c["passed"] is None else ("PASS" if c["passed"] else "FAIL")
        errs = c.get("vs_fp32") or c.get("isp_vs_sp1") or {}
        worst = max((e["max_abs"] for e in errs.values()), default=float("nan"))
        what = c.get("backend") or ("isp sp=%s" % c["sp"] if "sp" in c else "training path")
        worst = max(c["rel_err_vs_fp32"].values()) if "rel_err_vs_fp32" in c else worst
        print(f"{status}  {what}:{c['case']}{'' if 'head_dim' not in c else ' d=%d' % c['head_dim']}  err={worst:.3g}")
    print(f"{'PASSED' if report['passed'] else 'FAILED'}; report: {args.out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
