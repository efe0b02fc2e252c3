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


def isp(path: Path, out: Path) -> None:
    report = json.loads(path.read_text())
    rows = [r for r in report["weak_scaling"] if "tokens_per_s_per_gpu" in r]
    long_doc = [r for r in report["long_document"] if "tokens_per_s" in r]
    fig, (weak, versus) = plt.subplots(1, 2, figsize=(9, 3.5))
    weak.bar([f"sp={r['sp']}" for r in rows], [r["tokens_per_s_per_gpu"] / 1e3 for r in rows], color="tab:green")
    for i, r in enumerate(rows):
        weak.annotate(f"{r['efficiency']:.0%}", (i, r["tokens_per_s_per_gpu"] / 1e3), ha="center", va="bottom")
    weak.set_ylabel("real tokens/s per GPU (thousands)")
    weak.set_title(f"weak scaling, {report['tokens_per_gpu']} tokens/GPU", fontsize=9)
    versus.bar([r["method"].replace(" (", "\n(") for r in long_doc], [r["tokens_per_s"] / 1e3 for r in long_doc],
               color=["tab:green", "grey"][: len(long_doc)])
    versus.set_ylabel("tokens/s (thousands)")
    versus.set_title(f"one {long_doc[0]['tokens'] // 1024}K-token document" if long_doc else "", fontsize=9)
    versus.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"ISP, {report['world']} x {report['card']}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def mfu(path: Path, out: Path) -> None:
    report = json.loads(path.read_text())
    rows = [r for r in report["results"] if "mfu" in r]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar([r["contender"] for r in rows], [100 * r["mfu"] for r in rows], color="tab:green")
    ax.axhline(45, color="tab:red", linestyle="--", label="target 45%")
    ax.set_ylabel("MFU (%)")
    ax.legend()
    ax.set_title(f"{report['config']['tokens_per_step']}-token packs, {report['card']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def profiles(paths: list[Path], out: Path) -> None:
    reports = [json.loads(p.read_text()) for p in paths]
    categories = sorted({c for r in reports for c in r["categories_ms"]})
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bottom = [0.0] * len(reports)
    for category in categories:
        per_step = [r["categories_ms"].get(category, 0.0) / r["profiled_steps"] for r in reports]
        ax.bar([f"sp={r['sp']}" for r in reports], per_step, bottom=bottom, label=category)
        bottom = [b + v for b, v in zip(bottom, per_step)]
    ax.set_ylabel("GPU kernel time per step (ms)")
    ax.set_title(f"where a step's GPU time goes, {reports[0]['card']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def max_length(path: Path, out: Path) -> None:
    report = json.loads(path.read_text())
    trials = sorted(report["trials"], key=lambda t: t["tokens"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for t in trials:
        ok = bool(t.get("ok"))
        height = t["peak_mem_gib_max_rank"] if ok else 80
        ax.bar(f"{t['tokens'] // 1024}K", height, color="tab:green" if ok else "tab:red", hatch="" if ok else "//")
        ax.annotate(f"{t['step_s']:.0f} s/step" if ok else t.get("error", "failed"), (f"{t['tokens'] // 1024}K", height),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("peak memory, worst GPU (GiB)")
    ax.set_title(f"{report['model']}, {report['nproc']} GPUs: longest that trains {report['longest_ok'] // 1024}K", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/bench")
    packing(folder / "packing.json", folder / "packing.png")
    attention(folder / "attention.json", folder / "attention.png")
    isp(folder / "isp.json", folder / "isp.png")
    mfu(folder / "mfu.json", folder / "mfu.png")
    profiles(sorted(folder.glob("profile_sp*.json")), folder / "profile.png")
    max_length(folder / "max_length.json", folder / "max_length.png")
