"""Tests for a session's summary.json figures."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from crop_clusterd.summary import HourFigures, read_summary, summarize, write_summary

NAN = math.nan


def at(day: int, hour: int, minute: int) -> float:
    """A capture time: the trap's local wall clock stored as if UTC."""
    return datetime(2024, 6, day, hour, minute, tzinfo=UTC).timestamp()


# (current cluster, capture time) per live crop, in commit (local) order.
NIGHT = [
    (0, at(1, 22, 5)),
    (0, at(1, 22, 40)),
    (2, at(1, 22, 50)),
    (0, at(1, 23, 10)),
    (4, at(1, 23, 20)),  # a singleton
    (2, at(2, 0, 15)),
    (6, NAN),  # no capture time: an untimed singleton
    (7, at(2, 1, 30)),
    (7, at(2, 0, 59)),  # committed later but captured earlier: cluster 7 is new at 00h
]


@pytest.fixture
def other_zone() -> Iterator[None]:
    """Run in a time zone far from UTC: capture times must not be shifted by it."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TZ", "America/Anchorage")
    time.tzset()
    yield
    mp.undo()
    time.tzset()


def test_summary_figures_of_a_small_night(other_zone: None) -> None:
    clusters = np.array([c for c, _ in NIGHT], dtype=np.int64)
    times = np.array([t for _, t in NIGHT], dtype=np.float64)
    s = summarize("2024-06-01", clusters, times)
    assert (s.session, s.crops, s.clusters, s.clusters_2plus, s.singletons, s.untimed) == (
        "2024-06-01",
        9,
        5,
        3,
        2,
        1,
    )
    assert (s.first_time, s.last_time) == ("2024-06-01T22:05:00", "2024-06-02T01:30:00")
    assert s.per_hour == (
        HourFigures("2024-06-01T22", crops=3, new_clusters=2),
        HourFigures("2024-06-01T23", crops=2, new_clusters=1),
        HourFigures("2024-06-02T00", crops=2, new_clusters=1),
        HourFigures("2024-06-02T01", crops=1, new_clusters=0),
    )


def test_summary_does_not_depend_on_row_order() -> None:
    clusters = np.array([c for c, _ in NIGHT], dtype=np.int64)
    times = np.array([t for _, t in NIGHT], dtype=np.float64)
    order = np.random.default_rng(3).permutation(len(NIGHT))
    assert summarize("n", clusters[order], times[order]) == summarize("n", clusters, times)


def test_empty_and_untimed_sessions() -> None:
    empty = summarize("2024-06-03", np.empty(0, np.int64), np.empty(0, np.float64))
    assert (empty.crops, empty.clusters, empty.singletons, empty.per_hour) == (0, 0, 0, ())
    assert empty.first_time is None and empty.last_time is None
    # A broken clock (year 33658) counts as no capture time instead of failing.
    untimed = summarize("x", np.array([0, 0, 2]), np.array([NAN, 1e15, NAN]))
    assert (untimed.crops, untimed.clusters, untimed.clusters_2plus, untimed.untimed) == (
        3,
        2,
        1,
        3,
    )
    assert untimed.per_hour == () and untimed.first_time is None


def test_lengths_must_match() -> None:
    with pytest.raises(ValueError, match="capture times"):
        summarize("x", np.array([0, 1]), np.array([at(1, 1, 1)]))


def test_summary_json_round_trip(tmp_path: Path) -> None:
    clusters = np.array([c for c, _ in NIGHT], dtype=np.int64)
    times = np.array([t for _, t in NIGHT], dtype=np.float64)
    s = summarize("2024-06-01", clusters, times)
    path = tmp_path / "summary.json"
    write_summary(path, s)
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert raw["clusters_2plus"] == 3
    assert raw["per_hour"][0] == {"hour": "2024-06-01T22", "crops": 3, "new_clusters": 2}
    assert read_summary(path) == s
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    path.write_text('{"crops": 3}', encoding="utf-8")
    with pytest.raises(ValueError, match="not a session summary"):
        read_summary(path)
