"""Shared pieces of the patched-Flux equivalence tests (also run inside gloo workers).

``pack_samples`` / ``shard_pack`` / ``flow_matching_loss`` (from hfpatch.train.diffusion) are the packing contract a trainer follows
(see huggingface_model/flux/README.md): a pack lays its samples back to back, each sample its text tokens
then its image tokens, one non-causal cu_seqlens segment; per-sample inputs (timestep, pooled text,
txt_seqlens) have one entry per segment; ISP ranks take contiguous slices of the pack.
"""


import diffusers
import torch

from hfpatch import modeling, runtime, zoo
# the packing contract is the trainer's own
from hfpatch.train.diffusion import (
    batch_inputs, flow_matching_loss, forward_packed, image_ids, noised_sample, pack_samples, shard_pack,
)

# (latent height, latent width, text tokens) of the two packed samples: two resolutions, two text lengths;
# 16 + 5 + 12 + 4 = 37 tokens, so sp=2 adds a one-token padding segment and a slice boundary inside sample 0
SAMPLES = [(4, 4, 5), (2, 6, 4)]
BATCH_SHAPE = (4, 4, 4)  # unpacked ISP: two samples of one shape, [text; image] = 20 tokens a row


def entry():
    return zoo.resolve("flux")


def patched_and_reference(seed: int = 0, **overrides):
    """The patched model and diffusers' own unpatched model, same float64 weights (diffusers' random init:
    non-zero biases and AdaLN gates, so every path carries signal)."""
    config = {**entry().test_config, **overrides}
    torch.manual_seed(seed)
    patched = modeling.model_class(entry()).from_config(config).double()
    reference = diffusers.FluxTransformer2DModel.from_config(config).double()
    reference.load_state_dict(patched.state_dict())
    return patched, reference


def make_samples(config, shapes=SAMPLES, seed: int = 0) -> list[dict]:
    """Synthetic rectified-flow training samples: x_t = (1 - t) x0 + t noise, target velocity noise - x0."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    samples = []
    for height, width, text in shapes:
        x0, noise = randn(height * width, config.in_channels), randn(height * width, config.in_channels)
        t = torch.rand((), generator=generator, dtype=torch.float64)
        samples.append(noised_sample(x0, noise, t, randn(text, config.joint_attention_dim),
                                     randn(config.pooled_projection_dim), image_ids(height, width)))
    return samples


def shard_batch(batch: dict, rank: int, sp: int) -> dict:
    """Unpacked ISP: this rank's contiguous slice of every row's joint [text; image] sequence."""
    text, image = batch["txt_ids"].shape[0], batch["img_ids"].shape[0]
    if (text + image) % sp:
        raise ValueError(f"{text} + {image} tokens a row do not split over {sp} ranks")
    lo, hi = rank * (text + image) // sp, (rank + 1) * (text + image) // sp
    t0, t1 = min(lo, text), min(hi, text)
    i0, i1 = max(lo, text) - text, max(hi, text) - text
    return {
        **batch,
        "encoder_hidden_states": batch["encoder_hidden_states"][:, t0:t1],
        "txt_ids": batch["txt_ids"][t0:t1],
        "hidden_states": batch["hidden_states"][:, i0:i1],
        "img_ids": batch["img_ids"][i0:i1],
    }


def isp_worker(rank: int, world: int):
    """One ISP rank: the packed and the unpacked (batched) layouts, forward and backward; rank 0 returns
    the gathered image-token outputs, the losses and the all-reduced grads."""
    torch.set_num_threads(1)
    runtime.initialize(sequence_parallel=world, backend="gloo")
    try:
        model, _ = patched_and_reference()
        results = {}
        pack = pack_samples(make_samples(model.config), multiple=world)
        batch = batch_inputs(make_samples(model.config, [BATCH_SHAPE] * 2, seed=1))
        for layout in ("packed", "batched"):
            model.zero_grad()
            if layout == "packed":
                local = shard_pack(pack, rank, world)
                out = forward_packed(model, local)
                loss = flow_matching_loss(out, local["target"], local["loss_mask"], int(pack["loss_mask"].sum()))
            else:
                local = shard_batch(batch, rank, world)
                out = model(**local).sample
                loss = (out**2).sum() / batch["hidden_states"].numel()
            loss.backward()
            outs = [None] * world
            torch.distributed.all_gather_object(outs, out.detach().numpy())
            grads = {}
            for key, param in model.named_parameters():
                torch.distributed.all_reduce(param.grad)  # ISP ranks hold partial sums of the replicated weights' grads
                grads[key] = param.grad.numpy().copy()  # plain pickle: shared-memory tensors die with the worker
            results[layout] = (outs, runtime.global_loss(loss), grads)
        if rank == 0:
            return results
    finally:
        runtime.destroy()
