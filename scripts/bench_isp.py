"""ISP weak scaling and ISP vs torch context parallel, one host, launched by torchrun.

    torchrun --standalone --nproc-per-node 4 scripts/bench_isp.py --out docs/bench/isp.json

Weak scaling: every GPU always holds --tokens-per-gpu tokens; at sp=1 each GPU trains its own
pack (data parallel), at sp=2 / sp=4 groups of 2 / 4 GPUs share one pack sp times longer
(log-normal documents, median 350, plus one long document filling the rest). Reported: real
tokens/s per GPU and efficiency = (tokens/s per GPU at sp) / (at sp=1).

ISP vs context parallel: one long document of --tokens-per-gpu x world tokens on all GPUs,
the patched model with ISP sp=world vs the unpatched transformers model under
torch.distributed.tensor.experimental.context_parallel (ring attention, load-balanced sharding).
For the latter the model's attention is registered as plain causal SDPA with no mask (what
torchtitan does): transformers would otherwise build a dense mask from the sharded position_ids,
which context parallel cannot shard. Each contender's first-step loss is reported (same weights,
same document: they must agree to bf16 rounding).

Timed: forward + backward of a Llama ~1B (bf16), 2 warm-up + 5 timed steps. Gradient sync
(identical for every setting) is excluded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def lognormal_docs(total: int, vocab: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(int(min(max(math.exp(math.log(350) + torch.randn(1, generator=gen).item()), 16), 4096)))
    lengths[-1] -= sum(lengths) - total
    return [torch.randint(3, vocab, (n,), generator=gen) for n in lengths if n > 0]


def llama_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=args.layers,
                       num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=1 << 20)


def timed_steps(step, warmup, steps):
    """(seconds per step, loss of the first step)."""
    first = step()
    for _ in range(warmup - 1):
        step()
    torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    dist.barrier()
    return (time.perf_counter() - start) / steps, first


def isp_run(model, docs, sp, args):
    """One ISP group's pack; returns seconds per step."""
    from hfpatch import runtime

    row = runtime.build_packed_row([d.tolist() for d in docs])
    rank = runtime.gpc.get_local_rank(runtime.ParallelMode.TENSOR)
    local = runtime.shard_for_sequence_parallel(row, rank, sp)
    ids, pos, labels = (local[k].cuda() for k in ("input_ids", "position_ids", "labels"))
    cu = local["cu_seqlens"].cuda()

    def step():
        model.zero_grad(set_to_none=True)
        with runtime.packed_batch(cu, local["max_seqlen"]):
            logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        loss = runtime.causal_lm_loss(logits, labels)
        loss.backward()
        return loss.detach()

    return timed_steps(step, args.warmup, args.steps)


def causal_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention for transformers as one causal SDPA call with no mask: what context parallel shards."""
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def context_parallel_run(state, cfg, doc, args):
    import transformers
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel

    # a name transformers has no mask function for: it passes attention_mask=None
    transformers.AttentionInterface.register("causal_sdpa_no_mask", causal_sdpa)
    cfg._attn_implementation = "causal_sdpa_no_mask"
    model = transformers.LlamaForCausalLM(cfg)
    model.load_state_dict(state)
    model = model.to(torch.bfloat16).cuda().train()
    mesh = init_device_mesh("cuda", (dist.get_world_size(),), mesh_dim_names=("cp",))
    ids = doc[None].cuda()
    pos = torch.arange(doc.numel(), device="cuda")[None]
    labels = torch.cat([doc[1:], torch.tensor([-100])])[None].cuda()

    def step():
        model.zero_grad(set_to_none=True)
        local_ids, local_pos, local_labels = ids.clone(), pos.clone(), labels.clone()
        with context_parallel(mesh, buffers=[local_ids, local_pos, local_labels], buffer_seq_dims=[1, 1, 1]):
            logits = model(input_ids=local_ids, position_ids=local_pos, use_cache=False).logits
            # every rank holds the same number of targets but one (the last label is -100): the mean of
            # the ranks' means is the document's mean up to 1/tokens
            loss = F.cross_entropy(logits.float().flatten(0, 1), local_labels.flatten(), ignore_index=-100)
            loss.backward()
        mean = loss.detach() / dist.get_world_size()
        dist.all_reduce(mean)
        return mean

    return timed_steps(step, args.warmup, args.steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens-per-gpu", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    import transformers

    from hfpatch import modeling, runtime, zoo

    # one process group for the whole run (runtime.initialize reuses it): re-creating groups on
    # torchrun's shared store hands later groups stale peer addresses
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    cfg = llama_config(args)
    torch.manual_seed(0)
    state = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).state_dict()
    world = int(os.environ["WORLD_SIZE"])
    results = {"card": None, "world": world, "tokens_per_gpu": args.tokens_per_gpu, "weak_scaling": [],
               "long_document": []}
    patched_cls = modeling.model_class(zoo.resolve("llama2"))
    sizes = [sp for sp in (1, 2, 4, 8) if sp <= world and world % sp == 0]
    for sp in sizes:
        runtime.initialize(sequence_parallel=sp)
        model = patched_cls(cfg)
        model.load_state_dict(state)
        model = model.to(torch.bfloat16).cuda().train()
        group = runtime.gpc.get_local_rank(runtime.ParallelMode.DATA)
        docs = lognormal_docs(args.tokens_per_gpu * sp, cfg.vocab_size, seed=group)
        try:
            seconds, _ = isp_run(model, docs, sp, args)
            row = {"sp": sp, "seconds_per_step": seconds, "tokens_per_s_per_gpu": args.tokens_per_gpu / seconds,
                   "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
        except torch.OutOfMemoryError:
            row = {"sp": sp, "error": "out of memory"}
        results["weak_scaling"].append(row)
        if dist.get_rank() == 0:
            print(json.dumps(row), flush=True)
        if sp == world:  # the same GPUs on one long document: ISP vs context parallel
            doc = torch.randint(3, cfg.vocab_size, (args.tokens_per_gpu * world,), generator=torch.Generator().manual_seed(7))
            seconds, loss = isp_run(model, [doc], sp, args)
            results["long_document"].append({"method": "hfpatch ISP", "tokens": doc.numel(), "seconds_per_step": seconds,
                                             "tokens_per_s": doc.numel() / seconds,
                                             "first_step_loss": runtime.global_loss(loss, runtime.ParallelMode.TENSOR),
                                             "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30})
        del model
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        runtime.destroy()
    doc = torch.randint(3, cfg.vocab_size, (args.tokens_per_gpu * world,), generator=torch.Generator().manual_seed(7))
    try:
        torch.cuda.reset_peak_memory_stats()
        seconds, loss = context_parallel_run(state, cfg, doc, args)
        results["long_document"].append({"method": "torch context_parallel (ring, sdpa)", "tokens": doc.numel(),
                                         "seconds_per_step": seconds, "tokens_per_s": doc.numel() / seconds,
                                         "first_step_loss": float(loss),
                                         "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30})
    except Exception as exc:  # reported, not fatal: the comparison row says why it is missing
        results["long_document"].append({"method": "torch context_parallel (ring, sdpa)", "error": repr(exc)[:300]})
    base = results["weak_scaling"][0].get("tokens_per_s_per_gpu")
    for row in results["weak_scaling"]:
        if base and "tokens_per_s_per_gpu" in row:
            row["efficiency"] = row["tokens_per_s_per_gpu"] / base
    results["card"] = torch.cuda.get_device_name()
    results["torch"] = torch.__version__
    if dist.get_rank() == 0:
        print(json.dumps(results, indent=2), flush=True)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
