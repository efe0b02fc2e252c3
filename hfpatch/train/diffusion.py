"""Flux (diffusion-transformer) training: packed variable-resolution samples, flow matching.

``pack_samples`` / ``shard_pack`` / ``forward_packed`` / ``flow_matching_loss`` are the
packing contract of huggingface_model/flux/README.md: a pack lays its samples back to
back, each sample its text tokens then its image tokens, one non-causal cu_seqlens
segment; per-sample inputs (timestep, pooled text, txt_seqlens) have one entry per
segment; ISP ranks take contiguous slices of the pack.

The embedded default data set is synthetic (no VAE or T5 needed): latents at a few
resolutions whose pattern depends on a class, and text embeddings of varying length
that name the class.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from hfpatch import runtime

from .batches import BatchStats
from .dataset import PackedDataset, greedy_rows
from .errors import DataError


def image_ids(height: int, width: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Flux's latent position ids: (0, row, column) per token, row-major (FluxPipeline's layout)."""
    ids = torch.zeros(height, width, 3, dtype=dtype)
    ids[..., 1] = torch.arange(height, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(width, dtype=dtype)[None, :]
    return ids.reshape(height * width, 3)


def noised_sample(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor,
                  pooled_projections: torch.Tensor, img_ids: torch.Tensor) -> dict:
    """A rectified-flow training sample: x_t = (1 - t) x0 + t noise, target velocity noise - x0."""
    return {
        "latents": (1 - t) * x0 + t * noise,
        "target": noise - x0,
        "timestep": t,
        "encoder_hidden_states": encoder_hidden_states,
        "pooled_projections": pooled_projections,
        "img_ids": img_ids,
        "txt_ids": encoder_hidden_states.new_zeros(encoder_hidden_states.shape[0], 3),
    }


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


def forward_packed(model, pack: Mapping[str, Any]) -> torch.Tensor:
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
    return err.sum() / (max(int(num_tokens), 1) * pred.shape[-1])


# -- the trainer's data ------------------------------------------------------------------

# latent (height, width) of the synthetic samples: three resolutions
RESOLUTIONS = ((4, 4), (6, 4), (6, 6))
CLASSES = 8


@dataclass
class Latent:
    """A clean training sample: latent tokens x0 and its text conditioning."""

    x0: torch.Tensor  # [height * width, in_channels]
    height: int
    width: int
    encoder_hidden_states: torch.Tensor  # [text tokens, joint_attention_dim]
    pooled_projections: torch.Tensor  # [pooled_projection_dim]

    @property
    def num_tokens(self) -> int:
        return self.x0.shape[0] + self.encoder_hidden_states.shape[0]


def synthetic_latents(config: Mapping[str, Any], *, count: int, seq_len: int, seed: int) -> list[Latent]:
    """Latents whose per-channel pattern is set by a class, with text embeddings (3..12 tokens) built from
    that class's embedding plus noise, so the velocity is learnable from the text."""
    channels, text_dim, pooled_dim = config["in_channels"], config["joint_attention_dim"], config["pooled_projection_dim"]
    generator = torch.Generator().manual_seed(seed)
    class_text = torch.randn(CLASSES, text_dim, generator=generator)
    class_pooled = torch.randn(CLASSES, pooled_dim, generator=generator)
    class_pattern = torch.randn(CLASSES, 3, channels, generator=generator)
    shapes = [(h, w) for h, w in RESOLUTIONS if h * w + 12 <= seq_len]
    if not shapes:
        shortest = min(h * w for h, w in RESOLUTIONS) + 12
        raise DataError(f"seq_len={seq_len} is too short for the synthetic Flux latents (at least {shortest} tokens)")
    samples = []
    for _ in range(count):
        label = int(torch.randint(CLASSES, (), generator=generator))
        height, width = shapes[int(torch.randint(len(shapes), (), generator=generator))]
        ids = image_ids(height, width, torch.float32)
        # a constant, a vertical and a horizontal gradient per channel, plus a little noise
        basis = torch.stack([torch.ones(height * width), ids[:, 1] / max(height - 1, 1), ids[:, 2] / max(width - 1, 1)], -1)
        x0 = basis @ class_pattern[label] + 0.1 * torch.randn(height * width, channels, generator=generator)
        text = int(torch.randint(3, 13, (), generator=generator))
        samples.append(Latent(
            x0=x0, height=height, width=width,
            encoder_hidden_states=class_text[label] + 0.1 * torch.randn(text, text_dim, generator=generator),
            pooled_projections=class_pooled[label] + 0.1 * torch.randn(pooled_dim, generator=generator),
        ))
    return samples


def pack_latents(samples: Sequence[Latent], seq_len: int) -> PackedDataset:
    digest = hashlib.sha256(f"flux:{seq_len}".encode())
    for sample in samples:
        for tensor in (sample.x0, sample.encoder_hidden_states, sample.pooled_projections):
            digest.update(tensor.numpy().tobytes())
    sizes = [s.num_tokens for s in samples]
    return PackedDataset(rows=greedy_rows(samples, sizes, seq_len), seq_len=seq_len, num_documents=len(samples),
                         num_tokens=sum(sizes), fingerprint=digest.hexdigest()[:16])


def flux_stats(rows: Sequence[list[Latent]], seq_len: int) -> BatchStats:
    samples = [s for row in rows for s in row]
    return BatchStats(
        real_tokens=sum(s.num_tokens for s in samples), slots=len(rows) * seq_len,
        targets=sum(s.x0.shape[0] for s in samples),  # image tokens: the loss is over them
        attention_pairs=sum(s.num_tokens ** 2 for s in samples),
    )


def noised_samples(latents: Sequence[Latent], noise_seed: int) -> list[dict]:
    """The latents noised, in order: t ~ U(0, 1) and the noise drawn from ``noise_seed`` (the same on every
    ISP rank)."""
    generator = torch.Generator().manual_seed(noise_seed)
    samples = []
    for s in latents:
        noise = torch.randn(s.x0.shape, generator=generator)
        t = torch.rand((), generator=generator)
        samples.append(noised_sample(s.x0, noise, t, s.encoder_hidden_states, s.pooled_projections,
                                     image_ids(s.height, s.width, torch.float32)))
    return samples


def flux_micro_batch(rows: Sequence[list[Latent]], sp_rank: int, sp: int, *, noise_seed: int) -> dict[str, Any]:
    """The rows' samples noised (``noised_samples``), packed, and this ISP rank's slice of the pack."""
    samples = noised_samples([s for row in rows for s in row], noise_seed)
    return shard_pack(pack_samples(samples, multiple=sp), sp_rank, sp)


def batch_inputs(samples: list[dict]) -> dict:
    """The unpacked layout: samples of one shape stacked in a batch, the model's own (upstream) inputs."""
    return {
        "hidden_states": torch.stack([s["latents"] for s in samples]),
        "encoder_hidden_states": torch.stack([s["encoder_hidden_states"] for s in samples]),
        "pooled_projections": torch.stack([s["pooled_projections"] for s in samples]),
        "timestep": torch.stack([s["timestep"] for s in samples]),
        "img_ids": samples[0]["img_ids"],
        "txt_ids": samples[0]["txt_ids"],
    }


def move_inputs(batch: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Tensors to ``device``, floating ones in ``dtype`` except the rotary ids, which keep float32 (bf16 would
    round large positions)."""
    def move(key, value):
        if not torch.is_tensor(value):
            return value
        cast = value.is_floating_point() and key not in ("img_ids", "txt_ids")
        return value.to(device, dtype=dtype) if cast else value.to(device)

    return {key: move(key, value) for key, value in batch.items()}


def flux_loss(model: torch.nn.Module, batch: Mapping[str, Any], num_targets: int, device: torch.device,
              dtype: torch.dtype) -> torch.Tensor:
    """This rank's share of the step's flow-matching loss (``num_targets``: the step's global image tokens)."""
    local = move_inputs(batch, device, dtype)
    pred = forward_packed(model, local)
    return flow_matching_loss(pred.float() if dtype == torch.bfloat16 else pred, local["target"], local["loss_mask"], num_targets)
