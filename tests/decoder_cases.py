"""Shared pieces of the Qwen2 / Mixtral equivalence tests (also run inside gloo workers).

Each zoo row is compared with transformers' own, unpatched class holding the same float64 weights.
"""


import torch
import transformers

from hfpatch import modeling, runtime, zoo

# 51 tokens: odd, so sharding for sp=2 appends a one-token padding segment to the pack
DOC_LENGTHS = [6, 14, 3, 19, 9]
REFERENCE_CLASS = {"qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM"}


def documents(vocab: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=generator).tolist() for n in DOC_LENGTHS]


def tiny_config(name: str, **overrides):
    return modeling.tiny_config(zoo.resolve(name), **overrides)


def patched_and_reference(name: str, seed: int = 0, **overrides):
    """The patched model and transformers' unpatched one, same float64 weights.

    ``reset_parameters`` zeroes biases and leaves norm weights at one; both are then drawn at
    random so that Qwen2's q/k/v biases and the norms take part in every comparison."""
    if name == "mixtral":
        overrides = {"experts_implementation": "eager", **overrides}  # grouped_mm has no float64 kernel
    config = tiny_config(name, **overrides)
    torch.manual_seed(seed)
    patched = modeling.model_class(zoo.resolve(name))(config).double()
    patched.reset_parameters()
    with torch.no_grad():
        for key, param in patched.named_parameters():
            if param.ndim == 1:
                param.copy_(torch.randn_like(param) * (0.3 if key.endswith("bias") else 0.1) + (0 if key.endswith("bias") else 1))
    reference = getattr(transformers, REFERENCE_CLASS[name])(config).double()
    reference.load_state_dict(patched.state_dict())
    return patched, reference


def real_token_mask(batch: dict, num_real: int) -> torch.Tensor:
    """1 for document tokens, 0 for the pack's padding, over a (possibly padded) pack ``[1, L]``."""
    return (torch.arange(batch["input_ids"].shape[-1]) < num_real).long()[None]


def sharded_pack(config, sp_rank: int, sp: int):
    """This ISP rank's slice of the shared pack plus its real-token mask slice."""
    row = runtime.build_packed_row(documents(config.vocab_size))
    full = runtime.pad_pack_to_multiple(row.as_batch(), sp)
    mask = real_token_mask(full, row.num_real_tokens)
    local = runtime.shard_for_sequence_parallel(row, sp_rank, sp)
    n = local["input_ids"].shape[-1]
    return local, mask[:, sp_rank * n : (sp_rank + 1) * n]


def training_loss(model, batch: dict, mask: torch.Tensor, moe: bool):
    """(loss for backward, aux share or None, model output): the token-weighted runtime loss plus,
    for a MoE, ``router_aux_loss_coef`` times this rank's share of the pack's aux loss."""
    with runtime.packed_batch(batch["cu_seqlens"], batch["max_seqlen"]):
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                    **(dict(attention_mask=mask, labels=batch["labels"], output_router_logits=True) if moe else {}))
    loss = runtime.causal_lm_loss(out.logits, batch["labels"])
    if moe:
        loss = loss + model.config.router_aux_loss_coef * out.aux_loss
    return loss, (out.aux_loss if moe else None), out


def isp_worker(rank: int, world: int, sp: int, name: str, overrides: dict):
    """One ISP rank: forward/backward its slice of the shared pack, send totals and summed grads to rank 0."""
    torch.set_num_threads(1)
    runtime.initialize(sequence_parallel=sp, backend="gloo")
    try:
        model, _ = patched_and_reference(name, **overrides)
        moe = name == "mixtral"
        local, mask = sharded_pack(model.config, runtime.gpc.get_local_rank(runtime.ParallelMode.TENSOR), sp)
        loss, aux, out = training_loss(model, local, mask, moe)
        loss.backward()
        grads = {}
        for key, param in model.named_parameters():
            torch.distributed.all_reduce(param.grad)  # ISP ranks hold partial sums of the replicated weights' grads
            grads[key] = param.grad.numpy()  # plain pickle: shared-memory tensors die with the worker
        totals = {"loss": runtime.global_loss(loss)}
        if moe:
            totals["aux"] = runtime.global_loss(aux)
            totals["model_loss"] = runtime.global_loss(out.loss)
        if rank == 0:
            return (totals, grads)
    finally:
        runtime.destroy()
