"""Free space of the state and output folders: figures, ``disk_low`` once per crossing.

The free space is injected (a fake reader); no test fills a real disk.
"""

from __future__ import annotations

import shutil
from collections.abc import MutableMapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from crop_clusterd.config import ConfigError, parse_config
from crop_clusterd.diskspace import MB, DiskWatch, free_mb, recover_margin_mb


class FakeFree:
    """Free MB per folder, set by the test; a folder set to None cannot be measured."""

    def __init__(self, **free: int | None) -> None:
        self.free = free
        self.reads = 0

    def __call__(self, folder: Path) -> int:
        self.reads += 1
        mb = self.free[folder.name]
        if mb is None:
            raise PermissionError(13, "Permission denied", str(folder))
        return mb


def watch(fake: FakeFree, min_free_mb: int = 1024) -> DiskWatch:
    return DiskWatch(Path("/x/state"), Path("/x/output"), min_free_mb, fake)


def events(logs: Sequence[MutableMapping[str, Any]]) -> list[tuple[object, ...]]:
    return [
        (e["event"], e["log_level"], e["folder"], e.get("free_mb"))
        for e in logs
        if str(e["event"]).startswith("disk_")
    ]


def test_free_mb_measures_the_folder_or_its_nearest_existing_parent(tmp_path: Path) -> None:
    expected = shutil.disk_usage(tmp_path).free // MB
    # Other processes write meanwhile: the same filesystem within a little.
    assert abs(free_mb(tmp_path) - expected) < 64
    assert abs(free_mb(tmp_path / "not" / "yet" / "made") - expected) < 64
    (tmp_path / "file").write_text("x")
    assert abs(free_mb(tmp_path / "file" / "below") - expected) < 64
    assert not (tmp_path / "not").exists()


def test_low_is_warned_once_per_crossing_and_recovery_is_logged() -> None:
    fake = FakeFree(state=5000, output=9000)
    disk = watch(fake)
    margin = recover_margin_mb(1024)
    assert margin > 0
    with capture_logs() as logs:
        assert disk.check().alert() == ""
        fake.free["state"] = 512
        first = disk.check()
        fake.free["state"] = 400
        second = disk.check()
        # Back above the limit but inside the margin: still low, nothing logged.
        fake.free["state"] = 1024 + margin - 1
        third = disk.check()
        fake.free["state"] = 1024 + margin
        recovered = disk.check()
        fake.free["state"] = 100
        again = disk.check()
    assert first.alert() == "DISK LOW: state 512 MB free"
    assert second.alert() == "DISK LOW: state 400 MB free"
    assert third.low == ("state",)
    assert recovered.low == () and recovered.alert() == ""
    assert again.low == ("state",)
    assert events(logs) == [
        ("disk_low", "warning", "state", 512),
        ("disk_ok", "info", "state", 1024 + margin),
        ("disk_low", "warning", "state", 100),
    ]
    assert fake.reads == 12  # both folders, every check


def test_both_folders_low_and_the_published_figures() -> None:
    fake = FakeFree(state=300, output=20)
    disk = watch(fake)
    figures = disk.check()
    assert figures.alert() == "DISK LOW: state 300 MB free, output 20 MB free"
    assert figures.runtime_values() == {
        "state_free_mb": 300,
        "output_free_mb": 20,
        "min_free_mb": 1024,
        "disk_low": ["state", "output"],
    }
    fake.free["state"] = 10**6
    assert disk.check().runtime_values()["disk_low"] == ["output"]


def test_zero_limit_never_warns() -> None:
    fake = FakeFree(state=0, output=0)
    with capture_logs() as logs:
        figures = watch(fake, 0).check()
    assert figures.low == () and events(logs) == []
    assert figures.free == {"state": 0, "output": 0}


def test_an_unmeasurable_folder_is_logged_once_and_keeps_its_last_state() -> None:
    fake = FakeFree(state=100, output=5000)
    disk = watch(fake)
    with capture_logs() as logs:
        disk.check()
        fake.free["state"] = None
        unknown = disk.check()
        disk.check()
        fake.free["state"] = 200
        disk.check()
    assert unknown.low == ("state",) and unknown.free["state"] is None
    assert unknown.alert() == "DISK LOW: state ? MB free"
    assert events(logs) == [
        ("disk_low", "warning", "state", 100),
        ("disk_space_unknown", "warning", "state", None),
    ]


def test_state_keys_have_defaults_and_checks() -> None:
    state = parse_config({}).state
    assert (state.min_free_mb, state.keep_sessions) == (1024, 0)
    state = parse_config({"state": {"min_free_mb": 0, "keep_sessions": 3}}).state
    assert (state.min_free_mb, state.keep_sessions) == (0, 3)
    for key in ("min_free_mb", "keep_sessions"):
        with pytest.raises(ConfigError, match=f"state.{key}: must be >= 0"):
            parse_config({"state": {key: -1}})
