#!/usr/bin/env bash
# Set up, then the CI gate: every materialized file matches its manifest hash, every patch applies
# cleanly to its pin, and the test suite passes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/hfpatch sync --all
.venv/bin/hfpatch check
.venv/bin/python -m pytest -q "$@"
