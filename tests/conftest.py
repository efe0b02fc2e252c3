import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def zoo_copy(tmp_path, monkeypatch):
    """A private copy of the zoo and patches/ (no materialized files), so tests never touch the checkout's."""
    root = tmp_path / "huggingface_model"
    shutil.copytree(REPO / "huggingface_model", root,
                    ignore=shutil.ignore_patterns("modeling_*.py", "configuration_*.py", "transformer_*.py", "__pycache__"))
    for port in (REPO / "huggingface_model").rglob("model.toml"):
        # first-party ports are committed files: keep them
        for source in port.parent.glob("*.py"):
            if "kind = \"port\"" in port.read_text():
                target = root / source.relative_to(REPO / "huggingface_model")
                shutil.copy2(source, target)
    shutil.copytree(REPO / "patches", tmp_path / "patches")  # patches for other pins live beside the zoo
    monkeypatch.setenv("HFPATCH_ZOO", str(root))
    return root
