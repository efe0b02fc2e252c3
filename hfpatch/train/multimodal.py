"""LLaVA (vision-language) training data: image+text samples packed into rows.

The packing contract (``Sample``, ``pack_llava_samples``) is the model's, in
:mod:`hfpatch.runtime.image_text_packing`. A sample is a token sequence whose image placeholders are already expanded (one image
token per image feature, as transformers 5.x processors emit them) plus its images.
The embedded default is synthetic: small coloured rectangles drawn with torch, each
captioned with its colour and position, tokenized with a word-level vocab whose ids
stay below the model's ``image_token_index``.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import torch

from hfpatch import runtime
from hfpatch.runtime.image_text_packing import Sample, pack_llava_samples, sample_targets

from .batches import BatchStats
from .dataset import PackedDataset, greedy_rows
from .errors import DataError


# -- the embedded synthetic data set -----------------------------------------------------

COLOURS = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0), "magenta": (1.0, 0.0, 1.0), "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0),
}
# (word, rows, columns) as fractions of the image
POSITIONS = {
    "left": ((0.0, 1.0), (0.0, 0.5)), "right": ((0.0, 1.0), (0.5, 1.0)),
    "top": ((0.0, 0.5), (0.0, 1.0)), "bottom": ((0.5, 1.0), (0.0, 1.0)), "center": ((0.25, 0.75), (0.25, 0.75)),
}
SIZES = ("small", "large")
SPECIALS = ("<pad>", "<bos>", "<eos>")
WORDS = (*SPECIALS, "a", "an", "image", "of", "rectangle", "on", "the", "background", "with", "and", "two", "one",
         "picture", "shows", *COLOURS, *POSITIONS, *SIZES)


class WordVocab:
    """A word-level vocab for the synthetic captions (what the loop needs of a tokenizer)."""

    source = "the embedded word-level caption vocab"

    def __init__(self, words: Sequence[str] = WORDS) -> None:
        self.words = list(words)
        self.ids = {w: i for i, w in enumerate(self.words)}

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    @property
    def pad_id(self) -> int:
        return self.ids["<pad>"]

    def encode(self, text: str) -> list[int]:
        return [self.ids["<bos>"], *(self.ids[w] for w in text.split()), self.ids["<eos>"]]


def draw(colour: str, background: str, position: str, size: str, image_size: int) -> torch.Tensor:
    """One ``[3, S, S]`` image in [-1, 1]: a rectangle of ``colour`` in ``position`` on ``background``."""
    image = torch.tensor(COLOURS[background]).view(3, 1, 1).expand(3, image_size, image_size).clone()
    (r0, r1), (c0, c1) = POSITIONS[position]
    if size == "small":  # the middle half of the region
        r0, r1 = r0 + (r1 - r0) / 4, r1 - (r1 - r0) / 4
        c0, c1 = c0 + (c1 - c0) / 4, c1 - (c1 - c0) / 4
    rows = slice(round(r0 * image_size), max(round(r1 * image_size), round(r0 * image_size) + 1))
    cols = slice(round(c0 * image_size), max(round(c1 * image_size), round(c0 * image_size) + 1))
    image[:, rows, cols] = torch.tensor(COLOURS[colour]).view(3, 1, 1)
    return image * 2 - 1


def synthetic_samples(vocab: WordVocab, *, image_token_id: int, image_seq_length: int, image_size: int,
                      count: int, seed: int) -> list[Sample]:
    """``count`` captioned images: one or two per sample, caption before or after, varying length."""
    if vocab.vocab_size > image_token_id:
        raise DataError(f"the caption vocab has {vocab.vocab_size} words but image_token_index={image_token_id}; "
                        f"raise model.image_token_index")
    generator = torch.Generator().manual_seed(seed)
    colours, positions = list(COLOURS), list(POSITIONS)

    def pick(options):
        return options[int(torch.randint(len(options), (), generator=generator))]

    samples = []
    for _ in range(count):
        images, words = [], []
        for index in range(1 + int(torch.rand((), generator=generator) < 0.3)):
            colour, position, size = pick(colours), pick(positions), pick(SIZES)
            background = pick([c for c in colours if c != colour])
            images.append(draw(colour, background, position, size, image_size))
            words.append(f"{'and ' if index else ''}a {size} {colour} rectangle on the {position} "
                         f"with a {background} background")
        caption = vocab.encode(" ".join(words))
        placeholder = [image_token_id] * (image_seq_length * len(images))
        ids = placeholder + caption if torch.rand((), generator=generator) < 0.7 else caption[:1] + placeholder + caption[1:]
        samples.append(Sample(ids, torch.stack(images)))
    return samples


def pack_rows(samples: Sequence[Sample], seq_len: int, image_token_id: int, source: str) -> PackedDataset:
    digest = hashlib.sha256(f"llava:{seq_len}:{image_token_id}".encode())
    for index, sample in enumerate(samples):
        if len(sample.input_ids) > seq_len:
            raise DataError(f"sample {index} of {source} has {len(sample.input_ids)} tokens (image tokens included), "
                            f"more than seq_len={seq_len}; raise --seq-len")
        digest.update(torch.tensor(sample.input_ids).numpy().tobytes())
        if sample.pixel_values is not None:
            digest.update(sample.pixel_values.float().numpy().tobytes())
    sizes = [len(s.input_ids) for s in samples]
    return PackedDataset(rows=greedy_rows(samples, sizes, seq_len), seq_len=seq_len, num_documents=len(samples),
                         num_tokens=sum(sizes), fingerprint=digest.hexdigest()[:16])


def llava_stats(rows: Sequence[list[Sample]], seq_len: int, image_token_id: int) -> BatchStats:
    samples = [s for row in rows for s in row]
    return BatchStats(
        real_tokens=sum(len(s.input_ids) for s in samples), slots=len(rows) * seq_len,
        targets=sum(sample_targets(s, image_token_id) for s in samples),
        attention_pairs=sum(len(s.input_ids) ** 2 for s in samples),
    )


def llava_micro_batch(rows: Sequence[list[Sample]], sp_rank: int, sp: int, *, image_token_id: int, pad_id: int) -> dict[str, Any]:
    """The rows' samples as one pack, this ISP rank's slice (pixel_values: all of the pack's images)."""
    batch = pack_llava_samples([s for row in rows for s in row], image_token_id, pad_id=pad_id)
    return runtime.shard_for_sequence_parallel(batch, sp_rank, sp, pad_id=pad_id)
