"""The CSV output files: ``clusters.csv``, ``errors.csv`` and ``merges.csv``.

Every file is UTF-8, replaced atomically (:mod:`crop_clusterd.atomic`), and every
text cell is escaped against spreadsheet formula injection (:func:`escape_cell`).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Final

from . import atomic
from .records import Assignment, Merge, Skipped
from .textfiles import open_text

__all__ = [
    "CLUSTERS_CSV",
    "ERRORS_CSV",
    "MERGES_CSV",
    "escape_cell",
    "read_clusters_csv",
    "read_errors_csv",
    "unescape_cell",
    "write_clusters_csv",
    "write_errors_csv",
    "write_merges_csv",
]

CLUSTERS_CSV: Final = "clusters.csv"
"""File name of :func:`write_clusters_csv`'s output in an output folder."""
ERRORS_CSV: Final = "errors.csv"
"""File name of :func:`write_errors_csv`'s output in an output folder."""
MERGES_CSV: Final = "merges.csv"
"""File name of :func:`write_merges_csv`'s output in an output folder (daemon only)."""


# A spreadsheet opening the CSV runs a cell that starts with one of these as a
# formula (CSV injection: a crop named "=HYPERLINK(...).png"). OWASP's fix: prefix
# such cells with an apostrophe, which spreadsheets show as text. A leading
# apostrophe is doubled, so :func:`unescape_cell` can always undo the escape.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")
# Plain numbers (e.g. a label "-1") cannot be formulas; they stay as they are.
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def escape_cell(value: str) -> str:
    """A text cell made safe from spreadsheet formula evaluation (prefix ``'``)."""
    if value.startswith(_FORMULA_STARTS) and not _PLAIN_NUMBER.fullmatch(value):
        return "'" + value
    return value


def unescape_cell(value: str) -> str:
    """Undo :func:`escape_cell` on a cell read back from one of our CSV files."""
    if value.startswith("'") and escape_cell(value[1:]) == value:
        return value[1:]
    return value


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Atomically write a UTF-8 CSV file with ``header`` and ``rows``.

    Every text cell goes through :func:`escape_cell`, so no cell is a live formula.
    """

    def write(binary: BinaryIO) -> None:
        # newline="" lets the csv module quote embedded newlines itself.
        # surrogateescape: Linux file names may hold bytes that are not UTF-8;
        # they are written back as the same bytes rather than failing the file.
        text = io.TextIOWrapper(
            binary, encoding="utf-8", errors="surrogateescape", newline="", write_through=True
        )
        try:
            writer = csv.writer(text, lineterminator="\n")
            # With "\n" as line end the csv module would leave a lone "\r"
            # unquoted, and readers treat it as a line break: quote such rows.
            quoted = csv.writer(text, lineterminator="\n", quoting=csv.QUOTE_ALL)
            writer.writerow(header)
            for raw in rows:
                row = [escape_cell(c) if isinstance(c, str) else c for c in raw]
                if any(isinstance(cell, str) and "\r" in cell for cell in row):
                    quoted.writerow(row)
                else:
                    writer.writerow(row)
            text.flush()
        finally:
            # Detach so closing the wrapper does not close the caller's file.
            text.detach()

    # Looked up on the module at call time, so a harness that wraps
    # atomic.atomic_write (scripts/soak.py) sees every output file.
    atomic.atomic_write(path, write)


def write_clusters_csv(
    path: Path, rows: Iterable[Assignment], labels: Mapping[str, str] | None = None
) -> None:
    """Write ``clusters.csv``: ``filename,cluster`` (plus ``label`` when labels are given).

    A crop without a known label gets an empty label cell.
    """
    if labels is None:
        _write_csv(path, ("filename", "cluster"), ((a.name, a.cluster) for a in rows))
    else:
        _write_csv(
            path,
            ("filename", "cluster", "label"),
            ((a.name, a.cluster, labels.get(a.name, "")) for a in rows),
        )


def _read_pairs(path: Path, header: tuple[str, str]) -> Iterator[tuple[int, str, str]]:
    """Rows of a two-column CSV we wrote, as (line number, first cell, second cell),
    after checking the header; cells are not yet unescaped."""
    # A person may have re-saved it from a spreadsheet: with a BOM, maybe as UTF-16.
    with open_text(path, newline="", errors="surrogateescape") as handle:
        reader = csv.reader(handle)
        found = next(reader, None)
        if found is None or found[:2] != list(header):
            raise ValueError(f"{path}: line 1: expected header '{','.join(header)}', got {found!r}")
        for row in reader:
            if len(row) < 2:
                raise ValueError(f"{path}: line {reader.line_num}: expected 2 columns, got {row!r}")
            yield reader.line_num, row[0], row[1]


def read_clusters_csv(path: Path) -> list[tuple[str, int]]:
    """Read ``clusters.csv`` back as ``(filename, cluster)`` pairs, in file order."""
    out: list[tuple[str, int]] = []
    for line, name, cluster in _read_pairs(path, ("filename", "cluster")):
        try:
            out.append((unescape_cell(name), int(cluster)))
        except ValueError:
            raise ValueError(
                f"{path}: line {line}: cluster {cluster!r} is not an integer"
            ) from None
    return out


def read_errors_csv(path: Path) -> list[tuple[str, str]]:
    """Read ``errors.csv`` back as ``(filename, reason)`` pairs, in file order."""
    return [
        (unescape_cell(name), unescape_cell(reason))
        for _, name, reason in _read_pairs(path, ("filename", "reason"))
    ]


def write_errors_csv(path: Path, skipped: Iterable[Skipped]) -> None:
    """Write ``errors.csv``: ``filename,reason`` for every file that was not clustered."""
    _write_csv(path, ("filename", "reason"), ((s.name, s.reason) for s in skipped))


def _iso_utc(timestamp: float) -> str:
    """A POSIX timestamp as ISO-8601 UTC with milliseconds."""
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat(timespec="milliseconds")


def write_merges_csv(path: Path, merges: Iterable[tuple[float, Merge]]) -> None:
    """Write ``merges.csv``: ``time,from,into``, time as ISO-8601 UTC."""
    _write_csv(
        path,
        ("time", "from", "into"),
        ((_iso_utc(t), m.from_cluster, m.into_cluster) for t, m in merges),
    )
