"""Fault injection for tests of recovery paths, driven by $HFPATCH_FAULT.

``HFPATCH_FAULT="kind:key=value:..."`` (several separated by ``;``). Kinds:
``exit`` (os._exit), ``kill`` (SIGKILL to itself, like ``kill -9``), ``sigint`` /
``sigterm`` (that signal to itself, like Ctrl-C / ``kill``), ``enospc`` (an OSError
"No space left on device"), ``nan`` (the loss of that step becomes NaN). Keys:
``step`` (required), ``rank`` (global rank, default any), ``attempt`` (torchrun's
TORCHELASTIC_RESTART_COUNT, default any), ``where`` (``step``: after the step, before
its checkpoint -- the default; ``save``: inside the checkpoint save, after the files
are written, before they are committed), ``code`` (exit status for ``exit``, default 42).
"""

from __future__ import annotations

import errno
import os
import signal
from dataclasses import dataclass

import torch

ENV = "HFPATCH_FAULT"
SIGNALS = {"kill": signal.SIGKILL, "sigint": signal.SIGINT, "sigterm": signal.SIGTERM}


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None = None
    attempt: int | None = None
    where: str = "step"
    code: int = 42

    def applies(self, step: int, rank: int, where: str) -> bool:
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        return (
            self.step == step and self.where == where
            and self.rank in (None, rank) and self.attempt in (None, attempt)
        )


def parse_faults(text: str) -> list[Fault]:
    faults = []
    for spec in filter(None, (s.strip() for s in text.split(";"))):
        kind, *pairs = spec.split(":")
        if kind not in ("exit", "enospc", "nan", *SIGNALS):
            raise ValueError(f"{ENV}: unknown fault kind {kind!r} in {spec!r}")
        fields = dict(pair.split("=", 1) for pair in pairs)
        ints = {k: int(v) for k, v in fields.items() if k in ("step", "rank", "attempt", "code")}
        faults.append(Fault(kind=kind, where=fields.get("where", "step"), **ints))
    return faults


def _active(step: int, rank: int, where: str) -> list[Fault]:
    return [f for f in parse_faults(os.environ.get(ENV, "")) if f.applies(step, rank, where)]


def maybe_crash(step: int, rank: int, where: str) -> None:
    for fault in _active(step, rank, where):
        if fault.kind == "exit":
            os._exit(fault.code)
        if fault.kind in SIGNALS:
            os.kill(os.getpid(), SIGNALS[fault.kind])
        if fault.kind == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def maybe_poison(loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    if any(f.kind == "nan" for f in _active(step, rank, "step")):
        return loss * float("nan")
    return loss
