"""`hfpatch train` against bad inputs: one line, exit status, data intact."""

import json
from pathlib import Path

import pytest

from hfpatch.train.errors import DataError
from hfpatch.train.sources import read_documents


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- data files ----------------------------------------------------------------------------


def test_json_files_are_arrays_or_json_lines_and_errors_say_which(tmp_path):
    records = [{"text": "one"}, {"text": "two"}]
    assert read_documents(_write(tmp_path / "array.json", json.dumps(records, indent=2))) == ["one", "two"]
    assert read_documents(_write(tmp_path / "wrapped.json", json.dumps({"version": 1, "data": records}))) == ["one", "two"]
    assert read_documents(_write(tmp_path / "lines.json", '{"text": "one"}\n{"text": "two"}\n')) == ["one", "two"]
    cases = {
        "broken.json": ('[{"text": "one"},', "broken.json is not valid JSON (Expecting value at line 1 column 18); "
                                             "a .json file is read as one JSON array of records"),
        "two_lists.json": ('{"a": [{"text": "one"}], "b": [{"text": "two"}]}',
                           "two_lists.json holds an object with several lists of records ('a', 'b')"),
        "string.json": ('"one"', "string.json holds a JSON str; a .json data file must be an array of records"),
        "record.json": ('[{"text": "one"}, 5]', "record.json record 2 is not a JSON object"),
        "broken.jsonl": ('{"text": "one"}\n{"text":\n', "broken.jsonl line 2 is not valid JSON (Expecting value); "
                                                       "the file is read as JSON lines, one record per line"),
    }
    for name, (text, message) in cases.items():
        with pytest.raises(DataError) as error:
            read_documents(_write(tmp_path / name, text))
        assert message in str(error.value)
