"""Shared pieces of the patched-LLaVA equivalence tests (also run inside gloo workers).

A LLaVA sample is a token sequence whose image placeholders are already expanded (one
image token per image feature, as transformers 5.x processors emit them) plus its images.
"""

import contextlib
import copy

import torch
import transformers

from hfpatch import modeling, runtime, zoo
from hfpatch.train.multimodal import Sample, pack_llava_samples  # the tests' packing is the trainer's

IGNORE_INDEX = runtime.IGNORE_INDEX


def sample_labels(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """transformers' (unshifted) labels for one sample alone: the ids, -100 on image tokens."""
    return input_ids.masked_fill(input_ids == image_token_id, IGNORE_INDEX)


# (text before the image, number of images, text after) per sample: different text lengths
LAYOUTS = [(3, 1, 9), (5, 2, 2), (0, 1, 14)]


def samples(config, seed: int = 0, layouts=LAYOUTS, dtype=torch.float64) -> list[Sample]:
    generator = torch.Generator().manual_seed(seed)
    image_token = config.image_token_id
    vocab = config.text_config.vocab_size
    per_image = config.image_seq_length
    size = config.vision_config.image_size
    out = []
    for before, images, after in layouts:
        text = torch.randint(1, vocab, (before + after,), generator=generator)
        text[text == image_token] = 1
        ids = text[:before].tolist() + [image_token] * (per_image * images) + text[before:].tolist()
        pixels = torch.randn(images, 3, size, size, generator=generator, dtype=dtype) if images else None
        out.append(Sample(ids, pixels))
    return out


def tiny_config(**text_overrides):
    entry = zoo.resolve("llava")
    text_config = {**entry.test_config["text_config"], **text_overrides}
    return modeling.tiny_config(entry, text_config=text_config)


def patched_and_reference(seed: int = 0, **text_overrides):
    """The patched model and transformers' own unpatched model, same float64 weights, separate configs."""
    config = tiny_config(**text_overrides)
    torch.manual_seed(seed)
    patched = modeling.model_class(zoo.resolve("llava"))(config).double()
    patched.reset_parameters()
    reference = transformers.LlavaForConditionalGeneration(copy.deepcopy(config)).double()
    reference.load_state_dict(patched.state_dict())
    return patched, reference


# Two unpacked rows of the same length (16) whose image blocks straddle the middle (the sp=2 split)
ROW_LAYOUTS = [(6, 1, 6), (2, 2, 6)]


def unpacked_rows(config) -> dict:
    """Equal-length rows, one sample each (no padding), with transformers-style shifted labels."""
    rows = samples(config, seed=2, layouts=ROW_LAYOUTS)
    input_ids = torch.tensor([s.input_ids for s in rows])
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = sample_labels(input_ids, config.image_token_id)[:, 1:]
    position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels,
            "pixel_values": torch.cat([s.pixel_values for s in rows])}


def isp_worker(rank: int, world: int, sp: int, layout: str, overrides: dict):
    """One ISP rank: forward/backward its slice, return the loss, summed grads and gathered logits to rank 0.

    ``layout`` "packed": one packed row of ``samples`` (varlen attention); "rows": ``unpacked_rows``
    (batched attention, no pack published)."""
    torch.set_num_threads(1)
    runtime.initialize(sequence_parallel=sp, backend="gloo")
    try:
        model, _ = patched_and_reference(**overrides)
        sp_rank = runtime.gpc.get_local_rank(runtime.ParallelMode.TENSOR)
        if layout == "packed":
            batch = pack_llava_samples(samples(model.config), model.config.image_token_id)
            local = runtime.shard_for_sequence_parallel(batch, sp_rank, sp)
            pack = runtime.packed_batch(local["cu_seqlens"], local["max_seqlen"])
        else:
            batch = unpacked_rows(model.config)
            n = batch["input_ids"].shape[1] // sp
            local = {k: v[:, sp_rank * n:(sp_rank + 1) * n] if k != "pixel_values" else v for k, v in batch.items()}
            pack = contextlib.nullcontext()
        with pack:
            logits = model(input_ids=local["input_ids"], position_ids=local["position_ids"],
                           pixel_values=local["pixel_values"]).logits
            loss = runtime.causal_lm_loss(logits, local["labels"])
            loss.backward()
        grads = {}
        for key, param in model.named_parameters():
            if param.grad is None:  # CLIP's last layer: LLaVA reads the second-to-last
                continue
            # ISP ranks hold partial sums of the replicated weights' grads (vision tower included)
            torch.distributed.all_reduce(param.grad)
            grads[key] = param.grad.numpy()  # plain pickle: shared-memory tensors die with the worker
        pieces = [torch.empty_like(logits) for _ in range(sp)]
        torch.distributed.all_gather(pieces, logits.detach().contiguous())
        total = runtime.global_loss(loss)
        if rank == 0:
            return (total, grads, torch.cat(pieces, dim=1).numpy())
    finally:
        runtime.destroy()
