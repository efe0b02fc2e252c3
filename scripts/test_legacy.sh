#!/usr/bin/env bash
# The legacy transformers 4.x pin in its own environment: the patch for the installed release is
# chosen automatically and the rows it serves (Llama2, Yi, InternLM1, Qwen2, Mixtral) pass the
# conformance suite and their own tests there too.
set -euo pipefail
cd "$(dirname "$0")/.."
LEGACY=${HFPATCH_LEGACY_TRANSFORMERS:-4.57.6}
PYTHON=${PYTHON:-python3}
[ -x .venv-legacy/bin/python ] || "$PYTHON" -m venv .venv-legacy
PIP=(.venv-legacy/bin/python -m pip install --quiet)
[ -d /opt/wheels ] && PIP+=(--find-links /opt/wheels)
"${PIP[@]}" "torch==${HFPATCH_TORCH:-2.13.0}"
"${PIP[@]}" "transformers==$LEGACY" click unidiff tokenizers safetensors tqdm matplotlib pytest
"${PIP[@]}" --no-deps -e .   # setup.cfg pins the default transformers; this env holds the legacy one
.venv-legacy/bin/hfpatch check
.venv-legacy/bin/python -m pytest -q tests/test_conformance.py -k "llama2 or yi or internlm1 or qwen2 or mixtral"
.venv-legacy/bin/python -m pytest -q tests/test_qwen2_equivalence.py tests/test_mixtral_equivalence.py \
  tests/test_drift.py::test_legacy_environment_picks_the_legacy_patch
