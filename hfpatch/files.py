"""Files as hfpatch touches them: its cache dir, and reads and atomic writes whose OS errors are one line."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import stat
import tempfile
import time
from pathlib import Path
from typing import Iterator

from hfpatch.errors import UserError

TEMP_SUFFIX = ".hfpatch.tmp"
# ".<file name>.<mkstemp's 8 random characters>.hfpatch.tmp": the only names stale-temp cleaning touches
TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX) + "$")


class FileError(UserError):
    """A file or directory hfpatch cannot read or write."""


def cache_dir() -> Path:
    """$HFPATCH_CACHE, else $XDG_CACHE_HOME/hfpatch, else ~/.cache/hfpatch (not created here)."""
    configured = os.environ.get("HFPATCH_CACHE")
    if configured:
        return Path(configured)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "hfpatch"  # XDG: ignore a relative value


def os_error(exc: OSError, path: Path, doing: str) -> FileError:
    """``cannot <doing> <path>: <why>; <what to change>`` for an OSError."""
    able = "readable" if doing == "read" else "writable"
    why = {
        errno.EACCES: f"permission denied; make it {able} (chmod) or run as a user who may",
        errno.EPERM: f"operation not permitted; make it {able} or run as a user who may",
        errno.EROFS: "read-only file system; work on a copy on a writable one",
        errno.ENOSPC: "no space left on the device; free some space and run the command again",
        errno.EDQUOT: "disk quota exceeded; free some space and run the command again",
    }.get(exc.errno, (exc.strerror or str(exc)).lower())
    unchanged = " (nothing was changed)" if doing != "read" else ""
    return FileError(f"cannot {doing} {path}: {why}{unchanged}")


def read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise os_error(exc, path, "read") from None


def refuse_symlink(path: Path) -> None:
    """GNU patch refuses a symlink target ("not a regular file"); replacing the link would leave its file as it was."""
    path = Path(path)
    if path.is_symlink():
        real = path.resolve()
        raise FileError(f"{path} is a symbolic link to {real}; like GNU patch, hfpatch does not write through "
                        f"links: pass the file itself ({real})")


def atomic_write(path: Path, data: bytes) -> None:
    """Write a temp file beside ``path``, then rename it over: readers see the old bytes or the new, never half.

    The temp file is locked while written, so a later write tells what a killed write left (unlocked)
    from one in progress, and removes it.
    """
    path = Path(path)
    refuse_symlink(path)
    started = time.time()
    remove_stale_temps(path.parent, older_than=started)
    try:
        mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    except OSError as exc:
        raise os_error(exc, path.parent, "write in") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released by the kernel if this process dies
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise os_error(exc, path, "write") from None
        raise


def remove_stale_temps(directory: Path, older_than: float | None = None) -> list[Path]:
    """Remove the temp files killed atomic writes left in ``directory``; best effort, never raises.

    Only files of our naming, last written before ``older_than`` (default: now) and not locked by a
    live writer.
    """
    older_than = time.time() if older_than is None else older_than
    try:
        names = [name for name in os.listdir(directory) if TEMP_NAME.match(name)]
    except OSError:
        return []
    removed = []
    for name in names:
        path = Path(directory) / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_mtime >= older_than:
                continue
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                path.unlink()
            except OSError:  # locked: a write in progress; or already gone
                continue
        removed.append(path)
    return removed


@contextlib.contextmanager
def file_lock(key: str) -> Iterator[None]:
    """An exclusive lock shared by every process on this machine that uses ``key`` (in the cache dir)."""
    lock_dir = cache_dir() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".lock")
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
