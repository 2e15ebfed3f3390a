"""The daemon under faults: a full or read-only output disk, failing state
commits, and a hung model.

Real daemon, real observer, real state folder and a real ``NOTIFY_SOCKET``
datagram socket; the faults are injected through the daemon's seams (the
snapshot writer's :class:`OutputFiles`, the link stage's :class:`StateStore`,
the embedder) by subclasses of the real classes, switched on and off with an
event.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import os
import shutil
import socket
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import torch
from fakes import ColourEmbedder
from test_notify import Receiver, named
from test_supervisor import committed, crops_in, frame_dirs, make_config, session, wait_for

from crop_clusterd.atomic import atomic_write
from crop_clusterd.config import Config
from crop_clusterd.csvfiles import read_clusters_csv
from crop_clusterd.embed import EmbedderOptions
from crop_clusterd.log import configure_logging
from crop_clusterd.records import Assignment, CommittedCrop, DecodeFailure, Merge, Moved
from crop_clusterd.snapshot import OutputFiles
from crop_clusterd.status import format_status, read_status
from crop_clusterd.store import StateStore
from crop_clusterd.supervisor import Daemon, RunSummary

pytestmark = pytest.mark.usefixtures("restore_logging")


# --- fixtures and helpers -------------------------------------------------------------


@pytest.fixture
def notify(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    """A bound datagram socket named by ``$NOTIFY_SOCKET`` for the daemon under test."""
    # Not tmp_path: AF_UNIX paths are limited to 108 bytes and pytest's get long.
    folder = tempfile.mkdtemp(prefix="flt")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = os.path.join(folder, "notify")
    sock.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield Receiver(path, sock)
    sock.close()
    shutil.rmtree(folder)


@pytest.fixture
def log_lines() -> io.StringIO:
    """The daemon's log as JSON lines (debug level included)."""
    out = io.StringIO()
    configure_logging("json", "debug", out, environ={})
    return out


def collect(receiver: Receiver, seconds: float) -> list[tuple[float, list[str]]]:
    """Every datagram that arrives during the next ``seconds``, with its arrival time."""
    out: list[tuple[float, list[str]]] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        receiver.sock.settimeout(left)
        try:
            data = receiver.sock.recv(4096)
        except TimeoutError:
            break
        out.append((time.monotonic(), data.decode().split("\n")))
    return out


def statuses(datagrams: Iterable[tuple[float, list[str]]]) -> list[str]:
    return [a[7:] for _, d in datagrams for a in d if a.startswith("STATUS=")]


def pings(datagrams: Iterable[tuple[float, list[str]]]) -> int:
    return sum(1 for _, d in datagrams if "WATCHDOG=1" in d)


def wait_status(receiver: Receiver, needle: str, timeout_s: float = 10.0) -> str:
    """The first STATUS line containing ``needle`` (fails after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in statuses(collect(receiver, 0.3)):
            if needle in line:
                return line
    raise AssertionError(f"no STATUS line with {needle!r} within {timeout_s} s")


def wait_status_without(receiver: Receiver, needle: str, timeout_s: float = 10.0) -> str:
    """The first STATUS line that does not contain ``needle``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in statuses(collect(receiver, 0.3)):
            if needle not in line:
                return line
    raise AssertionError(f"every STATUS line still had {needle!r} after {timeout_s} s")


def csv_names(config: Config) -> list[str]:
    """The names in ``clusters.csv`` ([] before the first snapshot)."""
    path = config.output.folder / "clusters.csv"
    return [n for n, _ in read_clusters_csv(path)] if path.exists() else []


def stored_paths(config: Config) -> set[str]:
    with StateStore(config.state.folder, readonly=True) as store:
        return store.processed_paths()


def copy_frames(frames: Sequence[Path], watch: Path) -> None:
    for frame in frames:
        shutil.copytree(frame, watch / frame.name)


class Running:
    """A daemon run on a thread; ``stop`` returns its summary or raises its error."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.summary: RunSummary | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="test-daemon")
        self.thread.start()

    def _run(self) -> None:
        try:
            self.summary = self.daemon.run()
        except BaseException as exc:
            self.error = exc

    def stop(self, timeout_s: float = 30.0) -> None:
        self.daemon.request_stop("test")
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), f"the daemon did not stop within {timeout_s} s"


def embedder() -> ColourEmbedder:
    return ColourEmbedder(EmbedderOptions())


# --- 1. snapshot writes fail (full disk, read-only file system) ------------------------


class FailingFiles(OutputFiles):
    """Writes ``clusters.csv`` as usual, except while ``failing`` is set: then it
    starts the atomic write, gets part of the rows out, and fails with ``code``
    the way a disk that fills up (or is remounted read-only) mid-write would."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.failing = threading.Event()
        self.failures = 0

    def clusters(self, path: Path, rows: Iterable[Assignment]) -> None:
        if not self.failing.is_set():
            super().clusters(path, rows)
            return

        def write(handle: BinaryIO) -> None:
            handle.write(b"filename,cluster\n")
            for row in list(rows)[:3]:
                handle.write(f"{row.name},{row.cluster}\n".encode())
            self.failures += 1
            raise OSError(self.code, os.strerror(self.code), str(path))

        atomic_write(path, write)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=["ENOSPC", "EROFS"])
def test_failing_snapshots_keep_the_previous_files_and_the_daemon_ingesting(
    tmp_path: Path, code: int, notify: Receiver, log_lines: io.StringIO
) -> None:
    name = errno.errorcode[code]
    frames = frame_dirs(session(tmp_path, frames=8, seed=3))
    watch = tmp_path / "watch"
    watch.mkdir()
    copy_frames(frames[:4], watch)
    first = crops_in(watch)
    config = make_config(tmp_path, watch)
    files = FailingFiles(code)
    run = Running(Daemon(config, embedder=embedder(), snapshot_files=files))
    try:
        wait_for(lambda: set(csv_names(config)) == first)
        before = (config.output.folder / "clusters.csv").read_bytes()

        files.failing.set()
        copy_frames(frames[4:], watch)
        everything = crops_in(watch)
        # The daemon keeps ingesting into its state while no snapshot can be written.
        wait_for(lambda: committed(config) == len(everything))
        assert stored_paths(config) == everything
        line = wait_status(notify, "SNAPSHOT FAILING")
        assert name in line and "clusters.csv" in line
        report = read_status(config.state.folder)
        assert report.snapshot_error is not None and name in report.snapshot_error
        assert "ERROR:      snapshot: cannot write" in format_status(report)
        # The previous snapshot is intact and readable, and no temporary file is left.
        assert (config.output.folder / "clusters.csv").read_bytes() == before
        assert set(csv_names(config)) == first
        # embeddings.pkl comes at stop; while running, embeddings are appended parts.
        assert sorted(p.name for p in config.output.folder.iterdir()) == [
            "activity.csv",
            "activity.png",
            "clusters.csv",
            "embeddings",
            "errors.csv",
            "gallery",
            "index.html",
            "merges.csv",
            "thumbs",
        ]
        assert files.failures >= 1
        failed = named(log_lines, "snapshot_failed")
        assert failed and failed[0]["errno"] == name and failed[0]["level"] == "error"

        files.failing.clear()
        wait_for(lambda: set(csv_names(config)) == everything)
        wait_status_without(notify, "SNAPSHOT FAILING")
        assert read_status(config.state.folder).snapshot_error is None
        assert named(log_lines, "snapshot_recovered")
    finally:
        files.failing.clear()
        run.stop()
    assert run.error is None
    names = csv_names(config)
    assert len(names) == len(set(names)) and set(names) == everything


# --- 2. state commits fail -------------------------------------------------------------


class FailingStore(StateStore):
    """The link stage's state store; ``commit_batch`` fails like a full disk while
    ``failing`` is set, before anything reaches the database."""

    def __init__(self, folder: Path, failing: threading.Event) -> None:
        super().__init__(folder)
        self.failing = failing
        self.attempts = 0

    def commit_batch(
        self,
        batch: int,
        crops: Sequence[CommittedCrop],
        merges: Sequence[Merge],
        skipped: Sequence[DecodeFailure],
        *,
        moved: Sequence[Moved] = (),
        now: float | None = None,
        session: str = "all",
    ) -> None:
        if self.failing.is_set():
            self.attempts += 1
            raise sqlite3.OperationalError("database or disk is full")
        super().commit_batch(batch, crops, merges, skipped, moved=moved, now=now, session=session)


class StoreSeam:
    """Opens :class:`FailingStore` for the daemon and keeps it for the test to inspect."""

    def __init__(self) -> None:
        self.failing = threading.Event()
        self.store: FailingStore | None = None

    def __call__(self, folder: Path) -> StateStore:
        self.store = FailingStore(folder, self.failing)
        return self.store

    @property
    def attempts(self) -> int:
        return self.store.attempts if self.store is not None else 0


def test_failing_commits_mark_nothing_processed_until_they_land_once(
    tmp_path: Path, notify: Receiver, log_lines: io.StringIO
) -> None:
    frames = frame_dirs(session(tmp_path, frames=8, seed=4))
    watch = tmp_path / "watch"
    watch.mkdir()
    copy_frames(frames[:4], watch)
    first = crops_in(watch)
    config = make_config(tmp_path, watch)
    seam = StoreSeam()
    run = Running(Daemon(config, embedder=embedder(), state_store=seam))
    try:
        wait_for(lambda: set(csv_names(config)) == first)

        seam.failing.set()
        copy_frames(frames[4:], watch)
        everything = crops_in(watch)
        line = wait_status(notify, "STATE COMMIT FAILING")
        assert "database or disk is full" in line
        # Retried (with backoff), not dropped and not marked done.
        wait_for(lambda: seam.attempts >= 2, 10)
        report = read_status(config.state.folder)
        assert report.state_error == "database or disk is full"
        assert "ERROR:      state: database or disk is full" in format_status(report)
        assert named(log_lines, "state_commit_failed")
        assert stored_paths(config) == first
        assert committed(config) == len(first)
        assert set(csv_names(config)) == first

        seam.failing.clear()
        wait_for(lambda: committed(config) == len(everything), 15)
        wait_for(lambda: set(csv_names(config)) == everything)
        wait_status_without(notify, "STATE COMMIT FAILING")
        assert read_status(config.state.folder).state_error is None
        assert named(log_lines, "state_commit_recovered")
    finally:
        seam.failing.clear()
        run.stop()
    assert run.error is None
    names = csv_names(config)
    assert len(names) == len(set(names)) and set(names) == everything
    assert stored_paths(config) == everything


def test_stop_while_commits_fail_then_restart_lands_every_crop_once(
    tmp_path: Path, notify: Receiver, log_lines: io.StringIO
) -> None:
    frames = frame_dirs(session(tmp_path, frames=8, seed=6))
    watch = tmp_path / "watch"
    watch.mkdir()
    copy_frames(frames[:4], watch)
    first = crops_in(watch)
    config = make_config(tmp_path, watch)
    seam = StoreSeam()
    run = Running(Daemon(config, embedder=embedder(), state_store=seam))
    try:
        wait_for(lambda: committed(config) == len(first))
        seam.failing.set()
        copy_frames(frames[4:], watch)
        everything = crops_in(watch)
        wait_for(lambda: seam.attempts >= 1, 10)
        # A stop must not wait for the disk forever (systemd would SIGKILL it):
        # the link stage gives up after its grace and the run fails loudly.
        started = time.monotonic()
        run.stop(timeout_s=20)
        assert time.monotonic() - started < 15
    finally:
        seam.failing.clear()
        if run.thread.is_alive():
            run.stop()
    assert isinstance(run.error, RuntimeError)
    assert "state commit still failing at shutdown" in str(run.error)
    assert stored_paths(config) == first
    assert set(csv_names(config)) == first

    summary = Daemon(config, embedder=embedder(), exit_when_idle_s=1.0).run()
    assert summary.new_crops == len(everything) - len(first)
    names = csv_names(config)
    assert len(names) == len(set(names)), "a crop is in clusters.csv twice"
    assert set(names) == everything


# --- 3. a hung model -------------------------------------------------------------------


class HangingEmbedder(ColourEmbedder):
    """The colour fake, except that while ``hang`` is set each model call blocks
    until ``release`` is set (a wedged GPU driver, a deadlocked library)."""

    def __init__(self) -> None:
        super().__init__(EmbedderOptions())
        self.hang = threading.Event()
        self.release = threading.Event()
        self.entered = threading.Event()

    def embed(self, batch: torch.Tensor) -> Any:
        if self.hang.is_set():
            self.entered.set()
            self.release.wait(30)
        return super().embed(batch)


def test_hung_model_stops_the_watchdog_pings_until_released(
    tmp_path: Path, notify: Receiver, log_lines: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    interval_s = 0.4
    monkeypatch.setenv("WATCHDOG_USEC", str(int(interval_s * 1_000_000)))
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    frames = frame_dirs(session(tmp_path, frames=4, seed=8))
    watch = tmp_path / "watch"
    watch.mkdir()
    copy_frames(frames[:2], watch)
    first = crops_in(watch)
    base = make_config(tmp_path, watch)
    config = dataclasses.replace(base, service=dataclasses.replace(base.service, stall_s=1.0))
    model = HangingEmbedder()
    run = Running(Daemon(config, embedder=model))
    try:
        wait_for(lambda: committed(config) == len(first))
        window = 1.2
        healthy = pings(collect(notify, window))
        # One ping per half interval; allow for scheduling jitter on a busy machine.
        assert healthy >= 0.6 * window / (interval_s / 2)

        model.hang.set()
        copy_frames(frames[2:], watch)
        assert model.entered.wait(10), "the model was never called"
        hung_at = time.monotonic()
        # Pings go on until the call has been busy for stall_s, then stop.
        collect(notify, max(0.0, hung_at + config.service.stall_s + 0.3 - time.monotonic()))
        hung = collect(notify, window)
        assert pings(hung) == 0
        assert any("STALLED: embed" in s for s in statuses(hung))
        withheld = named(log_lines, "watchdog_withheld")
        assert len(withheld) == 1 and withheld[0]["stalled"][0].startswith("embed")
        assert committed(config) == len(first)

        model.release.set()
        model.hang.clear()
        resumed = collect(notify, window)
        assert pings(resumed) >= 0.6 * window / (interval_s / 2)
        assert named(log_lines, "watchdog_resumed")
        wait_for(lambda: committed(config) == len(crops_in(watch)), 10)
    finally:
        model.release.set()
        run.stop()
    assert run.error is None


# --- 4. the disk runs low --------------------------------------------------------------


class FillingDisk:
    """Free MB per folder as the test sets it (the daemon's ``free_space`` seam)."""

    def __init__(self, free_mb: int) -> None:
        self.free: dict[Path, int] = {}
        self.default = free_mb

    def __call__(self, folder: Path) -> int:
        return self.free.get(folder, self.default)


def test_low_disk_is_warned_once_shown_and_every_crop_still_lands(
    tmp_path: Path, notify: Receiver, log_lines: io.StringIO
) -> None:
    frames = frame_dirs(session(tmp_path, frames=6, seed=4))
    watch = tmp_path / "watch"
    watch.mkdir()
    copy_frames(frames[:3], watch)
    config = make_config(tmp_path, watch)
    disk = FillingDisk(50_000)
    run = Running(Daemon(config, embedder=embedder(), free_space=disk))
    try:
        wait_for(lambda: committed(config) == len(crops_in(watch)))
        wait_for(lambda: read_status(config.state.folder).state_free_mb == 50_000)
        assert "DISK LOW" not in format_status(read_status(config.state.folder))

        disk.free[config.state.folder] = 512
        line = wait_status(notify, "DISK LOW")
        assert line.endswith("; DISK LOW: state 512 MB free")
        copy_frames(frames[3:], watch)
        everything = crops_in(watch)
        wait_for(lambda: set(csv_names(config)) == everything)
        report = read_status(config.state.folder)
        assert (report.state_free_mb, report.output_free_mb) == (512, 50_000)
        assert report.disk_low == ("state",)
        assert "WARNING:    disk low: state 512 MB free (below 1024 MB)" in format_status(report)
        time.sleep(1.5)  # more checks while still low: still one warning
        low = named(log_lines, "disk_low")
        assert len(low) == 1 and low[0]["level"] == "warning"
        assert (low[0]["folder"], low[0]["free_mb"], low[0]["min_free_mb"]) == ("state", 512, 1024)

        disk.free[config.state.folder] = 40_000
        wait_status_without(notify, "DISK LOW")
        wait_for(lambda: read_status(config.state.folder).disk_low == ())
        assert [e["free_mb"] for e in named(log_lines, "disk_ok")] == [40_000]
    finally:
        run.stop()
    assert run.error is None
    names = csv_names(config)
    assert len(names) == len(set(names)) and set(names) == everything
