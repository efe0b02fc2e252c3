"""Longest sequence that trains a step: Llama-2-7B config (random init) on one host's GPUs.

ISP over all GPUs (sp = world) + weight parallel over all GPUs (FSDP2, bf16 compute, fp32
master weights, AdamW) + activation checkpointing (every decoder layer) + the chunked loss
(hfpatch.runtime.chunked_causal_lm_loss: the 32K-vocab logits never exist in full). One
document of N random tokens; a trial = one full training step (forward, backward, optimizer).

The driver bisects N; every trial is its own torchrun launch, because an out-of-memory on one
rank leaves the others inside NCCL collectives: torchrun tears that group down and the next
trial starts clean. The JSON report is rewritten after every trial, so a run stopped by
--deadline still says what it found (the bracket [longest that trained, shortest that failed]).

    python scripts/bench_max_length.py --out docs/bench/max_length.json --nproc 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

K = 1024


def llama_config(max_len: int, tiny: bool):
    """Llama-2-7B's shape; ``tiny``: a 2-layer one for a CPU smoke run of the script itself."""
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max_len)
    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=max_len,
                       rms_norm_eps=1e-5, rope_theta=10000.0)


def trial(tokens: int, result_path: str, tiny: bool) -> None:
    """One training step at ``tokens`` (run under torchrun, one process a GPU; gloo on CPU)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from hfpatch import modeling, runtime, zoo

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    world = dist.get_world_size()
    runtime.initialize(sequence_parallel=world, weight_parallel=world)
    cfg = llama_config(tokens, tiny)
    torch.manual_seed(0)
    started = time.perf_counter()
    with device:
        lm = modeling.model_class(zoo.resolve("llama2"))(cfg)
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.train()

    class ChunkedLossLM(torch.nn.Module):
        """The causal LM with the chunked loss in its forward, so FSDP2's root unit (embeddings, norm,
        lm_head) stays gathered while the loss reads lm_head's weight."""

        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, position_ids, labels, num_valid):
            hidden = self.lm.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
            return runtime.chunked_causal_lm_loss(hidden, self.lm.lm_head.weight, labels, num_valid_tokens=num_valid)

    model = ChunkedLossLM(lm)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda else None
    runtime.apply_weight_parallel(model, layers=lm.model.layers, mp_policy=policy)
    if not cuda:  # gloo has no PREMUL_SUM, which FSDP2 picks for a divide factor of 1
        for module in model.modules():
            if hasattr(module, "set_force_sum_reduction_for_comms"):
                module.set_force_sum_reduction_for_comms(True)
    if cuda:
        torch.cuda.empty_cache()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=False)
    params = sum(p.numel() for p in lm.parameters())  # DTensors: numel is the global size
    doc = torch.randint(3, cfg.vocab_size, (tokens,), generator=torch.Generator().manual_seed(7))
    row = runtime.build_packed_row([doc.tolist()])
    local = runtime.shard_for_sequence_parallel(row, runtime.gpc.get_local_rank(runtime.ParallelMode.TENSOR), world)
    ids, pos, labels = (local[k].to(device) for k in ("input_ids", "position_ids", "labels"))
    num_valid = runtime.count_valid_tokens(labels)
    setup_s = time.perf_counter() - started
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    started = time.perf_counter()
    with runtime.packed_batch(local["cu_seqlens"].to(device), local["max_seqlen"]):
        loss = model(ids, pos, labels, num_valid)
    loss.backward()
    optimizer.step()
    if cuda:
        torch.cuda.synchronize()
    step_s = time.perf_counter() - started
    peak = torch.tensor(torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0, device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    total_loss = runtime.global_loss(loss)
    if dist.get_rank() == 0:
        with open(result_path, "w") as handle:
            json.dump({"tokens": tokens, "ok": bool(torch.isfinite(torch.tensor(total_loss))), "loss": total_loss,
                       "step_s": step_s, "setup_s": setup_s, "peak_mem_gib_max_rank": float(peak), "params": params,
                       "card": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                       "world": world}, handle)
    runtime.destroy()
    dist.destroy_process_group()


def launch(tokens: int, nproc: int, timeout: float, tiny: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   __file__, "--trial", str(tokens), "--result", result, *(["--tiny"] if tiny else [])]
        started = time.perf_counter()
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            # not a failure to fit: the bisection stops here rather than calling this length too long
            return {"tokens": tokens, "ok": None, "error": f"timed out after {timeout:.0f} s", "wall_s": timeout}
        wall = time.perf_counter() - started
        if proc.returncode == 0 and os.path.exists(result):
            with open(result) as handle:
                return {**json.load(handle), "wall_s": wall}
        log = proc.stdout + proc.stderr
        reason = "out of memory" if "OutOfMemoryError" in log or "CUDA out of memory" in log else "failed"
        tail = [line for line in log.splitlines() if "Error" in line][-3:]
        return {"tokens": tokens, "ok": False, "error": reason, "detail": tail, "wall_s": wall}


def estimated_wall(tokens: int, trials: list[dict]) -> float:
    """Seconds a trial at ``tokens`` should take, from the nearest successful one (attention is ~quadratic)."""
    done = [t for t in trials if t.get("ok")]
    if not done:
        return 0.0
    near = min(done, key=lambda t: abs(t["tokens"] - tokens))
    overhead = near["wall_s"] - near["step_s"]
    return overhead + near["step_s"] * (tokens / near["tokens"]) ** 2


def bisect(args) -> None:
    report = {"model": "tiny 2-layer Llama (smoke run)" if args.tiny else "Llama-2-7B config, random init", "nproc": args.nproc,
              "method": "ISP sp=world + FSDP2 weight parallel wp=world (bf16 compute, fp32 AdamW) + activation "
                        "checkpointing + chunked loss; one document; one full training step per trial",
              "granularity": args.granularity, "trials": []}
    trials = report["trials"]
    good, bad = args.good, args.bad  # a bracket already known (an earlier, stopped run)
    tokens = args.start if bad is None else (good + bad) // 2 // args.granularity * args.granularity
    deadline = time.monotonic() + args.deadline

    def save():
        report.update(longest_ok=good or None, shortest_failed=bad)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=2)

    while tokens is not None:
        left = deadline - time.monotonic()
        need = estimated_wall(tokens, trials)
        if left < 60 or need > left:
            report["stopped"] = f"deadline: {left:.0f} s left, a {tokens // K}K trial needs ~{need:.0f} s"
            break
        result = launch(tokens, args.nproc, timeout=min(left, args.trial_timeout), tiny=args.tiny)
        trials.append(result)
        print(json.dumps(result), flush=True)
        if result["ok"] is None:
            report["stopped"] = f"the {tokens // K}K trial ran out of time (--trial-timeout / --deadline)"
            break
        if result["ok"]:
            good = tokens
        else:
            bad = tokens
        if bad is None:
            tokens = min(tokens * 2, args.high)
            if tokens == good:
                tokens = None
        else:
            mid = (good + bad) // 2 // args.granularity * args.granularity
            tokens = mid if mid > good and bad - good > args.granularity else None
        save()
    save()
    print(json.dumps({k: v for k, v in report.items() if k != "trials"}, indent=2))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="the JSON report (driver)")
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--start", type=int, default=256 * K, help="first length tried")
    parser.add_argument("--high", type=int, default=2048 * K, help="never try longer")
    parser.add_argument("--granularity", type=int, default=32 * K, help="stop when the bracket is this narrow")
    parser.add_argument("--deadline", type=float, default=540, help="seconds for the whole bisection")
    parser.add_argument("--trial-timeout", type=float, default=float("inf"), help="give a trial up after this many seconds")
    parser.add_argument("--good", type=int, default=0, help="a length known to train (resume a stopped bisection)")
    parser.add_argument("--bad", type=int, default=None, help="a length known to fail (resume a stopped bisection)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model: smoke-test the script on CPU")
    parser.add_argument("--trial", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trial:
        trial(args.trial, args.result, args.tiny)
    elif not args.out:
        parser.error("--out is required")
    else:
        bisect(args)


if __name__ == "__main__":
    main()
