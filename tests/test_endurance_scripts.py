"""scripts/bench_writes.py and scripts/endurance.py at a tiny size, so they do not rot.

They run the real daemon on simulated nights; what is checked is what the
figures rest on (every crop of every night went through the daemon into the
output, each row has the figures it promises, the printed ratios are computed
from the rows beside them), not the figures themselves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from crop_clusterd.config import Config
from crop_clusterd.csvfiles import read_clusters_csv

REPO = Path(__file__).resolve().parents[1]


def _write_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise AssertionError("no write_bytes in /proc/self/io")


def _writes_counted(folder: Path) -> bool:
    """Whether writes under ``folder`` show in write_bytes (not on tmpfs)."""
    before = _write_bytes()
    probe = folder / "probe"
    probe.write_bytes(b"\0" * 65536)
    os.sync()
    counted = _write_bytes() > before
    probe.unlink()
    return counted


def _run(script: str, work: Path, *args: str) -> tuple[str, dict[str, Any], bool]:
    """Run a script; returns its stdout, its JSON, and whether write_bytes counts there."""
    work.mkdir()
    out = work / "figures.json"
    counted = _writes_counted(work)
    extra = [] if counted else ["--no-disk-check"]
    cmd = [sys.executable, str(REPO / "scripts" / script), "--work", str(work)]
    cmd += ["--close-after-s", "1"]  # sessions close a second after each night
    done = subprocess.run(
        [*cmd, *args, "--json", str(out), *extra], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    data: dict[str, Any] = json.loads(out.read_text())
    return done.stdout, data, counted


def _crops_in_output(folder: Path) -> int:
    """Crops named in the output folder's clusters.csv files (one per session, if any)."""
    names: set[str] = set()
    for parent, _, files in os.walk(folder / "out"):  # not into the `current` link
        if "clusters.csv" in files:
            names |= {n for n, _ in read_clusters_csv(Path(parent) / "clusters.csv")}
    return len(names)


# With sessions, each night is one session, closed in its window.
CLOSES = 1 if hasattr(Config(), "session") else 0


@pytest.mark.slow
def test_bench_writes_measures_the_three_nights_of_each_method(tmp_path: Path) -> None:
    work = tmp_path / "w"
    stdout, data, counted = _run(
        "bench_writes.py", work, "--big", "240", "--small", "90", "--methods", "track", "cosine"
    )
    rows = data["rows"]
    for method in ("track", "cosine"):
        mine = [r for r in rows if r["method"] == method]
        assert [r["crops"] for r in mine] == [240, 90, 90]
        assert [r["scenario"] for r in mine][1:] == [
            "small night after big",
            "small night, fresh state",
        ]
        for r in mine:
            assert r["wchar"] > 0 and r["snapshots"] >= 1
            assert r["sessions_closed"] == CLOSES
            assert r["wchar_kb_per_crop"] == round(r["wchar"] / r["crops"] / 1000, 2)
            assert r["write_bytes"] > 0 or not counted
            assert r["device_bytes"] is None or r["device_bytes"] > 0
        after, fresh = mine[1], mine[2]
        if counted:
            expected = (after["write_bytes"] / 90) / (fresh["write_bytes"] / 90)
            assert data["ratios"][method] == pytest.approx(expected, abs=0.006)
        assert f"{method}: small night after the big one / on a fresh state" in stdout
        # Every crop of both nights reached the daemon's output, and only the small one fresh.
        assert _crops_in_output(work / f"{method}-after-big") == 240 + 90
        assert _crops_in_output(work / f"{method}-fresh") == 90
    for heading in ("KB/crop", "net KB/crop", "wchar KB/crop", "device KB/crop", "snaps"):
        assert heading in stdout


@pytest.mark.slow
def test_endurance_prints_every_night_and_the_history_night(tmp_path: Path) -> None:
    work = tmp_path / "e"
    stdout, data, counted = _run(
        "endurance.py",
        work,
        *("--nights", "2", "--crops-per-night", "120", "--history", "400"),
        *("--method", "track", "--dim", "64"),
    )
    rows = data["rows"]
    assert [(r["phase"], r["night"]) for r in rows] == [
        ("fresh", 1),
        ("fresh", 2),
        ("history 400", 1),
    ]
    assert [r["date"] for r in rows] == ["2024-07-01", "2024-07-02", "2024-07-01"]
    for r in rows:
        assert r["crops"] == 120 and r["sessions_closed"] == CLOSES
        assert r["wchar"] > 0 and (r["write_bytes"] > 0 or not counted)
        assert 0 < r["snapshot_s_median"] <= r["snapshot_s_max"]
        assert r["peak_mib"] > 0 and r["restart_peak_mib"] > 0
        assert 0 < r["restart_ready_s"] <= r["restart_caught_up_s"] <= r["restart_verify_s"]
    assert _crops_in_output(work / "fresh") == 2 * 120
    assert _crops_in_output(work / "on-history") == 400 + 120
    first, last = rows[0], rows[1]
    ratio = last["peak_mib"] / first["peak_mib"]
    assert f"peak_mib {ratio:.2f}x" in stdout.split("fresh night 2 / night 1:")[1]
    assert any(line.startswith("history night 1 / fresh night 1") for line in data["ratios"])
    headings = ("KB/crop", "snap s med", "snap s max", "peak MiB", "ready s", "caught up s")
    for heading in (*headings, "verify s"):
        assert heading in stdout
