"""Embeddings as an append-only folder of Parquet parts.

A session's embeddings grow by one part per snapshot that has new crops, so a
snapshot writes only the rows committed since the previous one, never the
session's history. The folder reads as one table::

    pandas.read_parquet("OUT/2024-06-01/embeddings")   # or pyarrow.dataset

Each part is ``part-<first:09d>-<last:09d>.parquet``, first and last being the
session-local crop numbers it holds (inclusive), with the columns ``name``
(string), ``local`` (int64) and ``embedding`` (fixed_size_list<float32>[d]).
Parts are written atomically (hidden temporary file, fsync, rename), which is
why readers never see half a part: pyarrow skips names starting with ``.``.
Which rows are already written is derived from the part names alone.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final, cast

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from . import atomic

__all__ = [
    "EMBEDDINGS_DIR",
    "EmbeddingParts",
    "Part",
    "last_written",
    "list_parts",
    "part_name",
    "read_parts",
    "remove_stale_parts",
    "write_part",
]

EMBEDDINGS_DIR: Final = "embeddings"
"""Folder of the Parquet parts inside a session's output folder."""

_PART = re.compile(r"part-(\d{9,})-(\d{9,})\.parquet")
_PART_TEMP = re.compile(r"\.part-\d+-\d+\.parquet\.tmp-")


@dataclass(frozen=True, slots=True)
class Part:
    """One part file: ``path`` holds the local numbers ``first``..``last`` (inclusive)."""

    path: Path
    first: int
    last: int


@dataclass(frozen=True, slots=True, eq=False)
class EmbeddingParts:
    """A parts folder read back: ``names`` and ``locals`` (n) and ``vectors`` (n×d float32)
    in local order, exactly as written (not renormalised)."""

    names: tuple[str, ...]
    locals: npt.NDArray[np.int64]
    vectors: npt.NDArray[np.float32]

    def __len__(self) -> int:
        return len(self.names)


def part_name(first: int, last: int) -> str:
    """File name of the part holding local numbers ``first``..``last``."""
    return f"part-{first:09d}-{last:09d}.parquet"


def list_parts(folder: Path) -> list[Part]:
    """The parts in ``folder`` ordered by first local number; [] when it does not exist.

    Other files (temporary files, anything a person put there) are ignored.
    Raises ``ValueError`` when two parts overlap: the folder then mixes two runs
    (an output folder reused with another state) and cannot be appended to.
    """
    parts: list[Part] = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            match = _PART.fullmatch(entry.name)
            if match and entry.is_file():
                first, last = int(match[1]), int(match[2])
                if first <= last:
                    parts.append(Part(Path(entry.path), first, last))
    parts.sort(key=lambda p: (p.first, p.last))
    for before, after in itertools.pairwise(parts):
        if after.first <= before.last:
            raise ValueError(
                f"embedding parts overlap in {folder}: {before.path.name} and {after.path.name}"
            )
    return parts


def last_written(folder: Path) -> int:
    """The highest local number already in a part of ``folder``; -1 when there is none."""
    parts = list_parts(folder)
    return parts[-1].last if parts else -1


def remove_stale_parts(folder: Path) -> int:
    """Delete temporary part files a kill mid-write left in ``folder``; returns how many."""
    removed = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            if _PART_TEMP.match(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
    return removed


def _table(
    names: Sequence[str], locals_: npt.NDArray[np.int64], vectors: npt.NDArray[np.float32]
) -> pa.Table:
    dim = vectors.shape[1]
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    return pa.table(
        {
            # surrogateescape: Linux file names may hold bytes that are not UTF-8;
            # Parquet strings must be UTF-8, so such bytes are kept as escapes.
            "name": pa.array(
                [n.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for n in names]
                if any(not n.isascii() for n in names)
                else list(names),
                type=pa.string(),
            ),
            "local": pa.array(locals_, type=pa.int64()),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
        }
    )


def write_part(
    folder: Path,
    names: Sequence[str],
    locals_: npt.NDArray[np.int64],
    vectors: npt.NDArray[np.floating[Any]],
) -> Path:
    """Write one part holding these rows; returns its path.

    ``locals_`` must be contiguous and increasing (``first``, ``first+1``, ...)
    and start after :func:`last_written`; ``vectors`` is n×d. The folder is
    created when missing. Raises ``ValueError`` on mismatched lengths, an
    empty or non-contiguous range, or a range already written; ``OSError``
    (ENOSPC ...) propagates with no part left behind.
    """
    locals_ = np.asarray(locals_, dtype=np.int64)
    matrix = np.asarray(vectors, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (n x d), got shape {matrix.shape}")
    if not (len(names) == len(locals_) == matrix.shape[0]):
        raise ValueError(
            f"{len(names)} names, {len(locals_)} local numbers, {matrix.shape[0]} embeddings"
        )
    if len(locals_) == 0:
        raise ValueError("an embedding part needs at least one row")
    first, last = int(locals_[0]), int(locals_[-1])
    if not np.array_equal(locals_, np.arange(first, last + 1, dtype=np.int64)):
        raise ValueError(f"local numbers of a part must be contiguous, got {locals_[:5]}..")
    written = last_written(folder)
    if first <= written:
        raise ValueError(f"rows from {first} are already in {folder} (up to {written})")
    folder.mkdir(parents=True, exist_ok=True)
    table = _table(names, locals_, matrix)
    path = folder / part_name(first, last)

    def write(handle: BinaryIO) -> None:
        # Embeddings are noise to a compressor; names share long prefixes.
        pq.write_table(
            table,
            handle,
            compression={"name": "zstd", "local": "zstd", "embedding": "none"},
            use_dictionary=["name"],
        )

    atomic.atomic_write(path, write)
    return path


def read_parts(folder: Path, *, dim: int | None = None) -> EmbeddingParts:
    """Read every part of ``folder`` in local order as one set of columns.

    ``dim`` sizes the vectors when there are no parts. Raises ``ValueError``
    when a part's content does not match its name or the parts differ in
    embedding size, and ``OSError`` when a part cannot be read.
    """
    parts = list_parts(folder)
    tables = [pq.read_table(p.path, columns=["name", "local", "embedding"]) for p in parts]
    n = sum(int(t.num_rows) for t in tables)
    dims = {_dim(t) for t in tables}
    if len(dims) > 1:
        raise ValueError(f"embedding parts in {folder} differ in size: {sorted(dims)}")
    d = dims.pop() if dims else (dim or 0)
    vectors = np.empty((n, d), dtype=np.float32)
    locals_ = np.empty(n, dtype=np.int64)
    names: list[str] = []
    row = 0
    for part, table in zip(parts, tables, strict=True):
        k = int(table.num_rows)
        got = np.asarray(table.column("local").to_numpy(), dtype=np.int64)
        if not np.array_equal(got, np.arange(part.first, part.last + 1, dtype=np.int64)):
            raise ValueError(f"{part.path}: its rows do not match its name")
        locals_[row : row + k] = got
        emb = table.column("embedding").combine_chunks()
        vectors[row : row + k] = np.asarray(emb.flatten().to_numpy(), np.float32).reshape(k, d)
        names.extend(cast(list[str], table.column("name").to_pylist()))
        row += k
    return EmbeddingParts(names=tuple(names), locals=locals_, vectors=vectors)


def _dim(table: pa.Table) -> int:
    kind = table.schema.field("embedding").type
    if not pa.types.is_fixed_size_list(kind):
        raise ValueError(f"column 'embedding' is {kind}, expected fixed_size_list<float>")
    return int(kind.list_size)
