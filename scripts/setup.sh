#!/usr/bin/env bash
# Create (or update) the virtual environment .venv in the checkout and install
# crop-clusterd into it, editable, with the development tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch is pinned in pyproject.toml to the CPU build these machines carry locally.
.venv/bin/python -m pip install --quiet -e '.[dev]'
