"""The LLaVA packing contract (huggingface_model/llava_hf/llava_1_5_7b_hf/README.md), beside text packing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .loss import IGNORE_INDEX
from .packing import build_packed_row


@dataclass
class Sample:
    input_ids: list[int]
    pixel_values: torch.Tensor | None  # [images, 3, H, W] in the order of the sample's image blocks


def pack_llava_samples(samples: Sequence[Sample], image_token_id: int, seq_len: int | None = None, pad_id: int = 0) -> dict:
    """One packed row (batch dim 1) of LLaVA samples, in order.

    ``input_ids`` / ``position_ids`` / ``cu_seqlens`` / ``max_seqlen`` come from
    :func:`hfpatch.runtime.build_packed_row` (positions restart per sample, the label
    of a sample's last token is -100). Labels whose target is an image token are -100
    too: no loss on image tokens. ``pixel_values`` are all the row's images, in row
    order, so the model's merge (``masked_scatter`` over the image tokens) fills each
    sample with its own images. The dict shards with
    :func:`hfpatch.runtime.shard_for_sequence_parallel` (pixel_values pass through:
    every ISP rank gets all of the row's images).
    """
    row = build_packed_row([s.input_ids for s in samples], seq_len=seq_len, pad_id=pad_id)
    batch = row.as_batch()
    batch["labels"] = batch["labels"].masked_fill(batch["labels"] == image_token_id, IGNORE_INDEX)
    images = [samples[i].pixel_values for i in row.doc_indices if samples[i].pixel_values is not None]
    batch["pixel_values"] = torch.cat(images) if images else None
    return batch


def sample_targets(sample: Sample, image_token_id: int) -> int:
    """Tokens of a packed sample that carry a label: a next token that is not an image token."""
    ids = sample.input_ids
    return sum(1 for nxt in ids[1:] if nxt != image_token_id)
