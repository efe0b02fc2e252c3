"""hfpatch's cache directory: $HFPATCH_CACHE, else ~/.cache/hfpatch."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from pathlib import Path
from typing import Iterator


def cache_dir() -> Path:
    configured = os.environ.get("HFPATCH_CACHE")
    root = Path(configured) if configured else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hfpatch"
    root.mkdir(parents=True, exist_ok=True)
    return root


def atomic_write_text(path: Path, text: str) -> None:
    """Readers see the old file or the whole new one, never a partial write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def file_lock(key: str) -> Iterator[None]:
    """An exclusive lock shared by every process on this machine that uses ``key``."""
    lock_dir = cache_dir() / "locks"
    lock_dir.mkdir(exist_ok=True)
    path = lock_dir / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".lock")
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
