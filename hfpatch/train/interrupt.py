"""SIGINT / SIGTERM during training: finish the step, save a checkpoint, say how to resume."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from .launch import all_ranks_max

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """While active, SIGINT / SIGTERM only note the signal; a second SIGINT aborts at once.

    ``agreed()`` at a step boundary is the signal seen by any rank (an all-reduce), so
    every rank stops after the same step and saves together.
    """

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._note) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _note(self, signum: int, frame) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def agreed(self) -> int:
        return all_ranks_max(self.signum)


def interrupted_message(signum: int, checkpoint: Path | None, run_dir: Path) -> str:
    name = signal.Signals(signum).name
    if checkpoint is None:
        return f"interrupted by {name}; no checkpoint in {run_dir}, so a rerun starts at step 1"
    return (f"interrupted by {name}; the newest checkpoint is {checkpoint}: rerun the same command to continue "
            f"from it (same --out {run_dir}, --resume auto)")
