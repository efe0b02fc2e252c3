"""Flux (diffusion-transformer) training: packed variable-resolution samples, flow matching.

The packing contract (``pack_samples``, ``shard_pack``, ``forward_packed``, ``flow_matching_loss``)
is the model's, in :mod:`hfpatch.runtime.latent_packing`; this module is the trainer's data and loss.

The embedded default data set is synthetic (no VAE or T5 needed): latents at a few
resolutions whose pattern depends on a class, and text embeddings of varying length
that name the class.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from hfpatch.runtime.distributed import to_device
from hfpatch.runtime.latent_packing import flow_matching_loss, forward_packed, image_ids, noised_sample, pack_samples, shard_pack

from .batches import BatchStats
from .dataset import PackedDataset, greedy_rows
from .errors import DataError


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


def move_inputs(batch: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Tensors to ``device``, floating ones in ``dtype`` except the rotary ids, which keep float32 (bf16 would
    round large positions)."""
    def move(key, value):
        if not torch.is_tensor(value):
            return value
        cast = value.is_floating_point() and key not in ("img_ids", "txt_ids")
        return to_device(value, device, dtype if cast else None)

    return {key: move(key, value) for key, value in batch.items()}


def flux_loss(model: torch.nn.Module, batch: Mapping[str, Any], num_targets: int, device: torch.device,
              dtype: torch.dtype) -> torch.Tensor:
    """This rank's share of the step's flow-matching loss (``num_targets``: the step's global image tokens)."""
    local = move_inputs(batch, device, dtype)
    pred = forward_packed(model, local)
    return flow_matching_loss(pred.float() if dtype == torch.bfloat16 else pred, local["target"], local["loss_mask"], num_targets)
