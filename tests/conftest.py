import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _materialized(directory, names):
    """Upstream files that `hfpatch sync` writes are left out; a port's committed source (port/) is kept."""
    if Path(directory).name == "port":
        return {"__pycache__"} & set(names)
    return shutil.ignore_patterns("modeling_*.py", "configuration_*.py", "transformer_*.py", "__pycache__")(directory, names)


@pytest.fixture
def zoo_copy(tmp_path, monkeypatch):
    """A private copy of the zoo and patches/ (no materialized files), so tests never touch the checkout's."""
    root = tmp_path / "huggingface_model"
    shutil.copytree(REPO / "huggingface_model", root, ignore=_materialized)
    shutil.copytree(REPO / "patches", tmp_path / "patches")  # patches for other pins live beside the zoo
    monkeypatch.setenv("HFPATCH_ZOO", str(root))
    return root
