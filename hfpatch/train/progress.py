"""What rank 0 shows while training: a tqdm bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import os
import sys

from tqdm import tqdm


def _terminal_width() -> int:
    """Columns of the terminal on stderr; 0 when it is not a terminal (or reports no size)."""
    if not sys.stderr.isatty():
        return 0
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except OSError:
        return 0


class Progress:
    def __init__(self, *, enabled: bool, total: int, every: int) -> None:
        self.enabled = enabled
        self.total = total
        self.every = every
        self.bar = None
        self.first = None

    def begin(self, start: int) -> None:
        """Show the bar from step ``start`` (after setup messages have been logged)."""
        self.first = start + 1
        if self.enabled and _terminal_width() > 0:
            self.bar = tqdm(total=self.total, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def log(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def update(self, record: dict) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}", refresh=False)
            self.bar.update(1)
        elif record["step"] % self.every == 0 or record["step"] in (self.first, self.total):
            print(
                f"step {record['step']:>5}/{self.total}  loss {record['loss']:.4f}  grad_norm {record['grad_norm']:.3f}  "
                f"lr {record['lr']:.2e}  tokens/s {record['tokens_per_s']:,.0f}",
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
