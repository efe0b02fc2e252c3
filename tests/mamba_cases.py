"""Shared pieces of the patched-Mamba equivalence tests (also run inside gloo workers)."""


import torch
import transformers

from hfpatch import modeling, runtime, zoo

# Packs of 24 tokens (23 + 1 padding for "halo"): with sp=2 the rank boundary is at token 12.
PACKS = {
    "spans": [5, 9, 3, 7],  # document [5, 14) spans the boundary with a full conv halo before it
    "halo": [10, 6, 7],  # document [10, 16) starts 2 tokens before the boundary: part of the halo is its own
    "starts at boundary": [4, 8, 5, 7],  # document [12, 17) starts exactly at the boundary
}
UNPACKED_ROWS, UNPACKED_LEN = 2, 24
# InternEvo's std=0.02 on a 32-wide model leaves the selective scan's contribution near 1e-8 (the D skip
# dominates), so a wrong state would hide below any tolerance; std=0.2 makes conv and scan both matter.
INIT_STD = 0.2  # ISP without packing: each row one sequence, split over the ranks

# upstream casts A_log, D and dt_proj.bias to float32 (`.float()`), so their gradients are rounded to float32
# after a reduction over the tokens; a differently split reduction (per document, per rank) moves them by a
# few float32 ulps of the partial sums (measured: <= 4e-8 x the tensor's largest gradient). Every other
# gradient is compared at float64 precision.
FLOAT32_GRADS = ("A_log", ".D", "dt_proj.bias")


def documents(lengths, vocab: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=generator).tolist() for n in lengths]


def unpacked_batch(vocab: int, seed: int = 1):
    """Rows that are one sequence each, with their shifted labels (-100 at the end)."""
    ids = torch.randint(1, vocab, (UNPACKED_ROWS, UNPACKED_LEN), generator=torch.Generator().manual_seed(seed))
    labels = torch.full_like(ids, runtime.IGNORE_INDEX)
    labels[:, :-1] = ids[:, 1:]
    return ids, labels


def tiny_config(**overrides):
    return modeling.tiny_config(zoo.resolve("mamba"), **overrides)


def patched_and_reference(seed: int = 0, **overrides):
    """The patched model and transformers' own unpatched model, same float64 weights."""
    config = tiny_config(**overrides)
    torch.manual_seed(seed)
    patched = modeling.model_class(zoo.resolve("mamba"))(config).double()
    patched.reset_parameters(std=INIT_STD)
    reference = transformers.MambaForCausalLM(config).double()
    reference.load_state_dict(patched.state_dict())
    return patched, reference


def lm_logits(model, **inputs):
    """float64 logits: MambaForCausalLM casts its logits to float32 (`.float()`), so go around that cast."""
    return model.lm_head(model.backbone(**inputs).last_hidden_state)


def grad_tolerance(name: str, reference: torch.Tensor) -> dict:
    if any(part in name for part in FLOAT32_GRADS):
        return {"atol": max(1e-10, 1e-6 * reference.abs().max().item()), "rtol": 0}
    return {"atol": 1e-10, "rtol": 0}


def isp_worker(rank: int, world: int):
    """One ISP rank: every pack (and an unpacked batch) forward/backward; rank 0 returns the results."""
    torch.set_num_threads(1)
    runtime.initialize(sequence_parallel=world, backend="gloo")
    try:
        model, _ = patched_and_reference()
        sp_rank = runtime.gpc.get_local_rank(runtime.ParallelMode.TENSOR)
        group = runtime.gpc.get_group(runtime.ParallelMode.TENSOR)
        vocab = model.config.vocab_size
        results = {}
        cases = {name: runtime.build_packed_row(documents(lengths, vocab)) for name, lengths in PACKS.items()}
        ids, labels = unpacked_batch(vocab)
        cases["unpacked"] = {"input_ids": ids, "labels": labels}
        for name, case in cases.items():
            model.zero_grad(set_to_none=True)
            if name == "unpacked":
                local = {k: v[:, sp_rank * UNPACKED_LEN // world:(sp_rank + 1) * UNPACKED_LEN // world]
                         for k, v in case.items()}
                logits = lm_logits(model, input_ids=local["input_ids"])
                model_loss = model(input_ids=local["input_ids"], labels=local["labels"]).loss
            else:
                local = runtime.shard_for_sequence_parallel(case, sp_rank, world)
                with runtime.packed_batch(local["cu_seqlens"], local["max_seqlen"]):
                    logits = lm_logits(model, input_ids=local["input_ids"])
                    model_loss = model(input_ids=local["input_ids"], labels=local["labels"]).loss
            loss = runtime.causal_lm_loss(logits, local["labels"])
            loss.backward()
            grads = {}
            for key, param in model.named_parameters():
                torch.distributed.all_reduce(param.grad)  # each ISP rank holds part of the replicated weights' grads
                grads[key] = param.grad.numpy()  # plain pickle: shared-memory tensors die with the worker
            parts = [torch.empty_like(logits) for _ in range(world)]
            torch.distributed.all_gather(parts, logits.detach().contiguous(), group=group)
            results[name] = {
                "loss": runtime.global_loss(loss),
                "model_loss": runtime.global_loss(model_loss),
                "logits": torch.cat(parts, dim=1).numpy(),
                "grads": grads,
            }
        if rank == 0:
            return results
    finally:
        runtime.destroy()
