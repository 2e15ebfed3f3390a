#!/usr/bin/env bash
# Set up .venv and run every check CI runs: lint, format, types, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy -p crop_clusterd  # strict; typings/ maps the import name to daemon/
.venv/bin/mypy scripts tests
.venv/bin/python -m pytest "$@"
