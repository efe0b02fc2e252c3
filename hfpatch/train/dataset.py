"""Tokenized documents packed into rows, and the seeded order rows are read in.

The data position is one number, ``rows_consumed``: how many rows of the endless,
seeded row stream the run has used. Epoch e of the stream is a permutation of all
rows drawn from ``seed + e``, so the stream -- and a resumed run -- is
reproducible from the seed alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import torch

from hfpatch.runtime import pack_documents

from .errors import DataError


@dataclass
class PackedDataset:
    """Rows of at most ``seq_len`` tokens: ``PackedRow``s of text, or (LLaVA, Flux) lists of samples."""

    rows: list
    seq_len: int
    num_documents: int
    num_tokens: int
    fingerprint: str

    @property
    def efficiency(self) -> float:
        """Real tokens / row slots over the whole dataset."""
        return self.num_tokens / (len(self.rows) * self.seq_len)


def build_packed_dataset(docs: Sequence[Sequence[int]], seq_len: int, *, pad_id: int, overflow: str, source: str) -> PackedDataset:
    """Pack ``docs`` into rows of ``seq_len``; ``overflow`` is error / split / truncate."""
    docs = [d for d in docs if len(d)]
    if not docs:
        raise DataError(f"{source} yields no tokens")
    if overflow == "error":
        for index, doc in enumerate(docs):
            if len(doc) > seq_len:
                raise DataError(
                    f"document {index} of {source} has {len(doc)} tokens, more than seq_len={seq_len}; "
                    f"raise --seq-len or split long documents with --overflow split (or truncate)"
                )
    packed = pack_documents(docs, seq_len, pad_id=pad_id, overflow=overflow)
    digest = hashlib.sha256(f"{seq_len}:{pad_id}:{overflow}".encode())
    for row in packed.rows:
        digest.update(row.input_ids.numpy().tobytes())
    return PackedDataset(
        rows=packed.rows, seq_len=seq_len, num_documents=len(docs),
        num_tokens=packed.num_real_tokens, fingerprint=digest.hexdigest()[:16],
    )


def greedy_rows(samples: Sequence, sizes: Sequence[int], seq_len: int) -> list[list]:
    """``samples`` in order, a new row whenever the next one does not fit in ``seq_len`` tokens."""
    rows: list[list] = []
    used = seq_len
    for sample, size in zip(samples, sizes):
        if used + size > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(sample)
        used += size
    return rows


class RowStream:
    """Row indices in the seeded order; position p of the stream is row ``perm(p // n)[p % n]``."""

    def __init__(self, num_rows: int, seed: int) -> None:
        if num_rows < 1:
            raise DataError("the dataset packs into zero rows")
        self.num_rows = num_rows
        self.seed = seed
        self._epoch = -1
        self._perm: list[int] = []

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = torch.randperm(self.num_rows, generator=generator).tolist()
            self._epoch = epoch
        return self._perm

    def take(self, start: int, count: int) -> list[int]:
        """Rows at stream positions ``start .. start + count - 1``."""
        return [self._permutation(p // self.num_rows)[p % self.num_rows] for p in range(start, start + count)]

    def epoch_of(self, position: int) -> float:
        return position / self.num_rows
