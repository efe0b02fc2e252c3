"""The Flux packing contract (huggingface_model/flux/README.md), beside text packing.

A pack lays its samples back to back, each sample its text tokens then its image tokens, one
non-causal cu_seqlens segment; per-sample inputs (timestep, pooled text, txt_seqlens) have one
entry per segment; ISP ranks take contiguous slices of the pack.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .context import packed_batch


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
    with packed_batch(pack["cu_seqlens"], pack["max_seqlen"]):
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
