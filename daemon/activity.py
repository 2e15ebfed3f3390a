"""A session's activity across the night: ``activity.csv`` and ``activity.png``.

Per 10 minutes of capture time: the crops captured, the clusters first seen
(a cluster is new in the bin of its earliest capture time) and the clusters
present (with at least one crop in the bin). Computed from one session's live
crops only, so the cost follows the session, not the season. The plot is drawn
with matplotlib's Agg backend (no display needed); drawing costs far more than
the table, so :class:`ActivityWriter` redraws it only when the table changed
and at most once per ``plot_every_s`` (always when the session is final).
Capture times are naive local times stored as UTC, as in
:mod:`crop_clusterd.summary`.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Final

import numpy as np
import numpy.typing as npt

from . import atomic

__all__ = [
    "ACTIVITY_CSV",
    "ACTIVITY_PNG",
    "BIN_S",
    "Activity",
    "ActivityWriter",
    "activity",
    "activity_csv_bytes",
    "plot_activity",
]

ACTIVITY_CSV: Final = "activity.csv"
ACTIVITY_PNG: Final = "activity.png"
BIN_S: Final = 600
"""Width of one bin in seconds of capture time."""

# Empty bins are listed between the first and last capture only up to this many
# bins (a week); a broken camera clock years off must not make millions of rows.
_MAX_SPAN_BINS: Final = 7 * 24 * 6
# Seconds of 0001-01-01 and 9999-12-31T23:59:59 (see summary.py): outside, no time.
_TIME_RANGE: Final = (-62_135_596_800.0, 253_402_300_799.0)


@dataclass(frozen=True, slots=True, eq=True)
class Activity:
    """Per-bin figures in time order: ``starts`` (bin start, seconds), ``crops``,
    ``new_clusters`` and ``present`` (int arrays of the same length); ``untimed``
    counts crops without a usable capture time (in no bin)."""

    starts: npt.NDArray[np.int64]
    crops: npt.NDArray[np.int64]
    new_clusters: npt.NDArray[np.int64]
    present: npt.NDArray[np.int64]
    untimed: int

    def __len__(self) -> int:
        return len(self.starts)


def activity(
    clusters: npt.NDArray[np.int64], times: npt.NDArray[np.float64], *, bin_s: int = BIN_S
) -> Activity:
    """The activity of a session from its live crops' current cluster ids (n) and
    capture times (n, seconds; NaN when unknown). Raises ``ValueError`` when the
    shapes differ."""
    clusters = np.asarray(clusters, dtype=np.int64)
    times = np.asarray(times, dtype=np.float64)
    if clusters.shape != times.shape or clusters.ndim != 1:
        raise ValueError(f"{clusters.shape} cluster ids but {times.shape} capture times")
    timed = np.isfinite(times) & (times >= _TIME_RANGE[0]) & (times <= _TIME_RANGE[1])
    c, t = clusters[timed], times[timed]
    untimed = int((~timed).sum())
    if not len(t):
        empty = np.empty(0, dtype=np.int64)
        return Activity(empty, empty, empty, empty, untimed)
    bins = np.floor(t / bin_s).astype(np.int64)
    lo, hi = int(bins.min()), int(bins.max())
    if hi - lo < _MAX_SPAN_BINS:
        all_bins = np.arange(lo, hi + 1, dtype=np.int64)
    else:
        all_bins = np.unique(bins)
    index = np.searchsorted(all_bins, bins)
    crops = np.bincount(index, minlength=len(all_bins)).astype(np.int64)
    # A cluster's first bin is the bin of its earliest crop.
    ids, inverse = np.unique(c, return_inverse=True)
    first = np.full(len(ids), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, inverse, index)
    new = np.bincount(first, minlength=len(all_bins)).astype(np.int64)
    pairs = np.unique(index * len(ids) + inverse)
    present = np.bincount(pairs // len(ids), minlength=len(all_bins)).astype(np.int64)
    return Activity(all_bins * bin_s, crops, new, present, untimed)


def _local_text(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).replace(tzinfo=None).isoformat(timespec="minutes")


def _clock_text(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%H:%M")


def activity_csv_bytes(figures: Activity) -> bytes:
    """``activity.csv``: ``bin_start,crops,new_clusters,clusters_present``, one row
    per bin, ``bin_start`` as ISO local capture time to the minute."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(("bin_start", "crops", "new_clusters", "clusters_present"))
    for row in zip(
        figures.starts.tolist(),
        figures.crops.tolist(),
        figures.new_clusters.tolist(),
        figures.present.tolist(),
        strict=True,
    ):
        writer.writerow((_local_text(float(row[0])), *row[1:]))
    return text.getvalue().encode("utf-8")


def plot_activity(figures: Activity, handle: BinaryIO, *, title: str = "") -> None:
    """Draw the three series as a PNG (about 900 x 420 px) into ``handle``."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MultipleLocator

    # Figure() without pyplot: no global state, no GUI backend, safe off the main thread.
    fig = Figure(figsize=(9, 4.2), dpi=100)
    ax = fig.add_subplot()
    # matplotlib's date unit is days since 1970; capture times are local-as-UTC seconds.
    x = figures.starts.astype(np.float64) / 86400.0
    width = BIN_S / 86400.0 * 0.9
    ax.bar(x, figures.crops, width=width, align="edge", color="#b8c7d9", label="crops")
    ax.set_ylabel("crops per 10 min")
    ax2 = ax.twinx()
    # One more point at the last bin's end, so its level is drawn across the bin too.
    xs = np.append(x, x[-1] + BIN_S / 86400.0) if len(x) else x
    for series, colour, label in (
        (figures.present, "#1b5e20", "clusters present"),
        (figures.new_clusters, "#c62828", "new clusters"),
    ):
        ys = np.append(series, series[-1]) if len(series) else series
        ax2.step(xs, ys, where="post", color=colour, label=label)
    ax2.set_ylabel("clusters per 10 min")
    ax.set_ylim(bottom=0)
    ax2.set_ylim(bottom=0)
    step = _tick_step_s(figures.starts)
    if step is not None:
        ax.xaxis.set_major_locator(MultipleLocator(step / 86400.0))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _clock_text(v * 86400.0)))
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    # Below the axes: inside, it hid the first bins of the night.
    ax.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.1),
        ncol=3,
        frameon=False,
        fontsize="small",
    )
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(handle, format="png")


def _tick_step_s(starts: npt.NDArray[np.int64]) -> float | None:
    """Seconds between time ticks: whole bins, at most about ten ticks over the
    bins' span. None (matplotlib's own ticks) beyond 12 h a tick: a span of weeks
    or years (a clock gone wrong), whose sparse bins a fixed step would cover
    with millions of ticks."""
    bins = int(starts[-1] - starts[0]) // BIN_S + 1 if len(starts) else 1
    for step in (1, 3, 6, 12, 18, 36, 72):  # 10 min, 30 min, 1 h, 2 h, 3 h, 6 h, 12 h
        if bins <= 10 * step:
            return float(step * BIN_S)
    return None


def _put(handle: BinaryIO, data: bytes) -> None:
    handle.write(data)


@dataclass
class _Written:
    csv: bytes = b""
    plotted: bytes | None = None
    plotted_at: float = -float("inf")


@dataclass
class ActivityWriter:
    """Writes ``activity.csv`` and ``activity.png`` into session folders, atomically.

    The CSV is rewritten when its content changed; the PNG when the CSV it
    shows changed, at most once per ``plot_every_s`` (``clock`` seconds)
    unless ``final``. Raises ``OSError`` when a file cannot be written (the
    previous one stays).
    """

    plot_every_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    _written: dict[Path, _Written] = field(default_factory=dict)

    def write(
        self,
        folder: Path,
        clusters: npt.NDArray[np.int64],
        times: npt.NDArray[np.float64],
        *,
        final: bool = False,
        title: str = "",
    ) -> bool:
        """Write ``folder``'s activity files from its live crops; True when the plot was drawn."""
        figures = activity(clusters, times)
        data = activity_csv_bytes(figures)
        state = self._written.setdefault(folder, _Written())
        if data != state.csv:
            atomic.atomic_write(folder / ACTIVITY_CSV, lambda h: _put(h, data))
            state.csv = data
        now = self.clock()
        due = final or now - state.plotted_at >= self.plot_every_s
        if state.plotted == data or not due:
            return False
        atomic.atomic_write(folder / ACTIVITY_PNG, lambda h: plot_activity(figures, h, title=title))
        state.plotted, state.plotted_at = data, now
        return True

    def forget(self, folder: Path) -> None:
        """Drop what is remembered of ``folder`` (a closed session's, written for good)."""
        self._written.pop(folder, None)
