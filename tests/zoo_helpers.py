"""A private copy of the zoo for tests: manifests, patches and ports, no materialized files."""

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _materialized(directory, names):
    """Upstream files that `hfpatch sync` writes are left out; a port's committed source (port/) is kept."""
    if Path(directory).name == "port":
        return {"__pycache__"} & set(names)
    return shutil.ignore_patterns("modeling_*.py", "configuration_*.py", "transformer_*.py", "__pycache__")(directory, names)


def copy_zoo(base: Path) -> Path:
    """``base/huggingface_model`` and ``base/patches`` (other pins' patches live beside the zoo)."""
    shutil.copytree(REPO / "huggingface_model", base / "huggingface_model", ignore=_materialized)
    shutil.copytree(REPO / "patches", base / "patches")
    return base / "huggingface_model"
