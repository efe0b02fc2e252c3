"""Hub repo ids (``internlm/internlm2-7b``) as local paths, through the Hugging Face cache only.

InternEvo configs name tokenizers, checkpoints and datasets by hub id. The trainer never
downloads: an id resolves to its snapshot in the local cache (huggingface_hub's layout,
``$HF_HUB_CACHE``, else ``~/.cache/huggingface/hub``), as with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ConfigError

# org/name: one slash, no leading dot or slash (a relative path like data/train.jsonl matches too,
# so an id is tried only when no such local path exists)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SNAPSHOT = re.compile(r"(^|/)datasets--[^/]+/snapshots/[^/]+$")


def cache_dir() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def local_path(value: str, repo_type: str, label: str) -> str:
    """``value`` itself if it exists locally, else the cached snapshot of the hub repo it names."""
    if Path(value).exists() or not _REPO_ID.match(value):
        return value
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(value, repo_type=repo_type, local_files_only=True, cache_dir=cache_dir())
    except LocalEntryNotFoundError:
        kind = " --repo-type dataset" if repo_type == "dataset" else ""
        raise ConfigError(
            f"{label}: {value!r} is neither a local path nor a {repo_type} in the local Hugging Face cache ({cache_dir()}); "
            f"fetch it there (hf download {value}{kind}) or point {label} at a local copy"
        ) from None


def is_dataset_snapshot(path: str | Path) -> bool:
    return bool(_SNAPSHOT.search(Path(path).resolve().as_posix()))
