"""Shared pieces of the patched-Flux equivalence tests (also run inside gloo workers).

``pack_samples`` / ``shard_pack`` / ``flow_matching_loss`` are the packing contract a trainer follows
(see huggingface_model/flux/README.md): a pack lays its samples back to back, each sample its text tokens
then its image tokens, one non-causal cu_seqlens segment; per-sample inputs (timestep, pooled text,
txt_seqlens) have one entry per segment; ISP ranks take contiguous slices of the pack.
"""


import diffusers
import torch

from hfpatch import modeling, runtime, zoo

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


def image_ids(height: int, width: int) -> torch.Tensor:
    """Flux's latent position ids: (0, row, column) per token, row-major (FluxPipeline's layout)."""
    ids = torch.zeros(height, width, 3, dtype=torch.float64)
    ids[..., 1] = torch.arange(height, dtype=torch.float64)[:, None]
    ids[..., 2] = torch.arange(width, dtype=torch.float64)[None, :]
    return ids.reshape(height * width, 3)


def make_samples(config, shapes=SAMPLES, seed: int = 0) -> list[dict]:
    """Synthetic rectified-flow training samples: x_t = (1 - t) x0 + t noise, target velocity noise - x0."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    samples = []
    for height, width, text in shapes:
        x0, noise = randn(height * width, config.in_channels), randn(height * width, config.in_channels)
        t = torch.rand((), generator=generator, dtype=torch.float64)
        samples.append({
            "latents": (1 - t) * x0 + t * noise,
            "target": noise - x0,
            "timestep": t,
            "encoder_hidden_states": randn(text, config.joint_attention_dim),
            "pooled_projections": randn(config.pooled_projection_dim),
            "img_ids": image_ids(height, width),
            "txt_ids": torch.zeros(text, 3, dtype=torch.float64),
        })
    return samples


def pack_samples(samples: list[dict], multiple: int = 1) -> dict:
    """One packed row: per token (text and image streams, each in pack order) and per segment fields.

    The pack is padded to a multiple of ``multiple`` (the sequence-parallel size) with one padding segment
    of zero image tokens (no text, timestep 0, zero pooled text) that the loss mask excludes.
    """
    total = sum(s["latents"].shape[0] + s["txt_ids"].shape[0] for s in samples)
    pad = (-total) % multiple
    if pad:
        first = samples[0]
        samples = [*samples, {
            "latents": first["latents"].new_zeros(pad, first["latents"].shape[1]),
            "target": first["target"].new_zeros(pad, first["target"].shape[1]),
            "timestep": first["timestep"].new_zeros(()),
            "encoder_hidden_states": first["encoder_hidden_states"].new_zeros(0, first["encoder_hidden_states"].shape[1]),
            "pooled_projections": torch.zeros_like(first["pooled_projections"]),
            "img_ids": first["img_ids"].new_zeros(pad, 3),
            "txt_ids": first["txt_ids"].new_zeros(0, 3),
            "padding": True,
        }]
    bounds, txt_slots, img_slots, mask = [0], [], [], []
    for s in samples:
        text, image = s["txt_ids"].shape[0], s["latents"].shape[0]
        txt_slots.append(torch.arange(bounds[-1], bounds[-1] + text))
        img_slots.append(torch.arange(bounds[-1] + text, bounds[-1] + text + image))
        mask.append(torch.full((image,), not s.get("padding", False)))
        bounds.append(bounds[-1] + text + image)
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    return {
        "hidden_states": torch.cat([s["latents"] for s in samples])[None],
        "encoder_hidden_states": torch.cat([s["encoder_hidden_states"] for s in samples])[None],
        "img_ids": torch.cat([s["img_ids"] for s in samples]),
        "txt_ids": torch.cat([s["txt_ids"] for s in samples]),
        "target": torch.cat([s["target"] for s in samples])[None],
        "loss_mask": torch.cat(mask)[None],
        "img_slots": torch.cat(img_slots),
        "txt_slots": torch.cat(txt_slots),
        "timestep": torch.stack([s["timestep"] for s in samples]),
        "pooled_projections": torch.stack([s["pooled_projections"] for s in samples]),
        "txt_seqlens": torch.tensor([s["txt_ids"].shape[0] for s in samples]),
        "cu_seqlens": torch.tensor(bounds, dtype=torch.int32),
        "max_seqlen": max(lengths),
    }


_IMAGE_KEYS = ("hidden_states", "img_ids", "target", "loss_mask", "img_slots")
_TEXT_KEYS = ("encoder_hidden_states", "txt_ids", "txt_slots")
_ROW_KEYS = ("hidden_states", "target", "loss_mask", "encoder_hidden_states")  # [1, tokens, ...]


def shard_pack(pack: dict, rank: int, sp: int) -> dict:
    """This ISP rank's contiguous slice [rank * n, (rank + 1) * n) of the pack, split back into its text and
    image tokens; per-segment fields and cu_seqlens stay global."""
    total = int(pack["cu_seqlens"][-1])
    if total % sp:
        raise ValueError(f"a pack of {total} tokens does not split over {sp} ranks; pack_samples(multiple={sp})")
    lo, hi = rank * total // sp, (rank + 1) * total // sp
    local = dict(pack)
    for keys, slots in ((_IMAGE_KEYS, pack["img_slots"]), (_TEXT_KEYS, pack["txt_slots"])):
        keep = (slots >= lo) & (slots < hi)
        for key in keys:
            local[key] = pack[key][:, keep] if key in _ROW_KEYS else pack[key][keep]
    return local


def forward_packed(model, pack: dict) -> torch.Tensor:
    """Velocity prediction for the pack's (this rank's) image tokens, [1, image tokens, channels]."""
    with runtime.packed_batch(pack["cu_seqlens"], pack["max_seqlen"]):
        return model(
            hidden_states=pack["hidden_states"],
            encoder_hidden_states=pack["encoder_hidden_states"],
            pooled_projections=pack["pooled_projections"],
            timestep=pack["timestep"],
            img_ids=pack["img_ids"],
            txt_ids=pack["txt_ids"],
            txt_seqlens=pack["txt_seqlens"],
        ).sample


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Token-weighted MSE: this rank's share of sum over valid image tokens / (all valid tokens x channels),
    so ISP ranks' losses (and grads) add up to the single-process ones."""
    err = ((pred - target) ** 2).sum(-1) * mask
    return err.sum() / (num_tokens * pred.shape[-1])


def batch_inputs(samples: list[dict]) -> dict:
    """The unpacked layout: samples of one shape stacked in a batch (upstream's own API)."""
    return {
        "hidden_states": torch.stack([s["latents"] for s in samples]),
        "encoder_hidden_states": torch.stack([s["encoder_hidden_states"] for s in samples]),
        "pooled_projections": torch.stack([s["pooled_projections"] for s in samples]),
        "timestep": torch.stack([s["timestep"] for s in samples]),
        "img_ids": samples[0]["img_ids"],
        "txt_ids": samples[0]["txt_ids"],
    }


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
