"""Packing layout, efficiency, SP sharding, padded layout, and packing errors."""

import pytest
import torch

from hfpatch.runtime import (
    IGNORE_INDEX,
    build_packed_row,
    concat_rows,
    pack_documents,
    pad_documents,
    shard_for_sequence_parallel,
)

DOCS = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [11], [12, 13, 14, 15]]


def check_row(row, docs):
    """Every document sits whole in the row with its own positions, labels and bounds."""
    bounds = row.cu_seqlens.tolist()
    assert row.cu_seqlens.dtype == torch.int32 and bounds[0] == 0 and bounds[-1] == row.input_ids.numel()
    for seg, doc in enumerate(docs):
        a, b = bounds[seg], bounds[seg + 1]
        assert row.input_ids[a:b].tolist() == doc
        assert row.position_ids[a:b].tolist() == list(range(len(doc)))
        assert row.labels[a:b].tolist() == doc[1:] + [IGNORE_INDEX]
    used = bounds[len(docs)]
    if used < row.input_ids.numel():  # padding: one extra segment
        assert bounds[len(docs) + 1:] == [row.input_ids.numel()]
        assert set(row.labels[used:].tolist()) == {IGNORE_INDEX}
        assert row.position_ids[used:].tolist() == list(range(row.input_ids.numel() - used))
    assert row.max_seqlen == max(b - a for a, b in zip(bounds, bounds[1:]))


def test_build_row_keeps_order_and_pads_as_own_segment():
    row = build_packed_row(DOCS[:3], seq_len=12, pad_id=0)
    assert row.input_ids.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 0]
    assert row.position_ids.tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3, 4, 0, 1]
    assert row.labels.tolist() == [2, 3, -100, 5, -100, 7, 8, 9, 10, -100, -100, -100]
    assert row.cu_seqlens.tolist() == [0, 3, 5, 10, 12]
    assert row.max_seqlen == 5
    check_row(row, DOCS[:3])


def test_pack_documents_best_fit_and_efficiency():
    result = pack_documents(DOCS, seq_len=8)
    # 15 tokens in 8-slot rows: at least 2 rows; best fit reaches exactly 2.
    assert len(result.rows) == 2
    assert result.num_real_tokens == 15
    assert result.efficiency == pytest.approx(15 / 16)
    seen = []
    for row in result.rows:
        docs = [DOCS[i] for i in row.doc_indices]
        assert sum(map(len, docs)) <= 8 and row.input_ids.numel() == 8
        check_row(row, docs)
        seen += row.doc_indices
    assert sorted(seen) == list(range(len(DOCS)))


def test_pack_many_random_documents_is_tight():
    g = torch.Generator().manual_seed(0)
    docs = [list(range(int(n))) for n in torch.randint(1, 200, (300,), generator=g)]
    result = pack_documents(docs, seq_len=512)
    lower_bound = -(-sum(map(len, docs)) // 512)
    assert len(result.rows) <= lower_bound + 1
    assert result.efficiency > 0.95


def test_overflow_modes():
    with pytest.raises(ValueError) as info:
        pack_documents([[1] * 5, [2] * 9], seq_len=8)
    assert "document 1 has 9 tokens, longer than seq_len=8" in str(info.value)
    assert "overflow='split'" in str(info.value)
    trunc = pack_documents([[2] * 9], seq_len=8, overflow="truncate")
    assert trunc.num_real_tokens == 8 and trunc.rows[0].doc_lengths == [8]
    split = pack_documents([list(range(19))], seq_len=8, overflow="split")
    assert sorted(n for r in split.rows for n in r.doc_lengths) == [3, 8, 8]
    with pytest.raises(ValueError, match="overflow must be one of"):
        pack_documents(DOCS, seq_len=8, overflow="drop")


def test_concat_rows_makes_one_global_pack():
    rows = pack_documents(DOCS, seq_len=8).rows
    batch = concat_rows(rows)
    assert batch["input_ids"].shape == (1, 16)
    assert batch["cu_seqlens"].tolist()[-1] == 16
    assert batch["cu_seqlens"].dtype == torch.int32


def test_shard_for_sequence_parallel_pads_and_slices():
    row = build_packed_row(DOCS[:3], pad_id=0)  # 10 tokens, no padding
    shards = [shard_for_sequence_parallel(row, r, 4, pad_id=-1) for r in range(4)]
    # 10 -> 12 tokens: the 2 extra slots are a new segment.
    for s in shards:
        assert s["cu_seqlens"].tolist() == [0, 3, 5, 10, 12]
        assert s["input_ids"].shape == (1, 3)
        assert s["max_seqlen"] == 5
    full = {k: torch.cat([s[k] for s in shards], dim=-1) for k in ("input_ids", "position_ids", "labels")}
    assert full["input_ids"][0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, -1, -1]
    assert full["position_ids"][0].tolist()[-2:] == [0, 1]
    assert full["labels"][0].tolist()[-3:] == [-100, -100, -100]
    # Already divisible: nothing added.
    s = shard_for_sequence_parallel(row, 1, 2)
    assert s["cu_seqlens"].tolist() == [0, 3, 5, 10] and s["input_ids"][0].tolist() == [6, 7, 8, 9, 10]
    with pytest.raises(ValueError, match=r"sp_rank=2 is outside \[0, sp_size=2\)"):
        shard_for_sequence_parallel(row, 2, 2)


def test_padded_layout_matches_packed_targets():
    batch = pad_documents(DOCS[:3], pad_id=0)
    assert batch["input_ids"].shape == (3, 5)
    assert batch["attention_mask"].tolist()[1] == [1, 1, 0, 0, 0]
    assert batch["labels"].tolist()[0] == [2, 3, -100, -100, -100]
    assert batch["position_ids"].tolist()[2] == [0, 1, 2, 3, 4]
    row = build_packed_row(DOCS[:3])
    packed_targets = [t for t in row.labels.tolist() if t != -100]
    padded_targets = [t for t in batch["labels"].flatten().tolist() if t != -100]
    assert packed_targets == padded_targets
    with pytest.raises(ValueError, match="document 2 has 5 tokens, longer than max_length=4"):
        pad_documents(DOCS[:3], max_length=4)
