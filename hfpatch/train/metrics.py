"""Run metrics: per-step JSONL records, FLOPs/MFU, the loss plot and the end summary."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from hfpatch import files

from .batches import BatchStats

# Dense bf16 peak per GPU, TFLOP/s; $HFPATCH_PEAK_TFLOPS overrides.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "H20": 148.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L4": 121.0}


def peak_flops(device: torch.device) -> float | None:
    """Peak FLOP/s of one device, or None where MFU is not meaningful (CPU, unknown card)."""
    if device.type != "cuda":
        return None
    if os.environ.get("HFPATCH_PEAK_TFLOPS"):
        return float(os.environ["HFPATCH_PEAK_TFLOPS"]) * 1e12
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def step_flops(matmul_params: int, num_layers: int, hidden: int, stats: BatchStats) -> float:
    """Training FLOPs (forward + backward) of a step: 6 N per token plus causal attention
    within each document (6 x layers x hidden x sum of squared document lengths)."""
    return 6.0 * matmul_params * stats.real_tokens + 6.0 * num_layers * hidden * stats.attention_pairs


class MetricsLog:
    """metrics.jsonl, written by rank 0 only; one JSON object per optimizer step."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def start(self, resumed_step: int) -> None:
        """Drop records past the checkpoint being resumed (all of them on a fresh run)."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resumed_step] if resumed_step else []
        files.atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode("utf-8"))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl; a torn last line (killed mid-write) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_loss(records: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, loss_axis = plt.subplots(figsize=(7, 4))
    loss_axis.plot(steps, [r["loss"] for r in records], color="tab:blue", label="loss")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("loss", color="tab:blue")
    lr_axis = loss_axis.twinx()
    lr_axis.plot(steps, [r["lr"] for r in records], color="tab:gray", linestyle="--", linewidth=1, label="lr")
    lr_axis.set_ylabel("learning rate", color="tab:gray")
    loss_axis.set_title(title)
    loss_axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@dataclass
class RunSummary:
    model: str
    layout: str  # e.g. "world 2 = dp 1 x sp 2, wp 1"
    records: list[dict[str, Any]]  # this invocation's steps only
    final_step: int
    total_steps: int
    wall_s: float
    resumed_from: str | None = None
    checkpoint: str | None = None
    export: str | None = None
    paths: dict[str, str] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return sum(r["tokens"] for r in self.records)


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def format_summary(summary: RunSummary) -> str:
    """A short two-column table for the end of a run."""
    records = summary.records
    rows: list[tuple[str, str]] = [("model", summary.model), ("layout", summary.layout)]
    done = f" (this run: {len(records)})" if records else " (already done: raise --steps to go on, or use another --out)"
    rows.append(("steps", f"{summary.final_step}/{summary.total_steps}{done}"))
    if summary.resumed_from:
        rows.append(("resumed from", summary.resumed_from))
    if records:
        first, last, lowest = records[0], records[-1], min(r["loss"] for r in records)
        rows.append(("loss", f"{first['loss']:.4f} (step {first['step']}) -> {last['loss']:.4f} (step {last['step']}), min {lowest:.4f}"))
        rows.append(("tokens", f"{summary.tokens:,}"))
        rows.append(("tokens/s", f"{_mean(r['tokens_per_s'] for r in records[1:] or records):,.0f} (mean, first step excluded)"))
        rows.append(("packing efficiency", f"{_mean(r['packing_efficiency'] for r in records):.1%}"))
        mfu = [r["mfu"] for r in records[1:] if r.get("mfu") is not None]
        if mfu:
            rows.append(("MFU", f"{_mean(mfu):.1%}"))
    rows.append(("wall time", f"{summary.wall_s:.1f} s"))
    if summary.checkpoint:
        rows.append(("checkpoint", summary.checkpoint))
    if summary.export:
        rows.append(("HF export", summary.export))
    rows.extend(summary.paths.items())
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)
