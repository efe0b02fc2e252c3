"""Shared pieces of the patched-Llama equivalence tests (also run inside gloo workers)."""


import torch
import transformers

from hfpatch import modeling, runtime, zoo

DOC_LENGTHS = [7, 13, 3, 20, 9]


def documents(vocab: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=generator).tolist() for n in DOC_LENGTHS]


def tiny_config(name: str = "llama2", **overrides):
    return modeling.tiny_config(zoo.resolve(name), **overrides)


def patched_and_reference(name: str = "llama2", seed: int = 0, **overrides):
    """The patched model and transformers' own unpatched model, same float64 weights."""
    config = tiny_config(name, **overrides)
    torch.manual_seed(seed)
    patched = modeling.model_class(zoo.resolve(name))(config).double()
    patched.reset_parameters()
    reference = transformers.LlamaForCausalLM(config).double()
    reference.load_state_dict(patched.state_dict())
    return patched, reference


def isp_worker(rank: int, world: int, sp: int, name: str, overrides: dict):
    """One ISP rank: forward/backward the shared pack, return loss and summed grads to rank 0."""
    torch.set_num_threads(1)
    runtime.initialize(sequence_parallel=sp, backend="gloo")
    try:
        model, _ = patched_and_reference(name, **overrides)
        row = runtime.build_packed_row(documents(model.config.vocab_size))
        local = runtime.shard_for_sequence_parallel(row, runtime.gpc.get_local_rank(runtime.ParallelMode.TENSOR), sp)
        with runtime.packed_batch(local["cu_seqlens"], local["max_seqlen"]):
            logits = model(input_ids=local["input_ids"], position_ids=local["position_ids"]).logits
        loss = runtime.causal_lm_loss(logits, local["labels"])
        loss.backward()
        grads = {}
        for key, param in model.named_parameters():
            torch.distributed.all_reduce(param.grad)  # ISP ranks hold partial sums of the replicated weights' grads
            grads[key] = param.grad.numpy()  # plain pickle: shared-memory tensors die with the worker
        total = runtime.global_loss(loss)
        if rank == 0:
            return (total, grads)
    finally:
        runtime.destroy()
