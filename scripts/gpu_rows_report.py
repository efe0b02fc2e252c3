#!/usr/bin/env python
"""docs/gpu_rows.md from the JSON that scripts/gpu_rows.py writes: one table, one line per zoo row.

    python scripts/gpu_rows_report.py docs/bench/rows --out docs/gpu_rows.md
    python scripts/gpu_rows_report.py RUN1 RUN2 --out docs/gpu_rows.md   # cells of RUN2 replace RUN1's

A stage or row missing from the results shows as "not run". Needs only the standard library.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

STAGES = ("numerics", "train", "mamba", "two_gpus")
COLUMNS = ("row", "numerics (packed / alone error)", "packed tokens/s", "padded tokens/s", "speedup", "MFU",
           "peak GiB (packed / padded)", "loss first → last", "2 GPUs (sp=2 vs 1 GPU)")


def load(results: Path) -> dict[str, dict]:
    stages = {}
    for name in STAGES:
        path = results / f"{name}.json"
        if path.exists():
            stages[name] = json.loads(path.read_text())
    return stages


def _measured(unit) -> bool:
    return isinstance(unit, dict) and bool(unit.get("steps") or unit.get("status") == "ok")


def merge(runs: list[dict[str, dict]]) -> dict[str, dict]:
    """Several runs' stages as one: a later run's measured row (train: a row's layout; mamba: a part) replaces an
    earlier one; what a later run did not measure keeps the earlier result."""
    merged: dict[str, dict] = {}
    for stages in runs:
        for name, stage in stages.items():
            if name not in merged:
                merged[name] = copy.deepcopy(stage)
                continue
            into = merged[name]
            if "rows" not in stage:  # mamba: speed and activations
                into.update({part: stage[part] for part in ("speed", "activations") if _measured(stage.get(part))})
                continue
            rows = into.setdefault("rows", {})
            for row, result in stage["rows"].items():
                if name == "train":
                    layouts = rows.setdefault(row, {})
                    layouts.update({layout: unit for layout, unit in result.items() if _measured(unit) or layout not in layouts})
                elif _measured(result) or row not in rows:
                    rows[row] = result
    return merged


def _tokens(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value / 1000:.1f}K" if value >= 1000 else f"{value:.0f}"


def _short(status: str) -> str:
    return status if len(status) <= 40 else status[:37] + "..."


def numerics_cell(result: dict | None) -> str:
    if not result:
        return "not run"
    if result.get("status") != "ok":
        return _short(result.get("status", "not run"))
    packed, alone = result["errors"]["packed"], result["errors"]["alone"]
    shown = [q for q in ("output", "grads", "aux_loss") if q in packed]
    detail = ", ".join(f"{result['output'] if q == 'output' else q} {packed[q]:.1e} / {alone[q]:.1e}" for q in shown)
    verdict = "pass" if result["passed"] else "FAIL " + ",".join(q for q, ok in result["checks"].items() if not ok)
    guard = "" if result["leak_guard"]["fails_the_rule"] else " (guard did not trip)"
    return f"{verdict}: {detail}{guard}"


def _run_tokens(run: dict | None) -> str:
    if not run:
        return "not run"
    if not run.get("steps"):
        return _short(run.get("stopped") or run.get("status", "not run"))
    partial = f" ({run['steps']} steps)" if run.get("stopped") else ""
    return _tokens(steady_rate(run)) + partial


def steady_rate(run: dict) -> float:
    """The median step's tokens/s where the run recorded it (not a step waiting for kernels to compile), else the mean."""
    return run.get("median_step_tokens_per_s") or run["tokens_per_s"]


def train_cells(result: dict | None) -> list[str]:
    """packed tokens/s, padded tokens/s, speedup, MFU, peak GiB, loss."""
    packed, padded = (result or {}).get("packed"), (result or {}).get("padded")
    speedup = "—"
    if packed and padded and packed.get("steps") and padded.get("steps"):
        speedup = f"{steady_rate(packed) / steady_rate(padded):.2f}×"
    mfu = f"{packed['mfu']:.1%}" if packed and packed.get("mfu") is not None else "—"
    peaks = [f"{run['peak_mem_gib']:.2f}" if run and run.get("peak_mem_gib") is not None else "—" for run in (packed, padded)]
    loss = "—"
    if packed and packed.get("steps"):
        loss = f"{packed['loss_first']:.3f} → {packed['loss_last']:.3f}" + ("" if packed["loss_down"] else " (not down)")
    padded_cell = "packed only" if padded and padded.get("status", "").startswith("not run: trains packed") else _run_tokens(padded)
    return [_run_tokens(packed), padded_cell, speedup, mfu, " / ".join(peaks), loss]


def two_gpus_cell(stage: dict | None, row: str) -> str:
    if not stage:
        return "not run"
    if "rows" not in stage:
        return _short(stage.get("status", "not run"))
    run = stage["rows"].get(row)
    if not run:
        return "not run"
    curve = run.get("curve")
    if not curve:
        return _short(run.get("status", "not run"))
    verdict = "✓" if curve["matches_one_gpu"] else "✗"
    return f"{verdict} max Δ {curve['max_relative_difference']:.2%} over {curve['steps']} steps"


def table(stages: dict[str, dict], rows: list[str]) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    numerics = stages.get("numerics", {}).get("rows", {})
    train = stages.get("train", {}).get("rows", {})
    for row in rows:
        cells = [row, numerics_cell(numerics.get(row)), *train_cells(train.get(row)), two_gpus_cell(stages.get("two_gpus"), row)]
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    return lines


def mamba_lines(stage: dict | None) -> list[str]:
    if not stage:
        return ["- Mamba's scan against transformers' unpatched Mamba: not run."]
    lines = []
    speed = stage.get("speed", stage.get("setup", {}))
    if speed.get("status") == "ok":
        packed, padded = speed["packed"], speed["padded_unpatched"]
        memory = ""
        if packed.get("peak_mem_gib") is not None:
            memory = f", peak {packed['peak_mem_gib']:.2f} GiB vs {padded['peak_mem_gib']:.2f} GiB"
        lines.append(
            f"- Mamba, whole model forward + backward on {speed['rows']} trainer rows of {speed['seq_len']} tokens "
            f"({speed['dtype'].removeprefix('torch.')}): packed through the patched parallel scan "
            f"{_tokens(packed['tokens_per_s'])} real tokens/s, transformers' unpatched MambaForCausalLM (its torch "
            f"path) on padded batches of the same documents {_tokens(padded['tokens_per_s'])}: "
            f"**{speed['speedup']:.2f}×**{memory}; mean losses differ by {speed['loss_relative_difference']:.1e} (relative).")
    else:
        lines.append(f"- Mamba speed against the unpatched model: {speed.get('status', 'not run')}.")
    activations = stage.get("activations", {})
    if activations.get("status") == "ok":
        parts = []
        for point in activations["points"]:
            packed, padded = point["packed"], point["padded_unpatched"]
            peak = f", peak {packed['peak_mib']:.0f} / {padded['peak_mib']:.0f} MiB" if "peak_mib" in packed else ""
            parts.append(f"{point['real_tokens']} tokens (padded {'×'.join(map(str, point['padded_shape']))}): "
                         f"{packed['saved_kib_per_token']:.1f} / {padded['saved_kib_per_token']:.1f} KiB a token{peak}, "
                         f"{packed['seconds'] * 1000:.0f} / {padded['seconds'] * 1000:.0f} ms")
        lines.append("- One MambaMixer forward + backward, packed / padded (unpatched): activations saved for "
                     "backward, " + "; ".join(parts) + ".")
    else:
        lines.append(f"- MambaMixer activations: {activations.get('status', 'not run')}.")
    return lines


def problems(stages: dict[str, dict]) -> list[str]:
    found = []
    for name in ("numerics", "train", "two_gpus"):
        for row, result in stages.get(name, {}).get("rows", {}).items():
            units = result.items() if name == "train" else [("", result)]
            for layout, unit in units:
                if unit.get("status") == "error":
                    found.append(f"- {name} {row}{' ' + layout if layout else ''}: `{unit['error'].splitlines()[0][:300]}`")
    return found


def render(stages: dict[str, dict]) -> str:
    if not stages:
        raise ValueError("no stage results (numerics.json, train.json, ...)")
    env = next(iter(stages.values()))["environment"]
    packages = env["packages"]
    versions = ", ".join(f"{name} {packages[name]}" for name in ("transformers", "diffusers", "flash-attn-4", "liger-kernel")
                         if packages.get(name))
    lines = [
        "# Every zoo row on one GPU",
        "",
        f"{env['device']}; torch {env['torch']}, {versions}; Python {env['python']}. Attention backend (auto): "
        f"{env['attention_backend']}. Fused loss: {env['fused_loss']}. Produced by `scripts/gpu_rows.py`, "
        f"rendered by `scripts/gpu_rows_report.py`; raw numbers in the JSON beside it.",
        "",
        *table(stages, env.get("all_rows") or list(dict.fromkeys(r for s in stages.values() for r in s.get("rows", {})))),
        "",
        f"- Numerics: {env['dtype'].removeprefix('torch.')} packed (one pack of all documents, ending in a padding "
        f"segment) and {env['dtype'].removeprefix('torch.')} alone (each document by itself) are each compared with a "
        f"{env['reference_dtype'].removeprefix('torch.')} run of the documents alone; relative L2 errors of the logits "
        "(Flux: velocities) and of all gradients together (Mixtral also its router aux loss), shown packed / alone. "
        "Packed passes when its error is at most 2× the alone run's plus a floor: as accurate as the per-document "
        "run in the same precision. A guard runs the pack with documents not kept apart; it must fail that rule.",
        f"- Training: `hfpatch train ROW` for {env['steps']} steps, {env['micro_num']} micro-batches of one "
        f"{env['seq_len']}-token row a step ({'decoder layers compiled' if env['compile'] else 'eager'}), "
        f"{'documents of `' + Path(env['data']).name + '`' if env.get('data') else 'the embedded corpus'}; padded runs "
        "train the same documents one per row (`--padded`). Real tokens/s of the median step after the first 10% "
        "(runs that recorded it; else the mean over those steps); MFU is the trainer's (6 × matmul parameters a "
        "token plus attention: causal, Flux's non-causal, none for Mamba); peak memory is torch's max allocated. "
        "Each run's exact command line is in train.json.",
        *mamba_lines(stages.get("mamba")),
    ]
    found = problems(stages)
    if found:
        lines += ["", "Errors:", *found]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+", help="the --out dir of scripts/gpu_rows.py; several: "
                        "later runs' measured cells replace earlier ones")
    parser.add_argument("--out", type=Path, default=Path("docs/gpu_rows.md"))
    args = parser.parse_args(argv)
    try:
        text = render(merge([load(results) for results in args.results]))
    except (ValueError, KeyError, json.JSONDecodeError) as exc:
        where = " ".join(map(str, args.results))
        print(f"error: {where}: cannot render the report ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
