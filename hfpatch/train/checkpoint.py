"""Sharded, atomic checkpoints with ``torch.distributed.checkpoint``.

Layout of ``<run>/checkpoints/step_00000012/``::

    dcp/                 model + optimizer, each rank writing its own shards
    rng/rank{r}.pt       each rank's RNG states
    trainer_state.json   step, data position, scheduler, run shape
    COMPLETE             written last

Every rank writes into ``.tmp-step_...``; after a barrier rank 0 adds
``trainer_state.json`` and ``COMPLETE`` and renames the directory into place. A
crash at any point before the rename leaves only a temp dir, which is ignored and
later removed, so the previous checkpoint stays the newest usable one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from . import faults
from .errors import TrainError

STEP_DIR = re.compile(r"^step_(\d+)$")
MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


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


def find_checkpoint(path: Path) -> Path:
    """``path`` itself if it is a checkpoint, else the newest one inside it."""
    if is_complete(path):
        return path
    found = complete_checkpoints(path)
    if not found:
        raise TrainError(f"no complete checkpoint at {path}")
    return found[-1]


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
        """Collective: every rank must call it. Returns the committed directory."""
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp-{final.name}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        _barrier()
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / "dcp"))
        torch.save(_rng_state(), tmp / "rng" / f"rank{self.rank}.pt")
        _barrier()
        faults.maybe_crash(step, self.rank, "save")
        if self.rank == 0:
            self._commit(tmp, final, trainer_state)
        _barrier()
        return final

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
    def load(path: Path, model, optimizer, *, rank: int, world: int) -> dict[str, Any]:
        """Restore model, optimizer and (same world size only) RNG; return the trainer state."""
        trainer_state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        try:
            dcp.load(state, checkpoint_id=str(path / "dcp"))
        except Exception as exc:
            raise TrainError(f"cannot load checkpoint {path} into this model: {str(exc).splitlines()[0]}") from None
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        rng_file = path / "rng" / f"rank{rank}.pt"
        if trainer_state.get("world_size") == world and rng_file.exists():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        return trainer_state
