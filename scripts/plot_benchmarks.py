"""Plots for docs/benchmarks.md from the raw JSON the benchmark scripts write."""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def packing(path: Path, out: Path) -> None:
    report = json.loads(path.read_text())
    rows = [r for r in report["results"] if "error" not in r]
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(9, 3.5))
    names = [r["contender"] for r in rows]
    speed.bar(names, [r["real_tokens_per_s"] / 1e3 for r in rows], color=["grey", "tab:blue", "tab:green"][: len(rows)])
    speed.set_ylabel("real tokens/s (thousands)")
    memory.bar(names, [r["peak_mem_gib"] for r in rows], color=["grey", "tab:blue", "tab:green"][: len(rows)])
    memory.set_ylabel("peak memory (GiB)")
    fig.suptitle(f"Llama ~{report['params'] / 1e9:.2f}B bf16 fwd+bwd, {report['card']}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def attention(path: Path, out: Path) -> None:
    report = json.loads(path.read_text())
    rows = [r for r in report["rows"] if "tflops" in r]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{r['lengths']}\n{r['backend']}" for r in rows]
    ax.bar(range(len(rows)), [r["tflops"] for r in rows],
           color=["tab:orange" if r["backend"].startswith("dense") else "tab:green" for r in rows])
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("TFLOP/s (causal work only)")
    ax.set_title(f"attention fwd+bwd, {report['card']}, torch {report['torch']}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/bench")
    packing(folder / "packing.json", folder / "packing.png")
    attention(folder / "attention.json", folder / "attention.png")
