"""A closed session's ``summary.json``: the figures field users count per night.

Written last when a session closes, so its presence marks the session's folder
as final. Times are the traps' capture times, which are naive local wall-clock
times stored as if they were UTC (see :class:`~crop_clusterd.records.Crop`), so
they are formatted without a time zone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Final

import numpy as np
import numpy.typing as npt

from . import atomic

__all__ = [
    "SUMMARY_JSON",
    "HourFigures",
    "SessionSummary",
    "read_summary",
    "summarize",
    "write_summary",
]

SUMMARY_JSON: Final = "summary.json"
"""File name of a closed session's summary in its output folder."""

# Seconds of 0001-01-01 and 9999-12-31T23:59:59: a time outside cannot be formatted
# (a broken camera clock), so it counts as no capture time rather than failing.
_TIME_RANGE: Final = (-62_135_596_800.0, 253_402_300_799.0)


@dataclass(frozen=True, slots=True)
class HourFigures:
    """Crops captured in one local hour (``YYYY-MM-DDTHH``) and the clusters first seen in it."""

    hour: str
    crops: int
    new_clusters: int


@dataclass(frozen=True, slots=True)
class SessionSummary:
    """The content of ``summary.json``.

    ``crops`` counts live crops; ``clusters`` their current clusters, of which
    ``clusters_2plus`` have two or more crops and ``singletons`` one.
    ``first_time``/``last_time`` are ISO local capture times (None when no crop
    has one). ``per_hour`` lists the hours that have crops, in time order; a
    cluster is new in the hour of its earliest capture time. ``untimed`` counts
    crops without a capture time (in no hour). ``closed`` is the wall-clock time
    (POSIX seconds) the session was closed, which tells a summary of an earlier
    close of a reopened session from the current one.
    """

    session: str
    crops: int
    clusters: int
    clusters_2plus: int
    singletons: int
    first_time: str | None
    last_time: str | None
    untimed: int
    per_hour: tuple[HourFigures, ...]
    closed: float | None = None

    def to_json(self) -> dict[str, object]:
        """The summary as plain JSON values."""
        out = asdict(self)
        out["per_hour"] = [asdict(h) for h in self.per_hour]
        return out


def _local(t: float) -> datetime:
    # Capture times are local wall clock stored as UTC: read them back the same way.
    return datetime.fromtimestamp(t, UTC).replace(tzinfo=None)


def summarize(
    session: str,
    clusters: npt.NDArray[np.int64],
    times: npt.NDArray[np.float64],
    *,
    closed: float | None = None,
) -> SessionSummary:
    """The summary of a session from its live crops' columns.

    ``clusters`` (n) are the crops' current cluster ids, ``times`` (n) their
    capture times in seconds (naive local time as UTC; NaN when unknown).
    Raises ``ValueError`` when the lengths differ.
    """
    clusters = np.asarray(clusters, dtype=np.int64)
    times = np.asarray(times, dtype=np.float64)
    if clusters.shape != times.shape or clusters.ndim != 1:
        raise ValueError(f"{clusters.shape} cluster ids but {times.shape} capture times")
    ids, sizes = np.unique(clusters, return_counts=True)
    timed = np.isfinite(times) & (times >= _TIME_RANGE[0]) & (times <= _TIME_RANGE[1])
    hours = np.full(len(times), -1, dtype=np.int64)
    hours[timed] = np.floor(times[timed] / 3600.0).astype(np.int64)
    per_hour: list[HourFigures] = []
    if timed.any():
        # Each cluster's first hour: the hour of its earliest capture time.
        first = np.full(len(ids), np.inf)
        np.minimum.at(first, np.searchsorted(ids, clusters[timed]), times[timed])
        new_hours = np.floor(first[np.isfinite(first)] / 3600.0).astype(np.int64)
        crop_hours, crop_counts = np.unique(hours[timed], return_counts=True)
        new_by_hour = dict(zip(*np.unique(new_hours, return_counts=True), strict=True))
        per_hour = [
            HourFigures(
                hour=_local(float(h) * 3600.0).strftime("%Y-%m-%dT%H"),
                crops=int(c),
                new_clusters=int(new_by_hour.get(h, 0)),
            )
            for h, c in zip(crop_hours, crop_counts, strict=True)
        ]
    first_time = last_time = None
    if timed.any():
        first_time = _local(float(times[timed].min())).isoformat(timespec="seconds")
        last_time = _local(float(times[timed].max())).isoformat(timespec="seconds")
    return SessionSummary(
        session=session,
        crops=len(clusters),
        clusters=len(ids),
        clusters_2plus=int((sizes >= 2).sum()),
        singletons=int((sizes == 1).sum()),
        first_time=first_time,
        last_time=last_time,
        untimed=int((~timed).sum()),
        per_hour=tuple(per_hour),
        closed=closed,
    )


def write_summary(path: Path, summary: SessionSummary) -> None:
    """Atomically write ``summary.json`` (indented UTF-8 JSON, trailing newline)."""
    text = json.dumps(summary.to_json(), indent=2, ensure_ascii=False) + "\n"

    def write(handle: BinaryIO) -> None:
        handle.write(text.encode("utf-8"))

    atomic.atomic_write(path, write)


def read_summary(path: Path) -> SessionSummary:
    """Read ``summary.json`` back; raises ``ValueError`` when it is not one."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        hours = tuple(
            HourFigures(str(h["hour"]), int(h["crops"]), int(h["new_clusters"]))
            for h in raw["per_hour"]
        )
        return SessionSummary(
            session=str(raw["session"]),
            crops=int(raw["crops"]),
            clusters=int(raw["clusters"]),
            clusters_2plus=int(raw["clusters_2plus"]),
            singletons=int(raw["singletons"]),
            first_time=raw["first_time"],
            last_time=raw["last_time"],
            untimed=int(raw["untimed"]),
            per_hour=hours,
            closed=None if raw.get("closed") is None else float(raw["closed"]),
        )
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ValueError(f"{path}: not a session summary: {exc}") from None
