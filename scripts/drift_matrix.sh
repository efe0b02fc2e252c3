#!/usr/bin/env bash
# The wide drift matrix: every library-model patch against every transformers 5.x release plus the
# legacy 4.x pin (and every diffusers release for Flux), written to docs/drift.md (+ docs/drift.json).
# Wheels are fetched once into the hfpatch cache; expect a few hundred MB on the first run.
set -euo pipefail
cd "$(dirname "$0")/.."
HFPATCH=${HFPATCH:-hfpatch}
LEGACY=${HFPATCH_LEGACY_TRANSFORMERS:-4.57.6}
mkdir -p docs
python3 - "$HFPATCH" "$LEGACY" <<'PY'
import json, subprocess, sys
from hfpatch import drift, zoo
hfpatch, legacy = sys.argv[1], sys.argv[2]
entries = zoo.load_zoo()
versions = {"transformers": drift.release_versions("transformers", major="5") + [legacy],
            "diffusers": drift.release_versions("diffusers", latest=12)}
results = []
for package, wanted in versions.items():
    group = [e for e in entries if e.upstream.package == package]
    results += drift.drift(group, wanted, entries, progress=lambda r: print(f"{r.model:10s} {r.version:8s} {r.state}", flush=True))
json.dump([r.as_dict() for r in results], open("docs/drift.json", "w"), indent=1)
models = sorted({r.model for r in results})
mark = {"pin": "**pin**", "identical": "= pin", "clean": "clean", "offsets": "offsets", "fails": "FAILS", "missing": "no file", "error": "error"}
lines = ["# Drift matrix", "",
         "How each zoo patch (made for its pin) applies to other upstream releases, measured by",
         "`scripts/drift_matrix.sh` (`hfpatch drift`). `= pin`: the release ships the same bytes; `clean`:",
         "the file differs and the patch applies exactly; `offsets`: applies with line offsets; `FAILS`: a",
         "hunk does not apply (details in `docs/drift.json`) — rebase with `hfpatch refresh MODEL --to V`.",
         "Entries with a dedicated patch for a release list it under `patches/` (Llama2, Qwen2 and",
         f"Mixtral have one for transformers {legacy}).", ""]
for package, wanted in versions.items():
    rows = [m for m in models if any(r.model == m and r.package == package for r in results)]
    if not rows:
        continue
    lines += [f"## {package}", "", "| release | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    for version in wanted:
        cells = []
        for m in rows:
            r = next((r for r in results if r.model == m and r.version == version and r.package == package), None)
            cells.append(mark[r.state] if r else "")
        lines.append(f"| {version} | " + " | ".join(cells) + " |")
    lines.append("")
open("docs/drift.md", "w").write("\n".join(lines))
print("wrote docs/drift.md")
PY
