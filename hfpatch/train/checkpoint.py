"""Sharded, atomic checkpoints with ``torch.distributed.checkpoint``.

Layout of ``<run>/checkpoints/step_00000012/``::

    dcp/                 model + optimizer, each rank writing its own shards
    rng/rank{r}.pt       each rank's RNG states
    trainer_state.json   step, data position, scheduler, run shape
    COMPLETE             written last

Every rank writes into ``.tmp-step_...``; after a barrier rank 0 adds
``trainer_state.json`` and ``COMPLETE`` and renames the directory into place. A
crash at any point before the rename leaves only a temp dir, which is ignored and
later removed, so the previous checkpoint stays the newest usable one; a failed
write (a full disk) removes the temp dir and stops the run with one error line.

Loading checks the saved shapes against the model first (a checkpoint no model of
this shape can take is a ``TrainError``); a checkpoint whose files cannot be read
raises ``UnreadableCheckpointError``, and the caller may fall back to an older one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from . import faults
from .errors import TrainError, UnreadableCheckpointError
from .launch import all_ranks_max

STEP_DIR = re.compile(r"^step_(\d+)$")
MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _fresh_temp_dir(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "rng").mkdir(parents=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / STATE_FILE).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Usable checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def checkpoints_at(path: Path) -> list[Path]:
    """``path`` itself if it is a checkpoint, else the complete ones inside it, newest first."""
    if is_complete(path):
        return [path]
    found = complete_checkpoints(path)
    if not found:
        raise TrainError(f"no complete checkpoint at {path}")
    return found[::-1]


def _reason(exc: BaseException) -> str:
    """The first sentence of what went wrong (DCP wraps each rank's exception in a CheckpointException)."""
    if isinstance(exc, CheckpointException) and exc.failures:
        exc = next(iter(exc.failures.values()))[0]
    lines = str(exc).strip().splitlines()
    return lines[0].split(". ")[0] if lines else type(exc).__name__


def _attempt(action: Callable[[], Any], errors: tuple[type[BaseException], ...]) -> str | None:
    """Run ``action``; None if it worked, else why it failed. CheckpointException is a BaseException."""
    try:
        action()
    except (*errors, CheckpointException) as exc:
        return _reason(exc)
    return None


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's trainer_state.json."""
    try:
        return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UnreadableCheckpointError(f"checkpoint {path} cannot be read: {STATE_FILE}: {_reason(exc)}") from None


def _check_fits(path: Path, model_state: dict[str, Any]) -> None:
    """Every weight of the model is in the checkpoint with the same (global) shape."""
    try:
        saved = dcp.FileSystemReader(str(path / "dcp")).read_metadata().state_dict_metadata
    except Exception as exc:  # a missing or truncated .metadata: several error types
        raise UnreadableCheckpointError(f"checkpoint {path} cannot be read: {_reason(exc)}") from None
    hint = ("train with the model settings it was saved with (its run's config.json), "
            "or start a new run (another --out, or --resume never to move this run aside)")
    for name, tensor in model_state.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        meta = saved.get(f"model.{name}")
        if meta is None:
            raise TrainError(f"checkpoint {path} does not fit this model: it has no weight {name}; {hint}")
        if tuple(meta.size) != tuple(tensor.shape):
            raise TrainError(f"checkpoint {path} does not fit this model: {name} is {list(meta.size)} there and "
                             f"{list(tensor.shape)} here; {hint}")


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    def __init__(self, root: Path, keep: int, rank: int) -> None:
        self.root = Path(root)
        self.keep = keep
        self.rank = rank

    def latest(self) -> Path | None:
        found = complete_checkpoints(self.root)
        return found[-1] if found else None

    def save(self, step: int, model, optimizer, trainer_state: dict[str, Any]) -> Path:
        """Collective: every rank must call it. Returns the committed directory.

        If any rank fails to write (a full disk), every rank raises TrainError and the
        temp dir is removed: the previous checkpoint stays the newest.
        """
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp-{final.name}"
        # Each agreement is also the barrier between the phases.
        self._agree_saved(step, tmp, _attempt(lambda: _fresh_temp_dir(tmp), (OSError,)) if self.rank == 0 else None)
        self._agree_saved(step, tmp, _attempt(lambda: self._write(step, tmp, model, optimizer), (OSError, RuntimeError)))
        error = _attempt(lambda: self._commit(tmp, final, trainer_state), (OSError,)) if self.rank == 0 else None
        self._agree_saved(step, tmp, error)
        return final

    def _write(self, step: int, tmp: Path, model, optimizer) -> None:
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / "dcp"))
        torch.save(_rng_state(), tmp / "rng" / f"rank{self.rank}.pt")
        faults.maybe_crash(step, self.rank, "save")

    def _agree_saved(self, step: int, tmp: Path, error: str | None) -> None:
        if not all_ranks_max(error is not None):
            return
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        latest = self.latest()
        kept = f"the newest checkpoint is still {latest}" if latest else "no checkpoint was saved before"
        raise TrainError(f"cannot save the step {step} checkpoint in {self.root}: {error or 'it failed on another rank'}; {kept}")

    def _commit(self, tmp: Path, final: Path, trainer_state: dict[str, Any]) -> None:
        _write_durable(tmp / STATE_FILE, json.dumps(trainer_state, indent=2))
        _write_durable(tmp / MARKER, "")
        if final.exists():  # the same step saved by an earlier attempt: replace it
            stale = final.with_name(f".stale-{final.name}")
            shutil.rmtree(stale, ignore_errors=True)
            final.rename(stale)
        tmp.rename(final)
        _fsync_dir(self.root)
        self._prune()

    def _prune(self) -> None:
        for old in complete_checkpoints(self.root)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for leftover in self.root.glob(".*-step_*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def clean_partial(self) -> None:
        """Remove temp dirs a crashed save left behind (rank 0, before training)."""
        if self.rank == 0 and self.root.is_dir():
            for leftover in self.root.glob(".*-step_*"):
                shutil.rmtree(leftover, ignore_errors=True)
        _barrier()

    @staticmethod
    def load(path: Path, trainer_state: dict[str, Any], model, optimizer, *, rank: int, world: int) -> None:
        """Restore model, optimizer and (same world size only) RNG: all ranks, or none (then raise)."""
        model_state, optim_state = get_state_dict(model, optimizer)
        _check_fits(path, model_state)
        state = {"model": model_state, "optim": optim_state}
        rng_file = path / "rng" / f"rank{rank}.pt"
        rng: dict[str, Any] = {}

        def read() -> None:
            dcp.load(state, checkpoint_id=str(path / "dcp"))
            if trainer_state.get("world_size") == world and rng_file.exists():
                rng["state"] = torch.load(rng_file, weights_only=False)

        error = _attempt(read, (Exception,))  # a truncated file: zip, pickle, EOF and OS errors
        if all_ranks_max(error is not None):
            raise UnreadableCheckpointError(f"checkpoint {path} cannot be read: {error or 'it failed on another rank'}")
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if rng:
            _set_rng_state(rng["state"])
