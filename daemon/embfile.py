"""The embeddings pickle: ``embeddings.pkl`` writer and a restricted loader.

The loader accepts pickles from this tool and from the old batch tool, but
rebuilds only numpy arrays and builtin containers: any other global in a pickle
could run arbitrary code on load.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from . import atomic

__all__ = [
    "EMBEDDINGS_PKL",
    "ROW_CHUNK",
    "LoadedEmbeddings",
    "load_embeddings_pickle",
    "write_embeddings_pickle",
]

EMBEDDINGS_PKL: Final = "embeddings.pkl"
"""File name of :func:`write_embeddings_pickle`'s output in an output folder."""

ROW_CHUNK: Final = 65536
"""Embedding rows processed per step: bounds float64 scratch space to a few MB."""


def write_embeddings_pickle(
    path: Path,
    names: Sequence[str],
    embeddings: npt.NDArray[np.floating[Any]],
    labels: Sequence[str | None] | None = None,
) -> None:
    """Write ``embeddings.pkl``: a dict ``filename``, ``embedding`` (float32 n×d), ``label``.

    ``label`` is present only when labels are given. Pickle protocol 5 streams
    the array straight from memory, so writing needs no second copy of it.
    """
    array = np.ascontiguousarray(embeddings, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (n x d), got shape {array.shape}")
    if len(names) != array.shape[0]:
        raise ValueError(f"{len(names)} names but {array.shape[0]} embedding rows")
    payload: dict[str, object] = {"filename": list(names), "embedding": array}
    if labels is not None:
        if len(labels) != len(names):
            raise ValueError(f"{len(labels)} labels but {len(names)} names")
        payload["label"] = list(labels)
    # Through the module attribute, so a harness wrapping atomic.atomic_write sees it.
    atomic.atomic_write(path, lambda handle: pickle.dump(payload, handle, protocol=5))


@dataclass(frozen=True, slots=True, eq=False)
class LoadedEmbeddings:
    """Embeddings read from a pickle: L2-normalised float32 C-contiguous rows."""

    names: tuple[str, ...]
    embeddings: npt.NDArray[np.float32]
    labels: tuple[str | None, ...] | None


# What rebuilding numpy arrays, dtypes and plain containers needs, and nothing
# else: any other global in a pickle can run arbitrary code on load.
_NUMPY_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
}
_BUILTINS_ALLOWED = {"list", "dict", "tuple", "set", "frozenset", "bytes", "bytearray"}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays and builtin containers."""

    def find_class(self, module: str, name: str) -> Any:
        """Resolve an allowed global or raise ``ValueError`` naming the refused one."""
        if module.startswith("numpy.core."):
            # Pickles from numpy 1.x name the private core under its old path.
            module = "numpy._core." + module.removeprefix("numpy.core.")
        if (module, name) in _NUMPY_ALLOWED or (module, name) == ("_codecs", "encode"):
            return super().find_class(module, name)
        if module in ("builtins", "__builtin__") and name in _BUILTINS_ALLOWED:
            return super().find_class("builtins", name)
        raise ValueError(
            f"embeddings pickle references disallowed global '{module}.{name}'; "
            "only numpy arrays and plain containers are accepted"
        )


def _as_matrix(path: Path, raw: object) -> npt.NDArray[np.float32]:
    """The ``embedding`` value as a writable float32 C-contiguous n×d array.

    Consumes a list argument: each element is dropped once copied, so peak
    memory stays near one extra copy of the data.
    """
    if isinstance(raw, np.ndarray) and raw.dtype != object:
        if raw.ndim != 2:
            raise ValueError(f"{path}: 'embedding' must be 2-D (n x d), got shape {raw.shape}")
        if not np.issubdtype(raw.dtype, np.number) or np.issubdtype(raw.dtype, np.complexfloating):
            raise ValueError(f"{path}: 'embedding' has non-numeric dtype {raw.dtype}")
        if raw.dtype == np.float32 and raw.flags.c_contiguous and raw.flags.writeable:
            return raw
        # Assignment casts in small buffered blocks: the only extra memory is
        # the float32 result itself.
        out = np.empty(raw.shape, dtype=np.float32)
        out[...] = raw
        return out
    if isinstance(raw, np.ndarray):  # an object array of vectors
        if raw.ndim != 1:
            raise ValueError(f"{path}: 'embedding' object array must be 1-D, got {raw.shape}")
        items: list[object] = raw.tolist()
        del raw
    elif isinstance(raw, list):
        items = raw
    elif isinstance(raw, tuple):
        items = list(raw)
    else:
        raise ValueError(
            f"{path}: 'embedding' must be an array or a list of vectors, got {type(raw).__name__}"
        )
    n = len(items)
    if n == 0:
        return np.empty((0, 0), dtype=np.float32)
    dim = int(_as_vector(path, 0, items[0], None).shape[0])
    out = np.empty((n, dim), dtype=np.float32)
    for i in range(n):
        out[i] = _as_vector(path, i, items[i], dim)
        items[i] = None  # free each vector as soon as it is copied
    items.clear()
    return out


def _as_vector(path: Path, index: int, item: object, dim: int | None) -> npt.NDArray[np.float32]:
    """One list element as a 1-D float32 vector of ``dim`` values."""
    try:
        vector = np.asarray(item, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: embedding {index} is not a numeric vector: {exc}") from None
    # Models often return (1, d) per crop; the old tool stored them as they came.
    if vector.ndim == 2 and vector.shape[0] == 1:
        vector = vector[0]
    if vector.ndim != 1 or vector.shape[0] == 0:
        raise ValueError(f"{path}: embedding {index} has shape {vector.shape}, expected (d,)")
    if dim is not None and vector.shape[0] != dim:
        raise ValueError(
            f"{path}: ragged embeddings: vector {index} has {vector.shape[0]} values, "
            f"vector 0 has {dim}"
        )
    return vector


def _normalise_rows_in_place(path: Path, matrix: npt.NDArray[np.float32]) -> None:
    """L2-normalise each row in place, refusing NaN, infinite and zero rows."""
    for start in range(0, matrix.shape[0], ROW_CHUNK):
        chunk = matrix[start : start + ROW_CHUNK]
        norms = np.sqrt(np.einsum("ij,ij->i", chunk, chunk, dtype=np.float64))
        bad = ~np.isfinite(norms)
        if bad.any():
            row = start + int(np.argmax(bad))
            raise ValueError(f"{path}: embedding {row} contains NaN or infinite values")
        zero = norms == 0.0
        if zero.any():
            row = start + int(np.argmax(zero))
            raise ValueError(f"{path}: embedding {row} is all zeros and cannot be normalised")
        chunk /= norms.astype(np.float32)[:, None]


def _string_list(path: Path, key: str, raw: object, *, allow_none: bool) -> list[Any]:
    """A list of strings (or None where allowed) from a pickle value."""
    if isinstance(raw, np.ndarray):
        raw = raw.tolist()
    if not isinstance(raw, list | tuple):
        raise ValueError(f"{path}: '{key}' must be a list, got {type(raw).__name__}")
    out: list[Any] = []
    for i, item in enumerate(raw):
        if isinstance(item, str) or (allow_none and item is None):
            out.append(item)
        elif allow_none and isinstance(item, int | float | np.integer | np.floating):
            out.append(str(item))  # numeric class ids from older label files
        else:
            raise ValueError(f"{path}: '{key}' item {i} is {type(item).__name__}, not a string")
    return out


def load_embeddings_pickle(path: Path) -> LoadedEmbeddings:
    """Read an embeddings pickle written by this tool or by the old batch tool.

    Only numpy arrays and builtin containers are unpickled; any other global
    raises ``ValueError``. ``embedding`` may be an n×d array or a list of
    vectors (arrays or lists). Rows come back L2-normalised in float32, with at
    most one transient extra copy of the data while loading.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        try:
            loaded = _RestrictedUnpickler(handle).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as exc:
            raise ValueError(f"{path}: not a readable embeddings pickle: {exc}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a dict in the pickle, got {type(loaded).__name__}")
    for key in ("filename", "embedding"):
        if key not in loaded:
            raise ValueError(
                f"{path}: missing key '{key}' (keys present: {sorted(map(str, loaded))})"
            )
    names = tuple(_string_list(path, "filename", loaded.pop("filename"), allow_none=False))
    raw_labels = loaded.pop("label", None)
    labels = (
        None
        if raw_labels is None
        else tuple(_string_list(path, "label", raw_labels, allow_none=True))
    )
    matrix = _as_matrix(path, loaded.pop("embedding"))
    loaded.clear()
    if matrix.shape[0] != len(names):
        raise ValueError(f"{path}: {len(names)} filenames but {matrix.shape[0]} embeddings")
    if labels is not None and len(labels) != len(names):
        raise ValueError(f"{path}: {len(labels)} labels but {len(names)} filenames")
    _normalise_rows_in_place(path, matrix)
    return LoadedEmbeddings(names=names, embeddings=matrix, labels=labels)
