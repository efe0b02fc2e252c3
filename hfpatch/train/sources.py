"""Read training documents (text) from jsonl, parquet or an HF ``datasets`` dir.

pyarrow and datasets are imported only when such a source is given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import DataError
from .hub import is_dataset_snapshot

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)


def read_documents(path: str | Path, text_field: str = "text") -> list[str]:
    """All documents under ``path``: a file, a folder of files, or a saved dataset."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    if path.is_dir():
        docs = _read_dir(path, text_field)
    else:
        docs = _read_file(path, text_field)
    if not any(d.strip() for d in docs):
        raise DataError(f"no documents with text in {path} (field {text_field!r})")
    return docs


def _read_dir(path: Path, text_field: str) -> list[str]:
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return _read_saved_dataset(path, text_field)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in JSONL_SUFFIXES + PARQUET_SUFFIXES)
    if is_dataset_snapshot(path):
        files = _train_split(files, path)
    if not files:
        raise DataError(f"{path} holds no .jsonl or .parquet files and is not a dataset saved with save_to_disk")
    return [doc for file in files for doc in _read_file(file, text_field)]


def _train_split(files: list[Path], root: Path) -> list[Path]:
    """A hub dataset holds every split: its train files (a path part named train*), when it names them."""
    train = [f for f in files if any(part.lower().startswith("train") for part in f.relative_to(root).parts)]
    return train or files


def _read_file(path: Path, text_field: str) -> list[str]:
    if path.suffix in JSONL_SUFFIXES:
        return _read_jsonl(path, text_field)
    if path.suffix in PARQUET_SUFFIXES:
        return _read_parquet(path, text_field)
    raise DataError(f"unsupported data file {path.name}: use .jsonl (a {text_field!r} field per line), .parquet, or a datasets dir")


def jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) for each non-blank line of a jsonl file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {number} is not valid JSON ({exc.msg})") from None
        yield number, record


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    return [text_of(record, text_field, f"{path} line {number}") for number, record in jsonl_records(path)]


def text_of(record, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where} is not a JSON object")
    if text_field not in record:
        keys = ", ".join(map(repr, list(record)[:8]))
        raise DataError(f"{where} has no {text_field!r} field (it has {keys}); choose one with --text-field")
    text = record[text_field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
    return text


def _column(texts: Iterable, text_field: str, where: str) -> list[str]:
    out = []
    for i, text in enumerate(texts):
        if text is None:
            continue
        if not isinstance(text, str):
            raise DataError(f"{where} row {i}: field {text_field!r} is {type(text).__name__}, not a string")
        out.append(text)
    return out


def _read_parquet(path: Path, text_field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path.name} needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise DataError(f"cannot read parquet file {path}: {exc}") from None
    if text_field not in table.column_names:
        raise DataError(f"{path} has no {text_field!r} column (it has {', '.join(table.column_names)}); choose one with --text-field")
    return _column(table.column(text_field).to_pylist(), text_field, str(path))


def _read_saved_dataset(path: Path, text_field: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path} is a saved HF dataset; reading it needs the datasets package: pip install datasets") from None
    try:
        data = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"cannot load dataset {path}: {exc}") from None
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise DataError(f"{path} has splits {', '.join(data)} but no 'train' split; point --data at one split's dir")
        data = data["train"]
    if text_field not in data.column_names:
        raise DataError(f"{path} has no {text_field!r} column (it has {', '.join(data.column_names)}); choose one with --text-field")
    return _column(data[text_field], text_field, str(path))
