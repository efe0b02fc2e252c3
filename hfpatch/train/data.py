"""The run's tokenizer and packed dataset, from the config.

The embedded tokenizer is trained (or read from the cache) on global rank 0 and
broadcast, so every rank of every node uses byte-identical vocabularies.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from . import corpus
from .config import TrainConfig
from .dataset import PackedDataset, build_packed_dataset
from .errors import DataError
from .sources import read_documents
from .tokenizer import TextTokenizer, default_tokenizer_json, load_tokenizer, tokenizer_from_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def tokenizer_dir(cfg: TrainConfig) -> str | None:
    """--tokenizer, else the model checkpoint's own tokenizer, else None (embedded)."""
    if cfg.tokenizer_path:
        return cfg.tokenizer_path
    if cfg.model_path and any(Path(cfg.model_path, f).exists() for f in TOKENIZER_FILES):
        return cfg.model_path
    return None


def source_texts(cfg: TrainConfig) -> tuple[list[str], str]:
    """Documents and a name for messages."""
    if cfg.data_path:
        return read_documents(cfg.data_path, cfg.text_field), str(cfg.data_path)
    return corpus.default_documents(), f"the embedded {corpus.NAME} corpus"


def load_run_tokenizer(cfg: TrainConfig, texts: list[str], rank: int) -> TextTokenizer:
    path = tokenizer_dir(cfg)
    if path is not None:
        return load_tokenizer(path)
    if cfg.data_path is None:
        training_texts = texts
    else:
        # User data without a tokenizer: the embedded BPE still works (byte-level, any text).
        training_texts = corpus.default_documents()
    payload = [default_tokenizer_json(training_texts) if rank == 0 else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(payload, src=0)
    return tokenizer_from_json(payload[0])


def load_dataset(cfg: TrainConfig, rank: int) -> tuple[TextTokenizer, PackedDataset, str]:
    texts, source = source_texts(cfg)
    tokenizer = load_run_tokenizer(cfg, texts, rank)
    overflow = cfg.overflow
    if overflow == "auto":
        # The embedded corpus has long documents by design; user data must opt in.
        overflow = "split" if cfg.data_path is None else "error"
    docs = tokenizer.encode_documents(texts)
    dataset = build_packed_dataset(docs, cfg.seq_len, pad_id=tokenizer.pad_id, overflow=overflow, source=source)
    return tokenizer, dataset, source


def check_vocab(dataset: PackedDataset, vocab_size: int, source: str) -> None:
    largest = max(int(row.input_ids.max()) for row in dataset.rows)
    if largest >= vocab_size:
        raise DataError(f"{source} has token id {largest}, outside the model's vocab_size={vocab_size}; "
                        "the tokenizer does not match the model")
