"""Packing benchmark, one GPU: contenders side by side in one run on one card.

Llama-2 architecture at ~1B parameters, bf16 weights, fwd+bwd on the same documents for every
contender (equal real tokens per step), no optimizer:
  padded            unpatched transformers, micro-batches of 8 documents padded to the longest, sdpa
  hf_padfree        unpatched transformers, one row with position_ids resets (its own packed-sequence
                    detection), attention_mask=None, flex_attention (the best it has without flash-attn)
  hf_padfree_liger  the same with liger-kernel applied as a TRL user turns it on (RoPE, RMSNorm,
                    SwiGLU, fused linear cross-entropy through the model's own loss): the strongest peer
  hfpatch_eager     the patched model, one packed row, cu_seqlens, the auto attention backend, nothing
                    fused, logits then cross entropy (hfpatch before it fused anything)
  hfpatch_liger     the patched model with liger's RMSNorm / SwiGLU / RoPE kernels and the fused loss
  hfpatch           the patched model as `hfpatch train` runs it on a GPU by default: decoder layers
                    compiled (attention inside the graph before the MLP), the SwiGLU MLP as hfpatch's own
                    function between two graphs, and hfpatch's fused linear loss
  hfpatch_inductor_mlp  the same with each layer compiled whole, the MLP by inductor (the default until
                    2026-12-03h): what hfpatch's SwiGLU MLP is measured against
  gemm_only         not a model: the step's matmuls alone (every projection's forward and both backward GEMMs,
                    the output head whole), back to back: the floor of any contender's step on this card
Documents: log-normal lengths, median 350 tokens, sigma 1.0, clipped to [16, 4096]; or (--source
trainer) the documents `hfpatch train llama2 --seq-len N --micro-num 1` reads, step by step.
MFU for every contender: (6 N tokens + causal attention FLOPs) / time / 989 TFLOP/s (H100/H200 bf16), N the
matmul parameters (the input embedding excluded, as `hfpatch train` counts them; before 2026-12-03b all parameters).

    python scripts/bench_packing.py --out docs/bench/packing.json
    python scripts/bench_packing.py --out docs/bench/trainer_vs_bare.json --source trainer --contenders hfpatch \
        --data DOCS --trainer-run RUN_DIR
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 / H200 SXM, the MFU denominator
CONTENDERS = ("padded", "hf_padfree", "hf_padfree_liger", "hfpatch_eager", "hfpatch_liger", "hfpatch",
              "hfpatch_inductor_mlp", "gemm_only")


def lognormal_documents(n_tokens: int, vocab: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    docs, total = [], 0
    while total < n_tokens:
        length = int(min(max(math.exp(math.log(350) + torch.randn(1, generator=gen).item()), 16), 4096))
        length = min(length, n_tokens - total)  # every step exactly n_tokens: a new shape would recompile
        docs.append(torch.randint(3, vocab, (length,), generator=gen))
        total += length
    return docs


def trainer_documents(seq_len: int, steps: int, data: str | None, seed: int = 42) -> list[list[torch.Tensor]]:
    """The documents of the first ``steps`` steps of `hfpatch train llama2 --seq-len SEQ_LEN --micro-num 1`
    (with ``data``: `--data DATA --overflow split`)."""
    from hfpatch.train.batches import row_documents
    from hfpatch.train.config import resolve_config
    from hfpatch.train.data import load_dataset
    from hfpatch.train.dataset import RowStream

    overrides = {"data.seq_len": seq_len, "data.micro_num": 1, "seed": seed}
    if data:
        overrides.update({"data.train_folder": data, "data.overflow": "split"})
    cfg = resolve_config("llama2", overrides=overrides)
    _, dataset, _ = load_dataset(cfg, rank=0)
    rows = RowStream(len(dataset.rows), seed).take(0, steps)
    return [row_documents(dataset.rows[i]) for i in rows]


def config(args):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.heads, max_position_embeddings=max(8192, args.tokens_per_step),
                       torch_dtype="bfloat16")


def shifted(doc: torch.Tensor) -> torch.Tensor:
    return torch.cat([doc[1:], torch.tensor([-100])])


def token_losses(logits, labels):
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")


def to_gpu(tensor: torch.Tensor) -> torch.Tensor:
    """From pinned memory without a wait, as `hfpatch train` copies its batches: a pageable copy would drain the GPU's
    queue before every step of every contender."""
    from hfpatch.runtime import to_device

    return to_device(tensor, "cuda")


@dataclass
class Batch:
    """One step's documents and the host tensors of its packed row, built before any timing: a trainer builds the
    next batch while the GPU runs, so no contender's steps pay for it (they copy them, without a wait)."""

    docs: list[torch.Tensor]
    ids: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor  # shifted: labels[i] is the target of position i, -100 at each document's end
    unshifted_labels: torch.Tensor  # transformers' convention: it shifts them; -100 at each document's start
    cu_seqlens: torch.Tensor

    @property
    def tokens(self) -> int:
        return int(self.ids.numel())

    @property
    def n_targets(self) -> int:
        return self.tokens - len(self.docs)

    @property
    def max_len(self) -> int:
        return max(len(d) for d in self.docs)


def make_batch(docs: list[torch.Tensor], pin: bool = True) -> Batch:
    tensors = [torch.cat(docs)[None], torch.cat([torch.arange(len(d)) for d in docs])[None],
               torch.cat([shifted(d) for d in docs])[None],
               torch.cat([torch.cat([torch.tensor([-100]), d[1:]]) for d in docs])[None],
               torch.tensor([0, *torch.tensor([len(d) for d in docs]).cumsum(0).tolist()], dtype=torch.int32)]
    return Batch(docs, *(t.pin_memory() if pin else t for t in tensors))


def packed_inputs(batch: Batch):
    return to_gpu(batch.ids), to_gpu(batch.positions), to_gpu(batch.labels)


def step_padded(model, batch: Batch, micro=8):
    docs, n_targets, loss_total = batch.docs, batch.n_targets, 0
    for i in range(0, len(docs), micro):
        chunk = docs[i:i + micro]
        width = max(len(d) for d in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, doc in enumerate(chunk):
            ids[row, :len(doc)] = doc
            labels[row, :len(doc)] = shifted(doc)
            mask[row, :len(doc)] = 1
        logits = model(input_ids=to_gpu(ids), attention_mask=to_gpu(mask), use_cache=False).logits
        loss = token_losses(logits, to_gpu(labels)) / n_targets
        loss.backward()
        loss_total = loss_total + loss.detach()
    return loss_total


def step_hf_padfree(model, batch: Batch):
    ids, positions, labels = packed_inputs(batch)
    loss = token_losses(model(input_ids=ids, position_ids=positions, use_cache=False).logits, labels) / batch.n_targets
    loss.backward()
    return loss.detach()


def step_hf_padfree_liger(model, batch: Batch):
    # transformers' labels convention (it shifts them): -100 at each document's first token, as
    # DataCollatorWithFlattening writes them, so no target crosses a document boundary
    ids, positions, labels = to_gpu(batch.ids), to_gpu(batch.positions), to_gpu(batch.unshifted_labels)
    loss = model(input_ids=ids, position_ids=positions, labels=labels, use_cache=False).loss
    loss.backward()
    return loss.detach()


def step_hfpatch(model, batch: Batch, fused_loss=False):
    from hfpatch import runtime
    from hfpatch.train.output_head import output_weight

    ids, positions, labels = packed_inputs(batch)
    with runtime.packed_batch(batch.cu_seqlens, batch.max_len, device="cuda"):  # as the trainer: moved from the host
        out = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    if fused_loss:
        loss = runtime.fused_linear_causal_lm_loss(out, output_weight(model), labels, num_valid_tokens=batch.n_targets,
                                                   overwrite_hidden_states=True)  # as the trainer
    else:
        loss = token_losses(out, labels) / batch.n_targets
    loss.backward()
    return loss.detach()


class GemmOnly(torch.nn.Module):
    """The model's projection weights (q, k, v, o, gate, up, down per layer; the output head), bf16, and random
    activations: :func:`step_gemm_only` runs the step's matmuls on them and nothing else."""

    def __init__(self, cfg, max_tokens: int):
        super().__init__()
        h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
        shapes = [(h, h)] * 4 + [(i, h)] * 2 + [(h, i)]  # (out, in): q, k, v, o, gate, up, down
        self.layers = torch.nn.ModuleList(
            torch.nn.ParameterList(torch.nn.Parameter(torch.randn(*shape) * 0.02) for shape in shapes)
            for _ in range(cfg.num_hidden_layers))
        self.head = torch.nn.Parameter(torch.randn(v, h) * 0.02)
        for width in {h, i, v}:
            self.register_buffer(f"act_{width}", torch.randn(max_tokens, width))

    def act(self, width: int, tokens: int) -> torch.Tensor:
        return getattr(self, f"act_{width}")[:tokens]


def step_gemm_only(model: GemmOnly, batch: Batch) -> torch.Tensor:
    """Forward ``x W^T`` of every projection in the step's order, then backward ``dY W`` and ``dY^T x`` in reverse;
    the inputs and output gradients are stand-ins of the right shapes (timing, not numbers)."""
    t = batch.tokens
    weights = [w for layer in model.layers for w in layer] + [model.head]
    for w in weights:
        out = model.act(w.shape[1], t) @ w.t()
    for w in reversed(weights):
        dy = model.act(w.shape[0], t)
        dy @ w  # the input's gradient
        out = dy.t() @ model.act(w.shape[1], t)  # the weight's
    return out[0, 0]


def globals_restored_after(*modules):
    """A context whose exit puts these modules' globals back as they are now. liger rebinds transformers' llama
    RoPE, RMSNorm and MLP in place, and the patched model's RoPE is set in its (shared) module: restored, the
    contenders that follow run their own code whatever the order."""
    saved = [(module, dict(vars(module))) for module in modules]

    @contextlib.contextmanager
    def restoring():
        try:
            yield
        finally:
            for module, attrs in saved:
                vars(module).update(attrs)

    return restoring()


def apply_liger_to_patched(model) -> None:
    """liger's RMSNorm and SwiGLU on the patched model's modules, its RoPE in the patched module."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    apply_liger_kernel_to_llama(rope=False, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False, model=model)
    sys.modules[type(model).__module__].apply_rotary_pos_emb = liger_rotary_pos_emb


def build(name, cfg, state):
    """(model, step function, the context it runs in) of one contender, weights from ``state``."""
    import transformers
    from transformers.models.llama import modeling_llama

    from hfpatch import modeling, zoo
    from hfpatch.train.output_head import defer_output_projection
    from hfpatch.train.parallelize import compile_decoder_layers

    if name.startswith("hfpatch"):
        model = modeling.model_class(zoo.resolve("llama2"))(cfg)
        model.load_state_dict(state)
        context = globals_restored_after(modeling_llama, sys.modules[type(model).__module__])
        fused = name != "hfpatch_eager"
        if fused:
            defer_output_projection(model, "llama2")
        if name == "hfpatch_liger":
            apply_liger_to_patched(model)
        if name in ("hfpatch", "hfpatch_inductor_mlp"):
            compile_decoder_layers(model, fuse_mlp=name == "hfpatch")
        return model, lambda m, batch: step_hfpatch(m, batch, fused_loss=fused), context
    if name == "gemm_only":
        return GemmOnly(cfg, cfg.max_position_embeddings), step_gemm_only, contextlib.nullcontext()
    if name == "hf_padfree_liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        cfg._attn_implementation = "flex_attention"
        model = transformers.LlamaForCausalLM(cfg)
        model.load_state_dict(state)
        context = globals_restored_after(modeling_llama)
        apply_liger_kernel_to_llama(model=model)  # rope, rms_norm, swiglu, fused linear cross-entropy
        return model, step_hf_padfree_liger, context
    cfg._attn_implementation = "sdpa" if name == "padded" else "flex_attention"
    model = transformers.LlamaForCausalLM(cfg)
    model.load_state_dict(state)
    return model, (step_padded if name == "padded" else step_hf_padfree), contextlib.nullcontext()


def timed_steps(model, step, batches) -> tuple[float, int, list[float]]:
    """Seconds and real tokens of ``batches``, each a step from zero gradients, GPU work included, and each step's
    milliseconds on the GPU's clock (events read at the end: a step that stalled, on a recompile say, stands out).
    Each step's loss stays on the GPU, as a trainer keeps it between the steps it logs (HF Trainer's running loss): a
    read after every step would idle the GPU while the host starts the next one."""
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(len(batches) + 1)]
    torch.cuda.synchronize()
    start, tokens = time.perf_counter(), 0
    marks[0].record()
    for batch, mark in zip(batches, marks[1:]):
        model.zero_grad(set_to_none=True)
        step(model, batch)
        mark.record()
        tokens += batch.tokens
    torch.cuda.synchronize()
    return time.perf_counter() - start, tokens, [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]


def energy_counter():
    """A function reading the card's energy counter in joules (NVML), or None where NVML cannot be read."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except Exception:
        return None
    return lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000  # mJ


def measure(name, model, step, batches, warmup):
    model.zero_grad(set_to_none=True)
    first_loss = float(step(model, batches[0]))
    timed_steps(model, step, batches[1:warmup])
    torch.cuda.reset_peak_memory_stats()
    started = datetime.datetime.now()  # local time, as nvidia-smi's log stamps it (gpu_bench.sh packing)
    energy = energy_counter()
    joules = energy() if energy else None
    seconds, tokens, step_ms = timed_steps(model, step, batches[warmup:])
    result = {"contender": name, "real_tokens_per_s": tokens / seconds, "seconds": seconds, "real_tokens": tokens,
              "step_ms": [round(ms, 2) for ms in step_ms],
              "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "first_step_loss": first_loss,
              "timed_window": [started.isoformat(timespec="milliseconds"),
                               datetime.datetime.now().isoformat(timespec="milliseconds")]}
    if energy:  # under a power limit, tokens per joule is what a faster step has to improve
        joules = energy() - joules
        result.update({"joules": joules, "mean_power_w": joules / seconds, "real_tokens_per_joule": tokens / joules})
    print(json.dumps(result), flush=True)
    return result


def profile_steps(model, step, batches) -> dict:
    """Where the GPU time of ``batches`` (already warm) goes, per step: kernel categories and the busy share."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        seconds = timed_steps(model, step, batches)[0]
    return step_profile(prof, len(batches), seconds)


def step_profile(prof, steps: int, seconds: float) -> dict:
    """Per step of a profile over ``steps`` steps that took ``seconds``: wall and GPU-busy time, kernel categories,
    the top kernels and the host ops that spend most time themselves."""
    from profile_step import kernel_breakdown

    breakdown = kernel_breakdown(prof, top=30)
    return {"steps": steps, "wall_ms_per_step": seconds * 1000 / steps,
            "gpu_busy_ms_per_step": breakdown["gpu_busy_ms"] / steps,
            "categories_ms_per_step": {k: v / steps for k, v in breakdown["categories_ms"].items()},
            "top_kernels": breakdown["top_kernels"], "top_cpu_ops": top_cpu_ops(prof, steps),
            "host_syncs": host_syncs(prof, steps), "gpu_idle": gpu_idle(prof, steps)}


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def host_syncs(prof, steps: int, calls=SYNC_CALLS) -> list[dict]:
    """Where the host waited for the GPU, per step: each wait and up to 4 enclosing ops, innermost first
    (``cudaStreamSynchronize < aten::_local_scalar_dense < aten::item < ...``). After a wait the GPU idles until the
    host has queued work again."""
    count, waited = Counter(), defaultdict(float)
    for event in prof.events():
        if event.name not in calls:
            continue
        chain, parent = [], event.cpu_parent
        while parent is not None and len(chain) < 4:
            chain.append(parent.name)
            parent = parent.cpu_parent
        site = " < ".join([event.name, *chain])
        count[site] += 1
        waited[site] += event.cpu_time_total / 1000
    return [{"site": site, "calls_per_step": n / steps, "wait_ms_per_step": waited[site] / steps}
            for site, n in count.most_common()]


def gpu_idle(prof, steps: int) -> dict:
    """:func:`idle_gaps` of the profile's GPU timeline (kernels, copies, memsets)."""
    from profile_step import is_annotation

    spans = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
             if e.device_type == torch.autograd.DeviceType.CUDA and not is_annotation(e)]
    return idle_gaps(spans, steps)


def idle_gaps(spans, steps: int, min_us: float = 20.0, top: int = 12) -> dict:
    """When the GPU sat idle, per step, from its busy ``spans`` (name, start us, end us): all idle time, the idle
    time in gaps shorter than ``min_us`` (back-to-back launches), and the longer gaps grouped by the work on either
    side of them, largest first (``"kernel before -> kernel after"``)."""
    short, long_gaps = 0.0, defaultdict(lambda: [0, 0.0])
    busy_until, before = None, None
    for name, start, end in sorted(spans, key=lambda span: span[1]):
        if busy_until is not None and start > busy_until:
            gap = start - busy_until
            if gap < min_us:
                short += gap
            else:
                site = long_gaps[f"{before[:60]} -> {name[:60]}"]
                site[0] += 1
                site[1] += gap
        if busy_until is None or end > busy_until:
            busy_until, before = end, name
    in_long = sum(ms for _, ms in long_gaps.values())
    ranked = sorted(long_gaps.items(), key=lambda kv: -kv[1][1])[:top]
    return {"idle_ms_per_step": (short + in_long) / 1000 / steps, f"in_gaps_under_{min_us:g}us_ms_per_step": short / 1000 / steps,
            "longest_sites": [{"site": site, "gaps_per_step": n / steps, "ms_per_step": us / 1000 / steps}
                              for site, (n, us) in ranked]}


def top_cpu_ops(prof, steps: int, top: int = 20) -> list[dict]:
    """Host time per step of the ops that spend most of it themselves (what keeps the GPU waiting, if anything)."""
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return [{"op": e.key[:120], "self_cpu_ms_per_step": e.self_cpu_time_total / 1000 / steps,
             "calls_per_step": e.count / steps} for e in events]


def memory_at_peak(model, step, batch, top: int = 15) -> dict:
    """Where one step's peak memory is: the step run with the allocator's history recorded (Python stacks), the
    blocks live at its peak (:func:`live_at_peak`) over what was allocated before it (weights, no gradients)."""
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(context="alloc", stacks="python")
    try:
        step(model, batch)
        torch.cuda.synchronize()
        trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    return {"before_step_gib": baseline / 2**30, **live_at_peak(trace, top)}


def live_at_peak(trace: list[dict], top: int = 15) -> dict:
    """The most memory the blocks allocated within an allocator ``trace`` held at once, and the blocks live then
    grouped by the first frame outside torch that allocated them (the model's line, liger's, a compiled graph's)."""
    sizes, held, peak, peak_at = {}, 0, 0, -1
    for index, entry in enumerate(trace):
        if entry["action"] == "alloc":
            sizes[entry["addr"]] = entry["size"]
            held += entry["size"]
            if held > peak:
                peak, peak_at = held, index
        elif entry["action"] == "free_completed" and entry["addr"] in sizes:
            held -= sizes.pop(entry["addr"])
    live = {}
    for entry in trace[:peak_at + 1]:
        if entry["action"] == "alloc":
            live[entry["addr"]] = entry
        elif entry["action"] == "free_completed":
            live.pop(entry["addr"], None)
    sites = defaultdict(list)
    for entry in live.values():
        sites[allocation_site(entry.get("frames", []))].append(entry["size"])
    ranked = sorted(sites.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {"peak_in_step_gib": peak / 2**30,  # a site's largest blocks tell apart what it holds (a stackless one)
            "live_at_peak": [{"site": site, "blocks": len(sizes), "gib": sum(sizes) / 2**30,
                              "largest_mib": [round(b / 2**20, 1) for b in sorted(sizes, reverse=True)[:6]]}
                             for site, sizes in ranked]}


def allocation_site(frames: list[dict]) -> str:
    """``file:line function`` of the innermost frame outside torch's own code (innermost first, as recorded)."""
    for frame in frames:
        if "/torch/" not in frame["filename"] and not frame["filename"].startswith("<"):
            return f"{Path(frame['filename']).name}:{frame['line']} {frame['name']}"
    return f"torch: {frames[0]['name']}" if frames else "no stack"


def trainer_throughput(run_dir: str, warmup: int) -> dict:
    """Real tokens/s of an `hfpatch train` run over its steps after ``warmup`` (metrics.jsonl)."""
    from hfpatch.train.metrics import read_metrics

    records = read_metrics(Path(run_dir) / "metrics.jsonl")[warmup:]
    tokens, seconds = sum(r["tokens"] for r in records), sum(r["step_time_s"] for r in records)
    return {"run": run_dir, "steps": len(records), "real_tokens": tokens, "seconds": seconds,
            "real_tokens_per_s": tokens / seconds, "mfu": sum(r.get("mfu", 0) for r in records) / len(records),
            "peak_mem_gib": max(r.get("peak_mem_gib", 0) for r in records)}


def attention_flops(docs, layers, hidden):
    # causal: half of QK^T and PV, fwd (2 matmuls x 2 flops) + bwd (2.5x fwd)
    return sum(len(d) ** 2 for d in docs) * hidden * layers * 2 * 3.5


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--source", choices=("lognormal", "trainer"), default="lognormal")
    parser.add_argument("--tokens-per-step", type=int, default=16384, help="lognormal: real tokens; trainer: seq_len")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="after timing, profile this many more steps of each contender (kernel categories)")
    parser.add_argument("--memory-peak", action="store_true",
                        help="then one more step with the allocator's history recorded: what is live at its peak")
    parser.add_argument("--contenders", default="hf_padfree,hf_padfree_liger,hfpatch_eager,hfpatch_liger,hfpatch")
    parser.add_argument("--data", help="with --source trainer: the run's --data (read with --overflow split)")
    parser.add_argument("--trainer-run", metavar="DIR", nargs="+", default=[], help="with --source trainer: "
                        "`hfpatch train` run dirs on the same documents; each one's tokens/s after --warmup steps is "
                        "compared with each contender")
    args = parser.parse_args()
    names = args.contenders.split(",")
    unknown = sorted(set(names) - set(CONTENDERS))
    if unknown:
        parser.error(f"unknown contenders {unknown}; choose from {', '.join(CONTENDERS)}")
    missing = [run for run in args.trainer_run if not (Path(run) / "metrics.jsonl").is_file()]
    if missing:  # checked before the minutes of measuring, not after
        parser.error(f"--trainer-run {missing[0]} has no metrics.jsonl (give the --out dir of an `hfpatch train` run)")
    if not torch.cuda.is_available():
        parser.error("no CUDA GPU here: every contender runs on one (this script measures GPU steps)")

    import transformers

    from hfpatch import runtime
    from hfpatch.train.build import count_parameters

    cfg = config(args)
    # as `hfpatch train` does: the padded contender's masked SDPA would otherwise take cuDNN's kernel, which builds a
    # plan for every new padded shape (~15 ms of host time a call on the H200); no other contender calls SDPA
    torch.backends.cuda.enable_cudnn_sdp(False)
    if args.source == "trainer":
        step_docs = trainer_documents(args.tokens_per_step, args.steps + args.warmup, args.data)
    else:
        step_docs = [lognormal_documents(args.tokens_per_step, cfg.vocab_size, seed=s) for s in range(args.steps + args.warmup)]
    batches = [make_batch(docs) for docs in step_docs]
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    n_params = count_parameters(reference)[1]  # matmul parameters: the input embedding is a lookup, not 6 FLOPs a token
    del reference
    results = []
    probe = torch.empty(1, 1, args.hidden // args.heads, dtype=torch.bfloat16, device="cuda")
    report = {
        "card": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
        "attention_backend": runtime.resolve_backend(None, probe), "fused_loss": runtime.fused_loss_kernel(probe.device),
        "params": n_params, "params_counted": "matmul (input embedding excluded)", "config": vars(args), "results": results,
    }
    for name in names:
        try:
            model, step, context = build(name, cfg, state)
            model = model.to(torch.bfloat16).cuda().train()
            with context:
                results.append(measure(name, model, step, batches, args.warmup))
                if args.profile:
                    results[-1]["profile"] = profile_steps(model, step, batches[args.warmup:][:args.profile])
                if args.memory_peak:
                    try:
                        results[-1]["memory_at_peak"] = memory_at_peak(model, step, batches[args.warmup])
                    except Exception as exc:  # a diagnosis that fails keeps the contender's measurement
                        results[-1]["memory_at_peak"] = {"error": repr(exc)[:400]}
        except torch.OutOfMemoryError as exc:
            results.append({"contender": name, "error": f"out of memory: {str(exc)[:200]}"})
        except Exception as exc:  # a contender that cannot run here is reported, not fatal
            results.append({"contender": name, "error": repr(exc)[:400]})
            print(json.dumps(results[-1]), flush=True)
        # liger binds methods onto the model (a reference cycle): without a collection its weights and gradients
        # stayed allocated into the next contender's timed window (+3.5 GiB on its peak in one run)
        model = step = context = None
        gc.collect()
        torch.cuda.empty_cache()
        write_report(args.out, report)  # each contender's result kept as it comes (a run cut short still reports)
    measured = batches[args.warmup:]
    flops = 6 * n_params * sum(batch.tokens for batch in measured) + sum(
        attention_flops(batch.docs, args.layers, args.hidden) for batch in measured)
    by_name = {r["contender"]: r for r in results if "error" not in r}
    for r in by_name.values():
        r["mfu"] = flops / r["seconds"] / BF16_PEAK
    for peer in ("hf_padfree_liger", "hf_padfree", "padded"):
        if peer in by_name:
            for r in by_name.values():
                r[f"speedup_vs_{peer}"] = r["real_tokens_per_s"] / by_name[peer]["real_tokens_per_s"]
                if r["contender"] != "gemm_only":  # which computes no loss
                    r[f"loss_diff_vs_{peer}"] = abs(r["first_step_loss"] - by_name[peer]["first_step_loss"])
    trainers = [trainer_throughput(run, args.warmup) for run in args.trainer_run]
    for trainer in trainers:
        trainer["fraction_of_bare"] = {name: trainer["real_tokens_per_s"] / r["real_tokens_per_s"]
                                       for name, r in by_name.items()}
    if trainers:
        report["trainers"] = trainers
    write_report(args.out, report)
    print(json.dumps(report, indent=2, default=str))


def write_report(path: str, report: dict) -> None:
    from hfpatch.files import atomic_write

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(path), json.dumps(report, indent=2, default=str).encode())


if __name__ == "__main__":
    main()
