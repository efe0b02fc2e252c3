"""Tokenizers: a local one (any transformers tokenizer dir) or the embedded BPE.

The embedded tokenizer is a byte-level BPE trained offline on the embedded corpus
and cached, so the default run downloads nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from hfpatch import files

from . import corpus
from .errors import DataError

DEFAULT_VOCAB_SIZE = 1024
EOS = "<|endoftext|>"
PAD = "<|pad|>"


class TextTokenizer:
    """What the trainer needs from a tokenizer: encode documents, ids, size, save."""

    def __init__(self, hf_tokenizer, source: str) -> None:
        self.hf = hf_tokenizer
        self.source = source
        # Documents are packed, not truncated: silence the model_max_length warning.
        self.hf.model_max_length = 1 << 62

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def eos_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def special_ids(self) -> dict[str, int | None]:
        """Token ids for a model config: bos / eos / pad."""
        return {"bos_token_id": self.hf.bos_token_id, "eos_token_id": self.eos_id, "pad_token_id": self.pad_id}

    @property
    def pad_id(self) -> int:
        for token_id in (self.hf.pad_token_id, self.hf.eos_token_id):
            if token_id is not None:
                return int(token_id)
        return 0

    def encode_documents(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per document, with the tokenizer's special tokens and an EOS at the end."""
        encoded = self.hf(list(texts), add_special_tokens=True)["input_ids"]
        eos = self.eos_id
        if eos is not None:
            encoded = [ids if ids and ids[-1] == eos else [*ids, eos] for ids in encoded]
        return encoded

    def to_json(self) -> str:
        return self.hf.backend_tokenizer.to_str()

    def save(self, directory: str | Path) -> None:
        self.hf.save_pretrained(str(directory))


def load_tokenizer(path: str | Path) -> TextTokenizer:
    path = Path(path)
    if not path.exists():
        raise DataError(f"tokenizer path {path} does not exist")
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises OSError / ValueError / others for a bad dir
        raise DataError(f"cannot load a tokenizer from {path}: {str(exc).splitlines()[0]}") from None
    if not getattr(hf, "is_fast", False):
        raise DataError(f"{path}: only fast (tokenizers-backed) tokenizers are supported")
    return TextTokenizer(hf, str(path))


def _wrap_json(tokenizer_json: str, source: str) -> TextTokenizer:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json), eos_token=EOS, pad_token=PAD)
    return TextTokenizer(hf, source)


def train_bpe(texts: Sequence[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> str:
    """A byte-level BPE trained on ``texts``, as tokenizer.json text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer.to_str()


def default_tokenizer_json(texts: Sequence[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> str:
    """The embedded BPE, trained once and cached under the hfpatch cache dir."""
    path = files.cache_dir() / "tokenizers" / f"{corpus.NAME}-bpe{vocab_size}-{corpus.fingerprint(list(texts))}.json"
    with files.file_lock(str(path)):
        if path.exists():
            return path.read_text(encoding="utf-8")
        text = train_bpe(texts, vocab_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        files.atomic_write(path, text.encode("utf-8"))
        return text


def tokenizer_from_json(tokenizer_json: str) -> TextTokenizer:
    return _wrap_json(tokenizer_json, f"embedded {corpus.NAME} BPE")
