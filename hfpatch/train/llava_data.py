"""LLaVA training data from local jsonl: image+text records as ``multimodal.Sample``s.

A line is ``{"image": PATH, "text": ...}`` or ``{"images": [PATH, ...], "text": ...}``
(relative paths are relative to the jsonl file's folder). ``<image>`` in the text marks
where each image goes; without one the images go before the text (LLaVA-1.5's layout).
Images get LLaVA-1.5's preprocessing (pad to a square of the mean colour, bicubic
resize, CLIP normalization) and, like the synthetic set, are all loaded up front.
Pillow is imported only here, when such data is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .errors import DataError
from hfpatch.runtime.image_text_packing import Sample
from .sources import JSONL_SUFFIXES, json_records, text_of
from .tokenizer import TextTokenizer

IMAGE_PLACEHOLDER = "<image>"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Record:
    text: str
    images: list[Path]  # resolved paths, in placeholder order
    where: str  # "FILE line N" (or "record N" of a .json array), for messages


def jsonl_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    if path.is_file():
        if path.suffix not in JSONL_SUFFIXES:
            raise DataError(f"unsupported LLaVA data file {path.name}: use .jsonl (an image or images field and a text field per line)")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in JSONL_SUFFIXES)
    if not files:
        raise DataError(f"{path} holds no .jsonl files")
    return files


def read_records(path: str | Path, text_field: str = "text") -> list[Record]:
    """Every record of the jsonl file(s) under ``path``, checked but with no image read yet."""
    records = [_record(file, where, raw, text_field) for file in jsonl_files(path) for where, raw in json_records(file)]
    if not records:
        raise DataError(f"no samples in {path}")
    return records


def _record(file: Path, where: str, raw, text_field: str) -> Record:
    text = text_of(raw, text_field, where)
    if "image" in raw and "images" in raw:
        raise DataError(f"{where} has both 'image' and 'images'; use one")
    paths = raw.get("images", [raw["image"]] if "image" in raw else [])
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise DataError(f"{where}: 'image' must be a path string and 'images' a list of them")
    placeholders = text.count(IMAGE_PLACEHOLDER)
    if placeholders and placeholders != len(paths):
        raise DataError(f"{where}: the text has {placeholders} {IMAGE_PLACEHOLDER} placeholders but the line names {len(paths)} images")
    return Record(text=text, images=[file.parent / p for p in paths], where=where)


def preprocess(image, size: int) -> torch.Tensor:
    """LLaVA-1.5's ``image_aspect_ratio="pad"``: a PIL RGB image -> a normalized ``[3, size, size]`` tensor."""
    from PIL import Image

    width, height = image.size
    side = max(width, height)
    # LLaVA's expand2square fills with the processor's mean, truncated to 0..255
    square = Image.new("RGB", (side, side), tuple(int(m * 255) for m in CLIP_MEAN))
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    square = square.resize((size, size), Image.Resampling.BICUBIC)
    pixels = torch.frombuffer(bytearray(square.tobytes()), dtype=torch.uint8).view(size, size, 3)
    scaled = pixels.permute(2, 0, 1).float() / 255
    return (scaled - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


def load_image(path: Path, size: int, where: str) -> torch.Tensor:
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading LLaVA images needs Pillow: pip install pillow") from None
    if not path.is_file():
        raise DataError(f"{where}: image {path} does not exist")
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except Exception as exc:  # Pillow raises UnidentifiedImageError, OSError, ValueError... for a bad file
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise DataError(f"{where}: cannot read image {path} ({reason})") from None
    return preprocess(rgb, size)


def _leading_bos(tokenizer: TextTokenizer) -> list[int]:
    """The BOS the tokenizer puts before a text, if it puts one (Llama's does; the embedded BPE has none)."""
    bos = tokenizer.hf.bos_token_id
    return [bos] if bos is not None and tokenizer.hf("a")["input_ids"][:1] == [bos] else []


def encode(record: Record, tokenizer: TextTokenizer, image_token_id: int, image_seq_length: int) -> list[int]:
    """BOS, text pieces with ``image_seq_length`` image tokens per image between them, EOS."""
    image = [image_token_id] * image_seq_length
    if IMAGE_PLACEHOLDER in record.text:
        pieces = record.text.split(IMAGE_PLACEHOLDER)
    else:
        pieces = ["", record.text] if record.images else [record.text]
        # the images all go before the text
        image = image * len(record.images)
    # pieces are tokenized apart, so no token spans an image (as LLaVA's tokenizer_image_token does)
    encoded = tokenizer.hf(pieces, add_special_tokens=False)["input_ids"]
    ids = _leading_bos(tokenizer) + encoded[0]
    for piece in encoded[1:]:
        ids += image + piece
    if tokenizer.eos_id is not None:
        ids.append(tokenizer.eos_id)
    return ids


def build_samples(records: Sequence[Record], tokenizer: TextTokenizer, *, image_token_id: int,
                  image_seq_length: int, image_size: int) -> list[Sample]:
    samples = []
    for record in records:
        images = [load_image(path, image_size, record.where) for path in record.images]
        ids = encode(record, tokenizer, image_token_id, image_seq_length)
        samples.append(Sample(ids, torch.stack(images) if images else None))
    return samples
