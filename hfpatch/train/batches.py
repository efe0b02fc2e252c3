"""Micro-batches for one rank: packed (varlen) or padded, then sliced for ISP.

Packed: the micro-batch's rows concatenated into one ``[1, L]`` pack with global
cu_seqlens, padded to a multiple of sp, each ISP rank taking a contiguous slice.
Padded: the same documents one per row, right-padded, with an attention mask --
the layout an unpatched model trains on, with identical targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from hfpatch.runtime import IGNORE_INDEX, PackedRow, concat_rows, pad_documents, shard_for_sequence_parallel


@dataclass(frozen=True)
class BatchStats:
    """Totals over the whole step (all data-parallel ranks), known without communication."""

    real_tokens: int  # document tokens, padding excluded
    slots: int  # row slots, padding included
    targets: int  # tokens that have a label (the loss denominator)
    attention_pairs: int  # sum of squared document lengths, for attention FLOPs

    @property
    def efficiency(self) -> float:
        return self.real_tokens / self.slots if self.slots else 1.0


def step_stats(rows: Sequence[PackedRow]) -> BatchStats:
    return BatchStats(
        real_tokens=sum(r.num_real_tokens for r in rows),
        slots=sum(r.input_ids.numel() for r in rows),
        targets=sum(int((r.labels != IGNORE_INDEX).sum()) for r in rows),
        attention_pairs=sum(n * n for r in rows for n in r.doc_lengths),
    )


def row_documents(row: PackedRow) -> list[torch.Tensor]:
    """The documents of a row (its padding segment dropped)."""
    bounds = row.cu_seqlens.tolist()
    return [row.input_ids[a:b] for a, b in zip(bounds, bounds[1:])][: len(row.doc_lengths)]


def packed_micro_batch(rows: Sequence[PackedRow], sp_rank: int, sp: int, pad_id: int) -> dict[str, Any]:
    """This ISP rank's slice of the rows as one pack; cu_seqlens stay global."""
    return shard_for_sequence_parallel(concat_rows(rows), sp_rank, sp, pad_id=pad_id)


def padded_micro_batch(rows: Sequence[PackedRow], sp_rank: int, sp: int, pad_id: int) -> dict[str, Any]:
    """The rows' documents as a right-padded ``[B, L]`` batch, this ISP rank's slice of L.

    Right padding keeps causal attention exact under ISP: real tokens never see a pad.
    """
    docs = [doc.tolist() for row in rows for doc in row_documents(row)]
    longest = max(len(d) for d in docs)
    batch = pad_documents(docs, pad_id=pad_id, max_length=-(-longest // sp) * sp)
    local = batch["input_ids"].shape[1] // sp
    return {key: value[:, sp_rank * local : (sp_rank + 1) * local] for key, value in batch.items()}
