"""A session's activity per 10 minutes (issue 12): table, plot, and through the daemon."""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fakes import ColourEmbedder
from hypothesis import given, settings
from hypothesis import strategies as st
from test_session_daemon import NIGHTS, daemon_over_two_nights, night_rows

from crop_clusterd.activity import (
    ACTIVITY_CSV,
    ACTIVITY_PNG,
    BIN_S,
    ActivityWriter,
    activity,
    activity_csv_bytes,
    plot_activity,
)
from crop_clusterd.activity import _tick_step_s as tick_step_s
from crop_clusterd.embed import register, unregister

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def colour_embedder() -> Iterator[None]:
    register(ColourEmbedder)
    yield
    unregister(ColourEmbedder.name)


def oracle(clusters: list[int], times: list[float]) -> dict[int, tuple[int, int, int]]:
    """Per non-empty bin: (crops, new clusters, clusters present), by plain loops."""
    crops: dict[int, int] = defaultdict(int)
    present: dict[int, set[int]] = defaultdict(set)
    first: dict[int, float] = {}
    for c, t in zip(clusters, times, strict=True):
        if math.isnan(t):
            continue
        b = math.floor(t / BIN_S)
        crops[b] += 1
        present[b].add(c)
        first[c] = min(first.get(c, t), t)
    new: dict[int, int] = defaultdict(int)
    for t in first.values():
        new[math.floor(t / BIN_S)] += 1
    return {b: (crops[b], new[b], len(present[b])) for b in crops}


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 6), st.one_of(st.just(math.nan), st.floats(0, 5 * BIN_S - 1e-3))),
        max_size=40,
    )
)
def test_activity_matches_a_plain_count(rows: list[tuple[int, float]]) -> None:
    clusters = [c for c, _ in rows]
    times = [t for _, t in rows]
    figures = activity(np.array(clusters, dtype=np.int64), np.array(times, dtype=np.float64))
    expected = oracle(clusters, times)
    got = {
        int(s) // BIN_S: (int(c), int(n), int(p))
        for s, c, n, p in zip(
            figures.starts, figures.crops, figures.new_clusters, figures.present, strict=True
        )
    }
    # Bins between the first and last capture are listed even when empty.
    assert {b: v for b, v in got.items() if v[0]} == expected
    if expected:
        assert sorted(got) == list(range(min(expected), max(expected) + 1))
    assert figures.untimed == sum(math.isnan(t) for t in times)


def test_a_clock_years_off_lists_only_bins_with_crops() -> None:
    times = np.array([0.0, 10.0, 3e8], dtype=np.float64)
    figures = activity(np.array([0, 0, 2], dtype=np.int64), times)
    assert figures.starts.tolist() == [0, int(3e8) // BIN_S * BIN_S]
    assert figures.crops.tolist() == [2, 1]


@pytest.mark.parametrize("hours", [0.1, 3.0, 10.0, 60.0])
def test_time_ticks_fall_on_whole_bins_at_most_about_ten(hours: float) -> None:
    starts = np.arange(0, int(hours * 3600) + 1, BIN_S, dtype=np.int64)
    step = tick_step_s(starts)
    assert step is not None and step % BIN_S == 0
    assert (starts[-1] - starts[0]) / step <= 10


def test_a_clock_years_off_is_plotted_with_few_ticks() -> None:
    # A fixed 10-minute step across 9 years of sparse bins meant millions of tick
    # labels: the snapshot thread spun for minutes and took gigabytes.
    figures = activity(np.array([0, 0, 2], dtype=np.int64), np.array([0.0, 10.0, 3e8]))
    assert tick_step_s(figures.starts) is None, "matplotlib's own ticks"
    out = io.BytesIO()
    plot_activity(figures, out)
    assert out.getvalue().startswith(PNG_SIGNATURE)


def test_csv_has_one_row_per_bin_with_local_minutes() -> None:
    # 2024-07-01 22:00 and 22:25 local capture time (stored as if UTC).
    t0 = 1_719_871_200.0
    figures = activity(np.array([0, 1, 1]), np.array([t0, t0 + 1500, t0 + 1501]))
    rows = list(csv.reader(io.StringIO(activity_csv_bytes(figures).decode())))
    assert rows[0] == ["bin_start", "crops", "new_clusters", "clusters_present"]
    assert rows[1:] == [
        ["2024-07-01T22:00", "1", "1", "1"],
        ["2024-07-01T22:10", "0", "0", "0"],
        ["2024-07-01T22:20", "2", "1", "1"],
    ]


def test_the_plot_is_redrawn_only_when_changed_and_due(tmp_path: Path) -> None:
    now = [0.0]
    writer = ActivityWriter(plot_every_s=60.0, clock=lambda: now[0])
    clusters = np.array([0, 1], dtype=np.int64)
    times = np.array([0.0, 700.0])
    assert writer.write(tmp_path, clusters, times)
    assert (tmp_path / ACTIVITY_PNG).read_bytes().startswith(PNG_SIGNATURE)
    csv_inode = (tmp_path / ACTIVITY_CSV).stat().st_ino
    now[0] = 100.0
    assert not writer.write(tmp_path, clusters, times), "nothing changed"
    assert (tmp_path / ACTIVITY_CSV).stat().st_ino == csv_inode, "same table not rewritten"
    writer = ActivityWriter(plot_every_s=60.0, clock=lambda: now[0])
    assert writer.write(tmp_path, clusters, times)
    more = np.array([0, 1, 1], dtype=np.int64), np.array([0.0, 700.0, 800.0])
    now[0] = 130.0
    assert not writer.write(tmp_path, *more), "changed but drawn 30 s ago"
    assert (tmp_path / ACTIVITY_CSV).read_text().count("\n") == 3, "the table is current"
    now[0] = 161.0
    assert writer.write(tmp_path, *more), "still not drawn, now due"
    more = np.array([0, 1, 1, 2], dtype=np.int64), np.array([0.0, 700.0, 800.0, 900.0])
    assert writer.write(tmp_path, *more, final=True), "final draws whatever the interval"


def test_the_daemon_writes_each_nights_activity(tmp_path: Path) -> None:
    config = daemon_over_two_nights(tmp_path)
    for night in NIGHTS:
        folder = config.output.folder / night
        rows = list(csv.DictReader((folder / ACTIVITY_CSV).open()))
        live = night_rows(config, night)
        assert sum(int(r["crops"]) for r in rows) == len(live)
        assert sum(int(r["new_clusters"]) for r in rows) == len({c for _, c in live})
        assert all(r["bin_start"].startswith(night) for r in rows)
        assert (folder / ACTIVITY_PNG).read_bytes().startswith(PNG_SIGNATURE)
