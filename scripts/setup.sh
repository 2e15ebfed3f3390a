#!/usr/bin/env bash
# Create (or update) the virtual environment .venv in the checkout and install
# crop-clusterd into it, editable, with the development tools, and with
# python-systemd (native journald logging) when libsystemd's headers are present.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch is pinned in pyproject.toml to the CPU build these machines carry locally.
# systemd-python is compiled against libsystemd, so it is only asked for when
# pkg-config finds the headers; a failed build (no compiler or Python.h) falls
# back to an install without it rather than leaving no environment at all.
NO_JOURNAL="journald logging falls back to console; for it: apt-get install libsystemd-dev pkg-config gcc python3-dev, then rerun scripts/setup.sh"
if command -v pkg-config >/dev/null 2>&1 && pkg-config --exists libsystemd; then
    if ! .venv/bin/python -m pip install --quiet -e '.[dev,systemd]'; then
        echo "setup: building systemd-python failed; $NO_JOURNAL" >&2
        .venv/bin/python -m pip install --quiet -e '.[dev]'
    fi
else
    echo "setup: libsystemd not found; $NO_JOURNAL" >&2
    .venv/bin/python -m pip install --quiet -e '.[dev]'
fi
