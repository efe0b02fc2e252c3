#!/usr/bin/env bash
# Create .venv with the pinned CPU torch first (an unpinned torch would pull a multi-GB CUDA build),
# then hfpatch itself in editable mode (the zoo lives beside the package).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet)
[ -d /opt/wheels ] && PIP+=(--find-links /opt/wheels)
"${PIP[@]}" "torch==${HFPATCH_TORCH:-2.13.0}"
"${PIP[@]}" -e '.[test]'
echo "hfpatch installed in $(pwd)/.venv"
