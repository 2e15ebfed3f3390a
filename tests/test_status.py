"""Tests for ``crop-clusterd status`` read from a live state database."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from crop_clusterd.records import CommittedCrop, Crop, DecodeFailure, Embedded, Merge
from crop_clusterd.status import (
    ALIVE_WITHIN_S,
    format_status,
    main_status,
    read_status,
    status_json,
)
from crop_clusterd.store import StateError, StateStore

NOW = 1_700_000_000.0


def crops(start: int, clusters: list[int]) -> list[CommittedCrop]:
    rng = np.random.default_rng(start)
    out = []
    for i, cluster in enumerate(clusters):
        v = rng.normal(size=4).astype(np.float32)
        name = f"f/crops/crop_{start + i}.png"
        item = Embedded(Crop(path=Path(name), name=name), v / np.linalg.norm(v))
        out.append(CommittedCrop(item, start + i, cluster))
    return out


@pytest.fixture
def live(tmp_path: Path) -> Iterator[StateStore]:
    """A state folder whose writer connection stays open (WAL), as while the daemon runs."""
    store = StateStore(tmp_path / "state")
    # Committed 90 s ago: outside the rate window.
    store.commit_batch(0, crops(0, [0, 0, 2, 3, 4]), [], [], now=NOW - 90)
    # Committed 30 s ago: 4 crops; seq 6 joins 3 and 4 (4 into 3).
    skip = DecodeFailure("f/crops/bad.png", "truncated")
    store.commit_batch(1, crops(5, [2, 3, 7, 8]), [Merge(4, 3)], [skip], now=NOW - 30)
    yield store
    store.close()


def publish(store: StateStore, **values: object) -> None:
    base: dict[str, object] = {
        "pid": os.getpid(),
        "phase": "running",
        "started_at": NOW - 3600,
        "updated_at": NOW - 5,
        "queue": 17,
        "last_snapshot_at": NOW - 8,
        "snapshot_error": None,
        "state_error": None,
        "watch_mode": "inotify",
    }
    base.update(values)
    store.set_runtime(base)


def test_status_of_a_running_daemon(tmp_path: Path, live: StateStore) -> None:
    publish(live)
    report = read_status(tmp_path / "state", now=NOW)
    # clusters now: {0,1}, {2,5}, {3,4,6}, {7}, {8}
    assert (report.crops, report.clusters, report.singletons) == (9, 5, 2)
    assert (report.skipped, report.merges, report.batches) == (1, 1, 2)
    assert report.crops_per_s == pytest.approx(4 / 60)
    assert report.alive
    assert (report.pid, report.phase, report.queue) == (os.getpid(), "running", 17)
    assert report.heartbeat_age_s == pytest.approx(5)
    assert report.last_snapshot_at == NOW - 8
    assert report.watch_mode == "inotify"

    text = format_status(report)
    assert f"running (pid {os.getpid()}" in text
    assert "9 clustered, 0.1/s" in text
    assert "5 (2 singletons), 1 merges" in text
    assert "17 files waiting" in text
    assert "ERROR" not in text

    data = json.loads(status_json(report))
    assert data["crops"] == 9 and data["alive"] is True and data["queue"] == 17
    assert data["snapshot_error"] is None


def test_new_commits_show_up_while_the_writer_is_open(tmp_path: Path, live: StateStore) -> None:
    publish(live)
    before = read_status(tmp_path / "state", now=NOW)
    live.commit_batch(2, crops(9, [0]), [Merge(2, 0)], [], now=NOW - 1)
    after = read_status(tmp_path / "state", now=NOW)
    assert (after.crops, after.clusters, after.merges) == (before.crops + 1, 4, 2)
    assert after.crops_per_s == pytest.approx(5 / 60)


def test_errors_are_shown(tmp_path: Path, live: StateStore) -> None:
    publish(
        live,
        snapshot_error="cannot write out/clusters.csv: ENOSPC: No space left on device",
        state_error="disk I/O error",
    )
    report = read_status(tmp_path / "state", now=NOW)
    text = format_status(report)
    assert "ERROR:      snapshot: cannot write out/clusters.csv: ENOSPC" in text
    assert "ERROR:      state: disk I/O error" in text
    assert json.loads(status_json(report))["state_error"] == "disk I/O error"


def test_disk_figures_are_shown_and_low_space_is_a_warning(
    tmp_path: Path, live: StateStore
) -> None:
    publish(live, state_free_mb=51200, output_free_mb=51200, min_free_mb=1024, disk_low=[])
    report = read_status(tmp_path / "state", now=NOW)
    assert (report.state_free_mb, report.output_free_mb, report.min_free_mb) == (51200, 51200, 1024)
    text = format_status(report)
    assert "disk:       state 51200 MB free, output 51200 MB free (warns below 1024 MB)" in text
    assert "WARNING" not in text

    publish(live, state_free_mb=512, output_free_mb=None, min_free_mb=1024, disk_low=["state"])
    report = read_status(tmp_path / "state", now=NOW)
    assert report.disk_low == ("state",) and report.output_free_mb is None
    text = format_status(report)
    assert "disk:       state 512 MB free, output ? MB free (warns below 1024 MB)" in text
    assert "WARNING:    disk low: state 512 MB free (below 1024 MB)" in text
    data = json.loads(status_json(report))
    assert (data["state_free_mb"], data["output_free_mb"], data["min_free_mb"]) == (512, None, 1024)
    assert data["disk_low"] == ["state"]

    # A stopped daemon's figures are its last ones, and say so.
    publish(live, phase="stopped", state_free_mb=700, disk_low=["state"])
    assert "700 MB free, output ? MB free (warns below 1024 MB), at the last heartbeat" in (
        format_status(read_status(tmp_path / "state", now=NOW))
    )


def test_no_disk_line_before_the_daemon_published_figures(tmp_path: Path, live: StateStore) -> None:
    publish(live, disk_low="state", min_free_mb=True)
    report = read_status(tmp_path / "state", now=NOW)
    assert (report.state_free_mb, report.min_free_mb, report.disk_low) == (None, None, ())
    assert "disk:" not in format_status(report)


def dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(proc.stdout)


@pytest.mark.parametrize(
    ("values", "why"),
    [
        ({"updated_at": NOW - ALIVE_WITHIN_S - 1}, "no recent heartbeat"),
        ({"pid": "dead"}, "no recent heartbeat"),
        ({"phase": "stopped"}, "stopped"),
    ],
)
def test_not_alive(tmp_path: Path, live: StateStore, values: dict[str, object], why: str) -> None:
    if values.get("pid") == "dead":
        values = {"pid": dead_pid()}
    publish(live, **values)
    report = read_status(tmp_path / "state", now=NOW)
    assert not report.alive
    text = format_status(report)
    assert f"not running ({why}; last heartbeat" in text
    assert "files waiting" not in text  # a dead daemon's queue means nothing


def test_state_without_runtime(tmp_path: Path, live: StateStore) -> None:
    report = read_status(tmp_path / "state", now=NOW)
    assert not report.alive and report.pid is None and report.last_snapshot_at is None
    assert "never published a heartbeat" in format_status(report)
    assert "snapshot:   never" in format_status(report)


def test_malformed_runtime_values_are_ignored(tmp_path: Path, live: StateStore) -> None:
    publish(live, pid="1234", queue=True, updated_at="soon")
    report = read_status(tmp_path / "state", now=NOW)
    assert (report.pid, report.queue, report.updated_at, report.alive) == (None, None, None, False)


def test_main_status_found_and_missing(tmp_path: Path, live: StateStore) -> None:
    publish(live, updated_at=None)
    out, err = io.StringIO(), io.StringIO()
    assert main_status(tmp_path / "state", True, out, err) == 0
    assert json.loads(out.getvalue())["crops"] == 9
    assert err.getvalue() == ""

    out = io.StringIO()
    assert main_status(tmp_path / "state", False, out, err) == 0
    assert out.getvalue().startswith(f"state:      {tmp_path / 'state'}\n")

    out = io.StringIO()
    assert main_status(tmp_path / "nowhere", False, out, err) == 1
    assert out.getvalue() == ""
    assert f"no crop-clusterd state in {tmp_path / 'nowhere'}: the folder does not exist" in (
        err.getvalue()
    )


def test_folder_without_database(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(StateError, match=r"has no state\.sqlite3"):
        read_status(tmp_path / "empty")


def test_inconsistent_cluster_ids_are_a_state_error(tmp_path: Path) -> None:
    with StateStore(tmp_path / "state") as store:
        store.commit_batch(0, crops(0, [0, 5]), [], [], now=NOW)
        with pytest.raises(StateError, match="inconsistent"):
            read_status(tmp_path / "state", now=NOW)
