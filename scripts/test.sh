#!/usr/bin/env bash
# Set up, then the CI gate: the lint gate (ruff, pyproject.toml), every materialized file matches its
# manifest hash, every patch applies cleanly to its pin, the test suite passes, and the legacy
# transformers pin passes in its own env.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check hfpatch scripts tests
.venv/bin/hfpatch sync --all
.venv/bin/hfpatch check
.venv/bin/python -m pytest -q "$@"
bash scripts/test_legacy.sh
