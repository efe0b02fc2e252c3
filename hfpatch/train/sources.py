"""Read training documents (text) from JSON / JSON lines, parquet or an HF ``datasets`` dir.

``.jsonl`` / ``.ndjson`` hold one record per line; ``.json`` one JSON array of records
(or an object whose one list holds them), or JSON lines as HF ``datasets`` also accepts.
pyarrow and datasets are imported only when such a source is given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import DataError
from .hub import is_dataset_snapshot

JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")
JSONL_SUFFIXES = (*JSON_LINES_SUFFIXES, ".json")
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
        return [text_of(record, text_field, where) for where, record in json_records(path)]
    if path.suffix in PARQUET_SUFFIXES:
        return _read_parquet(path, text_field)
    raise DataError(f"unsupported data file {path.name}: use .jsonl (a {text_field!r} field per line), .parquet, or a datasets dir")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def json_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, parsed record) for each record of a JSON lines or JSON file; ``where`` names it in messages."""
    text = _read_text(path)
    if path.suffix not in JSON_LINES_SUFFIXES:
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":  # "Extra data": one value per line, i.e. JSON lines
                raise DataError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); a .json file "
                                f"is read as one JSON array of records, name a file of one record per line .jsonl") from None
        else:
            yield from ((f"{path} record {i}", record) for i, record in enumerate(_record_list(path, document), 1))
            return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {number} is not valid JSON ({exc.msg}); the file is read as JSON lines, "
                            f"one record per line") from None
        yield f"{path} line {number}", record


def _record_list(path: Path, document: Any) -> list:
    """The records of a whole-file JSON document: an array, an object with one list of records, or one record."""
    if isinstance(document, list):
        return document
    if not isinstance(document, dict):
        raise DataError(f"{path} holds a JSON {type(document).__name__}; a .json data file must be an array of records "
                        f"or an object with one list of them (for one record per line name it .jsonl)")
    lists = [key for key, value in document.items() if isinstance(value, list) and value and all(isinstance(r, dict) for r in value)]
    if len(lists) > 1:
        raise DataError(f"{path} holds an object with several lists of records ({', '.join(map(repr, lists))}); "
                        f"keep the training records in one list")
    return document[lists[0]] if lists else [document]  # no list of records: the object is one record


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
