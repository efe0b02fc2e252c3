#!/usr/bin/env bash
# Create .venv with the pinned torch first (on a machine without a GPU: the local CPU build; an unpinned
# torch would pull a multi-GB CUDA build), then hfpatch itself in editable mode (the zoo lives beside the
# package). --gpu: torch's default (CUDA) build and the GPU extra (flash-attn 4; wheels only, nothing compiles),
# matched to torch's CUDA major version.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRA=test
[ "${1:-}" = "--gpu" ] && EXTRA=gpu
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet)
[ -d /opt/wheels ] && PIP+=(--find-links /opt/wheels)
"${PIP[@]}" "torch==${HFPATCH_TORCH:-2.13.0}"
if [ "$EXTRA" = gpu ]; then
  cuda=$(.venv/bin/python -c 'import torch; print((torch.version.cuda or "").split(".")[0])')
  [ -n "$cuda" ] || { echo "error: --gpu needs a CUDA build of torch; this one is $(.venv/bin/python -c 'import torch; print(torch.__version__)')" >&2; exit 1; }
  [ "$cuda" -ge 13 ] && EXTRA=gpu-cu13
fi
"${PIP[@]}" -e ".[$EXTRA]"
echo "hfpatch installed in $(pwd)/.venv ($EXTRA)"
