"""Data: readers, the embedded corpus and tokenizer, packing, the seeded row stream, micro-batches."""

import json
import sys

import pytest
import torch

from hfpatch.runtime import IGNORE_INDEX
from hfpatch.train import corpus
from hfpatch.train.batches import packed_micro_batch, padded_micro_batch, row_documents, step_stats
from hfpatch.train.dataset import RowStream, build_packed_dataset
from hfpatch.train.errors import DataError
from hfpatch.train.sources import read_documents
from hfpatch.train.tokenizer import default_tokenizer_json, tokenizer_from_json
from test_train_common import train_env  # noqa: F401


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def test_jsonl_file_and_folder(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["one", "two"])
    write_jsonl(tmp_path / "b.jsonl", ["three"])
    assert read_documents(tmp_path / "a.jsonl") == ["one", "two"]
    assert read_documents(tmp_path) == ["one", "two", "three"]
    write_jsonl(tmp_path / "c.jsonl", ["x"], field="content")
    assert read_documents(tmp_path / "c.jsonl", "content") == ["x"]


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": "broken\n', "line 2 is not valid JSON"),
    ('{"body": "no text"}\n', "has no 'text' field (it has 'body'); choose one with --text-field"),
    ('{"text": 5}\n', "field 'text' is int, not a string"),
    ('[1, 2]\n', "line 1 is not a JSON object"),
    ("\n\n", "no documents with text"),
    ('{"text": ""}\n', "no documents with text"),
])
def test_bad_jsonl_is_a_clear_data_error(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_documents(path)


def test_missing_and_unsupported_sources(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_documents(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported data file x.csv"):
        read_documents(tmp_path / "x.csv")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no .jsonl or .parquet files"):
        read_documents(empty)


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["alpha", "beta", None]}), tmp_path / "d.parquet")
    assert read_documents(tmp_path / "d.parquet") == ["alpha", "beta"]
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="cannot read parquet file"):
        read_documents(tmp_path / "bad.parquet")


def test_saved_hf_dataset(tmp_path):
    import datasets
    datasets.Dataset.from_dict({"text": ["a b", "c"]}).save_to_disk(str(tmp_path / "ds"))
    assert read_documents(tmp_path / "ds") == ["a b", "c"]


def test_optional_readers_say_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "datasets", None)
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match="needs pyarrow: pip install pyarrow"):
        read_documents(tmp_path / "d.parquet")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "state.json").write_text("{}")
    with pytest.raises(DataError, match="pip install datasets"):
        read_documents(tmp_path / "ds")


def test_embedded_corpus_has_a_wide_spread_of_lengths():
    lengths = sorted(len(d) for d in corpus.default_documents())
    assert len(lengths) > 100
    assert lengths[0] < 100 and lengths[-1] > 10_000 and 300 < lengths[len(lengths) // 2] < 5_000


def test_embedded_tokenizer_is_trained_once_then_cached(train_env):
    docs = corpus.default_documents()
    first = default_tokenizer_json(docs)
    cached = list((train_env / "cache" / "tokenizers").glob("*.json"))
    assert len(cached) == 1
    assert default_tokenizer_json(docs) == first
    tok = tokenizer_from_json(first)
    assert tok.vocab_size == 1024
    ids = tok.encode_documents(["def f(x):\n    return x", "hello"])
    assert all(doc[-1] == tok.eos_id for doc in ids)
    assert tok.hf.decode(ids[0][:-1]) == "def f(x):\n    return x"


def test_packing_restarts_positions_and_masks_document_ends():
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    data = build_packed_dataset(docs, 8, pad_id=0, overflow="error", source="t")
    assert data.num_tokens == 9 and len(data.rows) == 2
    for row in data.rows:
        for doc, (a, b) in zip(row_documents(row), zip(row.cu_seqlens.tolist(), row.cu_seqlens.tolist()[1:])):
            assert row.position_ids[a:b].tolist() == list(range(b - a))
            assert row.labels[a : b - 1].tolist() == doc[1:].tolist()
            assert row.labels[b - 1] == IGNORE_INDEX
        assert (row.labels[row.num_real_tokens :] == IGNORE_INDEX).all()


def test_document_longer_than_seq_len_says_what_to_do():
    wanted = "document 1 of t has 9 tokens, more than seq_len=8; raise --seq-len or split long documents with --overflow split"
    with pytest.raises(DataError, match=wanted):
        build_packed_dataset([[1, 2], list(range(9))], 8, pad_id=0, overflow="error", source="t")
    split = build_packed_dataset([[1, 2], list(range(9))], 8, pad_id=0, overflow="split", source="t")
    assert split.num_tokens == 11
    with pytest.raises(DataError, match="yields no tokens"):
        build_packed_dataset([[], []], 8, pad_id=0, overflow="error", source="t")


def test_row_stream_is_seeded_and_covers_every_row_each_epoch():
    stream = RowStream(7, seed=3)
    first = stream.take(0, 7)
    assert sorted(first) == list(range(7))
    assert RowStream(7, seed=3).take(3, 6) == stream.take(3, 6)  # resumable from a position alone
    assert sorted(stream.take(7, 7)) == list(range(7)) and stream.take(7, 7) != first
    assert RowStream(7, seed=4).take(0, 7) != first


def test_sequence_parallel_slices_rebuild_the_pack_and_padded_keeps_the_targets():
    docs = [list(range(1, 6)), list(range(20, 23)), list(range(30, 37))]
    rows = build_packed_dataset(docs, 9, pad_id=0, overflow="error", source="t").rows
    full = packed_micro_batch(rows, 0, 1, pad_id=0)
    shards = [packed_micro_batch(rows, r, 4, pad_id=0) for r in range(4)]
    assert all(s["input_ids"].shape[1] == shards[0]["input_ids"].shape[1] for s in shards)
    rebuilt = torch.cat([s["labels"] for s in shards], dim=1)
    assert torch.equal(rebuilt[:, : full["labels"].shape[1]], full["labels"])
    assert torch.equal(shards[2]["cu_seqlens"], shards[0]["cu_seqlens"])  # cu_seqlens stay global
    padded = padded_micro_batch(rows, 0, 1, pad_id=0)
    assert padded["input_ids"].shape[0] == 3 and "attention_mask" in padded
    stats = step_stats(rows)
    assert stats.targets == int((padded["labels"] != IGNORE_INDEX).sum()) == int((full["labels"] != IGNORE_INDEX).sum())
    assert stats.real_tokens == 15 and stats.attention_pairs == 25 + 9 + 49


def test_attention_flops_count_the_attention_each_family_has():
    """MFU's attention term counts causal layers (6 x layers x width x squared document lengths): a decoder's
    layers, Flux's non-causal layers twice, none for Mamba."""
    from transformers import LlamaConfig, MambaConfig

    from hfpatch.train.families import CausalLM, Flux

    assert CausalLM().flops_shape(LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4)) == (3, 64)
    assert CausalLM().flops_shape(MambaConfig(hidden_size=32, num_hidden_layers=2)) == (0, 32)
    flux = {"num_layers": 1, "num_single_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8}
    assert Flux().flops_shape(flux) == (6, 16)
