"""Packing benchmark, one GPU, contenders side by side in one run on one card.

Llama-2 architecture at ~1B parameters, bf16, fwd+bwd on the same documents for every
contender (equal real tokens per step):
  padded        unpatched transformers, micro-batches of 8 documents padded to the longest, sdpa
  hf_padfree    unpatched transformers, one row with position_ids resets (its own packed-sequence
                detection), attention_mask=None, flex_attention (the best it has without flash-attn)
  hfpatch       the patched model, one packed row, cu_seqlens, hfpatch.runtime's varlen backend (auto)
  hfpatch_compiled      the same (auto backend) with each decoder layer's MLP and RMSNorms torch.compile'd
                        (attention stays eager: its per-step max_seqlen would recompile a compiled layer)
Document lengths: log-normal, median 350 tokens, sigma 1.0, clipped to [16, 4096].
Also reports MFU of the hfpatch contenders (FLOPs = 6 N tokens + causal attention).

    python scripts/bench_packing.py --out docs/bench/packing.json
    python scripts/bench_packing.py --out docs/bench/mfu.json --tokens-per-step 8192 \
        --contenders hfpatch,hfpatch_compiled
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

H100_BF16_PEAK = 989e12  # dense bf16 TFLOP/s of an H100 SXM, the MFU denominator


def documents(n_tokens: int, vocab: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    docs, total = [], 0
    while total < n_tokens:
        length = int(min(max(math.exp(math.log(350) + torch.randn(1, generator=gen).item()), 16), 4096))
        length = min(length, n_tokens - total) if n_tokens - total >= 16 else length
        docs.append(torch.randint(3, vocab, (length,), generator=gen))
        total += length
    return docs


def config(args):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.heads, max_position_embeddings=8192, torch_dtype="bfloat16")


def token_losses(logits, labels):
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")


def shifted(doc: torch.Tensor) -> torch.Tensor:
    return torch.cat([doc[1:], torch.tensor([-100])])


def step_padded(model, docs, n_targets, micro=8):
    loss_total = 0.0
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
        ids, labels, mask = ids.cuda(), labels.cuda(), mask.cuda()
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        loss = token_losses(logits, labels) / n_targets
        loss.backward()
        loss_total += loss.item()
    return loss_total


def packed_inputs(docs):
    ids = torch.cat(docs)[None].cuda()
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None].cuda()
    labels = torch.cat([shifted(d) for d in docs])[None].cuda()
    return ids, positions, labels


def step_hf_padfree(model, docs, n_targets):
    ids, positions, labels = packed_inputs(docs)
    logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    loss = token_losses(logits, labels) / n_targets
    loss.backward()
    return loss.item()


def step_hfpatch(model, docs, n_targets):
    from hfpatch import runtime

    ids, positions, labels = packed_inputs(docs)
    lengths = torch.tensor([0] + [len(d) for d in docs])
    cu = torch.cumsum(lengths, 0).to(torch.int32).cuda()
    with runtime.packed_batch(cu, max(len(d) for d in docs)):
        logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    loss = token_losses(logits, labels) / n_targets
    loss.backward()
    return loss.item()


def measure(name, model, step, batches, warmup):
    model.zero_grad(set_to_none=True)
    first_loss = step(model, *batches[0])
    for batch in batches[1:warmup]:
        model.zero_grad(set_to_none=True)
        step(model, *batch)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    tokens = 0
    for docs, n_targets in batches[warmup:]:
        model.zero_grad(set_to_none=True)
        step(model, docs, n_targets)
        tokens += sum(len(d) for d in docs)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {"contender": name, "real_tokens_per_s": tokens / seconds, "seconds": seconds, "real_tokens": tokens,
              "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "first_step_loss": first_loss}
    print(json.dumps(result), flush=True)
    return result


def attention_flops(docs, layers, hidden):
    # causal: half of QK^T and PV, fwd (2 matmuls x 2 flops) + bwd (2.5x fwd)
    return sum(len(d) ** 2 for d in docs) * hidden * layers * 2 * 3.5


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens-per-step", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--contenders", default="padded,hf_padfree,hfpatch")
    args = parser.parse_args()

    import transformers

    from hfpatch import modeling, runtime, zoo

    cfg = config(args)
    batches = []
    for step in range(args.steps + args.warmup):
        docs = documents(args.tokens_per_step, cfg.vocab_size, seed=step)
        batches.append((docs, sum(len(d) - 1 for d in docs)))
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    n_params = sum(p.numel() for p in reference.parameters())
    del reference
    results = []
    for name in args.contenders.split(","):
        if name.startswith("hfpatch"):
            cls = modeling.model_class(zoo.resolve("llama2"))
            model = cls(cfg)
            step = step_hfpatch
            if name == "hfpatch_compiled":
                for layer in model.model.layers:
                    for part in (layer.mlp, layer.input_layernorm, layer.post_attention_layernorm):
                        part.compile()
        else:
            cfg._attn_implementation = "sdpa" if name == "padded" else "flex_attention"
            model = transformers.LlamaForCausalLM(cfg)
            step = step_padded if name == "padded" else step_hf_padfree
        model.load_state_dict(state)
        model = model.to(torch.bfloat16).cuda().train()
        try:
            results.append(measure(name, model, step, batches, args.warmup))
        except torch.OutOfMemoryError as exc:
            results.append({"contender": name, "error": f"out of memory: {str(exc)[:200]}"})
        except Exception as exc:  # an optional contender (compile) that cannot run is reported, not fatal
            if name == "hfpatch":
                raise
            results.append({"contender": name, "error": repr(exc)[:300]})
        del model
        torch.cuda.empty_cache()
    by_name = {r["contender"]: r for r in results if "error" not in r}
    flops = 6 * n_params * sum(len(d) for docs, _ in batches[args.warmup:] for d in docs) + sum(
        attention_flops(d, args.layers, args.hidden) for d, _ in batches[args.warmup:])
    for name, r in by_name.items():
        if name.startswith("hfpatch"):
            r["mfu"] = flops / r["seconds"] / H100_BF16_PEAK
    report = {
        "card": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
        "attention_backend": runtime.resolve_backend(None, torch.empty(1, 1, 1, 64, dtype=torch.bfloat16, device="cuda")),
        "params": n_params, "config": vars(args), "results": results,
    }
    if "padded" in by_name:
        for r in by_name.values():
            r["speedup_vs_padded"] = r["real_tokens_per_s"] / by_name["padded"]["real_tokens_per_s"]
            r["loss_diff_vs_padded"] = abs(r["first_step_loss"] - by_name["padded"]["first_step_loss"])
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2, default=str)
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
