"""Pack tokenized documents into fixed-length rows, and shard packs for ISP.

A packed row is one sequence of ``seq_len`` slots holding whole documents back to
back; trailing slots are padding that forms its own segment. Per token:
``position_ids`` restart at 0 in each document; ``labels`` are already shifted
(``labels[i]`` is the target of position i): the next token of the same document,
and -100 at each document's last token and on padding, so no loss crosses a
boundary. ``cu_seqlens`` (int32) are the segment boundaries.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch

IGNORE_INDEX = -100
_OVERFLOW = ("error", "truncate", "split")


@dataclass
class PackedRow:
    input_ids: torch.Tensor  # [L] int64
    position_ids: torch.Tensor  # [L] int64
    labels: torch.Tensor  # [L] int64, shifted, -100 where no target
    cu_seqlens: torch.Tensor  # [segments + 1] int32, padding included as a segment
    max_seqlen: int
    doc_lengths: list[int]
    doc_indices: list[int] = field(default_factory=list)  # positions in the input list

    @property
    def num_real_tokens(self) -> int:
        return sum(self.doc_lengths)

    @property
    def token_mask(self) -> torch.Tensor:
        """1 on document tokens, 0 on the row's padding (documents come first)."""
        mask = torch.zeros_like(self.input_ids)
        mask[: self.num_real_tokens] = 1
        return mask

    def as_batch(self) -> dict[str, Any]:
        """Model inputs with a batch dim of 1, as patched models expect."""
        return {
            "input_ids": self.input_ids.unsqueeze(0),
            "position_ids": self.position_ids.unsqueeze(0),
            "labels": self.labels.unsqueeze(0),
            "token_mask": self.token_mask.unsqueeze(0),
            "cu_seqlens": self.cu_seqlens,
            "max_seqlen": self.max_seqlen,
        }


@dataclass
class PackResult:
    rows: list[PackedRow]
    seq_len: int
    num_real_tokens: int

    @property
    def num_slots(self) -> int:
        return len(self.rows) * self.seq_len

    @property
    def efficiency(self) -> float:
        """Real tokens / total slots (1.0 = no padding)."""
        return self.num_real_tokens / self.num_slots if self.rows else 1.0


def _segments_row(docs: Sequence[Sequence[int]], length: int, pad_id: int) -> PackedRow:
    """Lay ``docs`` out in order and pad to ``length``; the padding is one segment."""
    ids: list[int] = []
    pos: list[int] = []
    labels: list[int] = []
    bounds = [0]
    for doc in docs:
        n = len(doc)
        if n == 0:
            continue
        ids.extend(int(t) for t in doc)
        pos.extend(range(n))
        labels.extend(int(t) for t in doc[1:])
        labels.append(IGNORE_INDEX)
        bounds.append(bounds[-1] + n)
    pad = length - bounds[-1]
    if pad < 0:
        raise ValueError(f"documents hold {bounds[-1]} tokens, more than the row length {length}")
    if pad:
        ids.extend([pad_id] * pad)
        pos.extend(range(pad))
        labels.extend([IGNORE_INDEX] * pad)
        bounds.append(length)
    seg = [b - a for a, b in zip(bounds, bounds[1:])]
    return PackedRow(
        input_ids=torch.tensor(ids, dtype=torch.long),
        position_ids=torch.tensor(pos, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
        max_seqlen=max(seg, default=0),
        doc_lengths=[len(d) for d in docs if len(d)],
    )


def build_packed_row(docs: Sequence[Sequence[int]], seq_len: int | None = None, pad_id: int = 0) -> PackedRow:
    """One row from ``docs`` in the given order (no reordering), padded to ``seq_len``."""
    total = sum(len(d) for d in docs)
    row = _segments_row(docs, total if seq_len is None else seq_len, pad_id)
    row.doc_indices = [i for i, d in enumerate(docs) if len(d)]
    return row


def _fit_documents(docs: Iterable[Sequence[int]], seq_len: int, overflow: str) -> list[tuple[int, Sequence[int]]]:
    out = []
    for index, doc in enumerate(docs):
        n = len(doc)
        if n == 0:
            continue
        if n <= seq_len:
            out.append((index, doc))
        elif overflow == "error":
            raise ValueError(
                f"document {index} has {n} tokens, longer than seq_len={seq_len}; "
                f"pass overflow='truncate' or overflow='split'"
            )
        elif overflow == "truncate":
            out.append((index, doc[:seq_len]))
        else:
            out.extend((index, doc[s : s + seq_len]) for s in range(0, n, seq_len))
    return out


def pack_documents(
    docs: Iterable[Sequence[int]],
    seq_len: int,
    *,
    pad_id: int = 0,
    overflow: str = "error",
) -> PackResult:
    """Pack documents into rows of ``seq_len`` slots by best-fit decreasing.

    Each document goes, longest first, into the row whose free space fits it most
    tightly. ``overflow`` handles documents longer than ``seq_len``: ``"error"``
    (default), ``"truncate"`` (keep the first ``seq_len`` tokens) or ``"split"``
    (cut into ``seq_len`` chunks, each its own document). Empty documents are skipped.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if overflow not in _OVERFLOW:
        raise ValueError(f"overflow must be one of {_OVERFLOW}, got {overflow!r}")
    items = _fit_documents(docs, seq_len, overflow)
    order = sorted(range(len(items)), key=lambda i: (-len(items[i][1]), i))
    rows: list[list[int]] = []  # item indices per row
    free: list[tuple[int, int]] = []  # sorted (free slots, row id)
    for i in order:
        n = len(items[i][1])
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            rows.append([i])
            bisect.insort(free, (seq_len - n, len(rows) - 1))
        else:
            space, row_id = free.pop(at)
            rows[row_id].append(i)
            bisect.insort(free, (space - n, row_id))
    packed = []
    for members in rows:
        members.sort()  # keep corpus order inside a row
        row = _segments_row([items[i][1] for i in members], seq_len, pad_id)
        row.doc_indices = [items[i][0] for i in members]
        packed.append(row)
    return PackResult(rows=packed, seq_len=seq_len, num_real_tokens=sum(len(d) for _, d in items))


def concat_rows(rows: Sequence[PackedRow]) -> dict[str, Any]:
    """Several rows as one ``[1, sum L]`` pack with global cu_seqlens (one micro-batch)."""
    if not rows:
        raise ValueError("concat_rows needs at least one row")
    bounds, offset = [0], 0
    for row in rows:
        bounds.extend(int(b) + offset for b in row.cu_seqlens.tolist()[1:])
        offset += row.input_ids.numel()
    return {
        "input_ids": torch.cat([r.input_ids for r in rows]).unsqueeze(0),
        "position_ids": torch.cat([r.position_ids for r in rows]).unsqueeze(0),
        "labels": torch.cat([r.labels for r in rows]).unsqueeze(0),
        "token_mask": torch.cat([r.token_mask for r in rows]).unsqueeze(0),
        "cu_seqlens": torch.tensor(bounds, dtype=torch.int32),
        "max_seqlen": max(r.max_seqlen for r in rows),
    }


def pad_documents(
    docs: Sequence[Sequence[int]], *, pad_id: int = 0, max_length: int | None = None
) -> dict[str, torch.Tensor]:
    """The unpacked layout for comparison: one document per row, right-padded.

    Returns ``input_ids``, ``attention_mask``, ``position_ids`` and shifted ``labels``
    (``[B, L]``), with the same per-document targets as the packed layout.
    """
    docs = [list(d) for d in docs]
    if not docs:
        raise ValueError("pad_documents needs at least one document")
    length = max_length if max_length is not None else max(len(d) for d in docs)
    too_long = [i for i, d in enumerate(docs) if len(d) > length]
    if too_long:
        i = too_long[0]
        raise ValueError(f"document {i} has {len(docs[i])} tokens, longer than max_length={length}")
    batch = len(docs)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    for b, doc in enumerate(docs):
        n = len(doc)
        input_ids[b, :n] = torch.tensor(doc, dtype=torch.long)
        mask[b, :n] = 1
        if n > 1:
            labels[b, : n - 1] = input_ids[b, 1:n]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids, "labels": labels}


_SHARDED = ("input_ids", "position_ids", "labels")
_SHARDED_OPTIONAL = ("token_mask",)  # 1 = document token, 0 = padding (MoE router statistics skip padding)


def pad_pack_to_multiple(batch: Mapping[str, Any], multiple: int, *, pad_id: int = 0) -> dict[str, Any]:
    """Append a padding segment so the pack length is a multiple of ``multiple``."""
    out = dict(batch)
    ids = out["input_ids"]
    length = ids.shape[-1]
    extra = (-length) % multiple
    if extra == 0:
        return out
    lead = ids.shape[:-1]
    fill = {
        "input_ids": torch.full((*lead, extra), pad_id, dtype=ids.dtype),
        "position_ids": torch.arange(extra, dtype=out["position_ids"].dtype).expand(*lead, extra),
        "labels": torch.full((*lead, extra), IGNORE_INDEX, dtype=out["labels"].dtype),
    }
    if "token_mask" in out:
        fill["token_mask"] = torch.zeros((*lead, extra), dtype=out["token_mask"].dtype)
    for key, tail in fill.items():
        out[key] = torch.cat([out[key], tail.to(out[key].device)], dim=-1)
    cu = out["cu_seqlens"]
    out["cu_seqlens"] = torch.cat([cu, torch.tensor([length + extra], dtype=cu.dtype, device=cu.device)])
    out["max_seqlen"] = max(int(out["max_seqlen"]), extra)
    return out


def shard_for_sequence_parallel(
    batch: Mapping[str, Any] | PackedRow, sp_rank: int, sp_size: int, *, pad_id: int = 0
) -> dict[str, Any]:
    """This ISP rank's contiguous slice of a pack; cu_seqlens stay global.

    The pack is first padded to a multiple of ``sp_size`` (the padding is its own
    segment with -100 labels and positions 0..), so every rank holds the same number
    of tokens and the all-to-all splits evenly. Keys other than input_ids /
    position_ids / labels pass through unchanged.
    """
    if isinstance(batch, PackedRow):
        batch = batch.as_batch()
    if not 0 <= sp_rank < sp_size:
        raise ValueError(f"sp_rank={sp_rank} is outside [0, sp_size={sp_size})")
    missing = [k for k in (*_SHARDED, "cu_seqlens", "max_seqlen") if k not in batch]
    if missing:
        raise KeyError(f"packed batch lacks {missing}")
    if batch["input_ids"].dim() == 2 and batch["input_ids"].shape[0] != 1:
        raise ValueError(f"a pack has batch size 1, got input_ids shape {tuple(batch['input_ids'].shape)}")
    out = pad_pack_to_multiple(batch, sp_size, pad_id=pad_id)
    local = out["input_ids"].shape[-1] // sp_size
    for key in (*_SHARDED, *(k for k in _SHARDED_OPTIONAL if k in out)):
        out[key] = out[key][..., sp_rank * local : (sp_rank + 1) * local]
    return out
