"""The daemon's status figures on a failing disk: published every second, but a
failure that repeats is logged once per streak (issue 10: logs at field rates)."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from structlog.testing import capture_logs

from crop_clusterd.config import Config
from crop_clusterd.store import StateStore
from crop_clusterd.supervisor import Daemon


class FullDiskRuntime(StateStore):
    """A runtime connection whose writes fail like a full disk while ``full`` is set."""

    full = True

    def set_runtime(self, values: Mapping[str, object]) -> None:
        if self.full:
            raise sqlite3.OperationalError("database or disk is full")
        super().set_runtime(values)


def test_a_failing_publish_is_logged_once_per_streak(tmp_path: Path) -> None:
    config = dataclasses.replace(
        Config(), state=dataclasses.replace(Config().state, folder=tmp_path / "state")
    )
    daemon = Daemon(config, free_space=lambda _p: 10**6)
    runtime = FullDiskRuntime(tmp_path / "state")
    pipeline = SimpleNamespace(
        queue_depth=lambda: 0,
        link=SimpleNamespace(commit_error=None),
        watcher=SimpleNamespace(mode="inotify"),
        runtime=runtime,
    )
    p = cast(Any, pipeline)
    with capture_logs() as logs:
        for _ in range(5):
            daemon._publish(p, "running")
        runtime.full = False
        daemon._publish(p, "running")
        runtime.full = True
        daemon._publish(p, "running")
    events = [e["event"] for e in logs if e["event"].startswith("runtime_publish")]
    assert events == [
        "runtime_publish_failed",
        "runtime_publish_recovered",
        "runtime_publish_failed",
    ]
    runtime.close()
