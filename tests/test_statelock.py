"""One daemon per state folder (issue 9, case 8): the second refuses at once.

A second daemon on the same state folder used to start, write snapshots beside the
first and later die on a SQLite constraint error. Now ``Daemon.run`` takes an
exclusive ``flock`` on ``<state>/daemon.lock`` before writing anything.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes import ColourEmbedder
from test_supervisor import crops_in, make_config, session, start_child, wait_for

from crop_clusterd.csvfiles import read_clusters_csv
from crop_clusterd.embed import register, unregister
from crop_clusterd.statelock import LOCK_NAME, StateLock, StateLockedError
from crop_clusterd.store import StateError
from crop_clusterd.supervisor import Daemon


@pytest.fixture(autouse=True)
def colour_embedder() -> Iterator[None]:
    register(ColourEmbedder)
    yield
    unregister(ColourEmbedder.name)


def test_second_lock_on_a_folder_is_refused_with_folder_and_pid(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    with StateLock(folder) as first:
        assert first.held
        assert (folder / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        with pytest.raises(StateLockedError) as info:
            StateLock(folder).acquire()
        assert info.value.pid == os.getpid() and info.value.folder == folder
        assert str(folder) in str(info.value) and f"pid {os.getpid()}" in str(info.value)
        assert isinstance(info.value, StateError)
    # Released: the next one gets it, although the file stays.
    with StateLock(folder) as again:
        assert again.held and (folder / LOCK_NAME).exists()


def test_lock_in_an_unwritable_place_is_a_state_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StateError, match="cannot open the lock file"):
        StateLock(blocker / "state").acquire()


def test_second_daemon_in_one_process_refuses_at_once(tmp_path: Path) -> None:
    watch = session(tmp_path, frames=3)
    config = make_config(tmp_path, watch, "cosine")
    first = Daemon(config, exit_when_idle_s=None)
    runner = threading.Thread(target=first.run)
    runner.start()
    try:
        wait_for(lambda: first.pipeline is not None)
        wait_for(lambda: (config.output.folder / "clusters.csv").exists())
        before = sorted(p.name for p in config.state.folder.iterdir())
        started = time.monotonic()
        with pytest.raises(StateLockedError) as info:
            Daemon(config, exit_when_idle_s=0.1).run()
        assert time.monotonic() - started < 1.0
        assert str(config.state.folder) in str(info.value)
        assert f"pid {os.getpid()}" in str(info.value)
        # The refused daemon wrote nothing: no new files in the state folder.
        assert sorted(p.name for p in config.state.folder.iterdir()) == before
    finally:
        first.request_stop("test")
        runner.join(60)
    assert not runner.is_alive()
    rows = read_clusters_csv(config.output.folder / "clusters.csv")
    assert sorted(n for n, _ in rows) == sorted(crops_in(watch))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "crop_clusterd.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _holder_pid(state: Path) -> int | None:
    try:
        text = (state / LOCK_NAME).read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def test_second_run_beside_a_running_one_fails_and_status_works(tmp_path: Path) -> None:
    watch = session(tmp_path, frames=3)
    config = make_config(tmp_path, watch, "cosine")
    state = config.state.folder
    child = start_child(tmp_path, watch, "cosine", None)
    try:
        wait_for(lambda: _holder_pid(state) == child.pid, 60)
        wait_for(lambda: (config.output.folder / "clusters.csv").exists(), 60)
        second = _cli(
            "run", "--watch", str(watch), "--state", str(state), "-o", str(tmp_path / "out2")
        )
        assert second.returncode != 0
        assert str(state) in second.stderr and f"pid {child.pid}" in second.stderr
        assert not (tmp_path / "out2").exists()
        status = _cli("status", "--state", str(state))
        assert status.returncode == 0, status.stderr
        assert f"running (pid {child.pid}" in status.stdout
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    # kill -9 left the lock file but not the lock: a restart takes it and resumes.
    assert _holder_pid(state) == child.pid
    summary = Daemon(config, exit_when_idle_s=1.0).run()
    assert summary.crops == len(crops_in(watch))
    assert _holder_pid(state) == os.getpid()
