"""The run directory (``--out``): checked before anything is built, locked for the whole run.

One process per run holds an exclusive ``flock`` on ``<run>/.lock``: the single process,
rank 0 of a plain torchrun launch, or the ``--nproc`` launcher (its workers then take
none). The kernel drops the lock when its holder dies, so ``kill -9`` leaves none behind.
``--resume never`` moves an earlier run's directory aside instead of refusing it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from .errors import TrainError

LOCK_FILE = ".lock"
# What makes a directory an earlier run worth moving aside.
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl")


def check_run_dir(path: Path, label: str = "--out") -> None:
    """Create ``path`` if needed and make sure files can be written in it; ``label`` names the setting in errors."""
    if path.exists() and not path.is_dir():
        raise TrainError(f"{label} {path} is a file, not a directory; pass a directory for the run's checkpoints and metrics")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise TrainError(f"{label} {path} is not writable ({exc.strerror}); pass a directory you can write to") from None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    lock_path = path / LOCK_FILE
    with open(lock_path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise TrainError(
                f"--out {path} is in use by another training run (pid {holder}); wait for it to finish or stop it, "
                f"or pass another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield


def _has_run_outputs(path: Path) -> bool:
    return any((path / name).exists() for name in RUN_OUTPUTS)


def _aside_name(path: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, n = path.with_name(f"{path.name}.old-{stamp}"), 1
    while candidate.exists():
        candidate, n = path.with_name(f"{path.name}.old-{stamp}-{n}"), n + 1
    return candidate


@contextlib.contextmanager
def claim_run_dir(path: Path, fresh: bool, log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold ``path`` for this run; with ``fresh`` an earlier run there is first renamed aside."""
    check_run_dir(path)
    with _locked(path):
        if not (fresh and _has_run_outputs(path)):
            yield
            return
        aside = _aside_name(path)
        path.rename(aside)  # under its lock, so no run still writes there
        log(f"--resume never: moved the earlier run {path} to {aside}")
    check_run_dir(path)
    with _locked(path):
        yield
