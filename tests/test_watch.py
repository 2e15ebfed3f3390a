"""Tests for the watching stage: real observers on tmp folders, settling on a fake clock."""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs
from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify import InotifyObserver

from crop_clusterd.watch import (
    FileSeen,
    ObserverFactory,
    Settler,
    Watcher,
    WatchMode,
    default_observer_factory,
    kind,
    scan_tree,
)

FRAME = "20230908001617-00-06"


def crop_name(i: int, frame: str = FRAME) -> str:
    return f"crop_{frame}_CROPNUMBER_{i}_UUID_abc.png"


def meta_name(frame: str = FRAME) -> str:
    return f"metadata_{frame}_UUID_abc.json"


def write(path: Path, data: bytes = b"x" * 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    """Poll ``condition`` every 20 ms until it holds or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


class Hints:
    """Thread-safe collector usable as ``on_hint``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: list[Path] = []

    def __call__(self, path: Path) -> None:
        with self._lock:
            self._paths.append(path)

    @property
    def paths(self) -> set[Path]:
        with self._lock:
            return set(self._paths)

    def wait(self, path: Path, timeout_s: float = 5.0) -> bool:
        return wait_for(lambda: path in self.paths, timeout_s)


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingFactory:
    """The real observers, remembering what was built; optionally failing first."""

    def __init__(self, fail_with: OSError | None = None, fail_mode: WatchMode = "inotify") -> None:
        self.built: list[BaseObserver] = []
        self.calls: list[WatchMode] = []
        self._fail_with = fail_with
        self._fail_mode = fail_mode

    def __call__(self, mode: WatchMode, poll_interval_s: float) -> BaseObserver:
        self.calls.append(mode)
        if self._fail_with is not None and mode == self._fail_mode:
            error, self._fail_with = self._fail_with, None
            raise error
        observer: BaseObserver = default_observer_factory(mode, poll_interval_s)
        self.built.append(observer)
        return observer


class ExhaustedInotifyObserver(InotifyObserver):
    """An inotify observer whose watch cannot be added, as when max_user_watches is hit."""

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "inotify watch limit reached")


@pytest.fixture
def watched(tmp_path: Path) -> Path:
    folder = tmp_path / "watch"
    folder.mkdir()
    return folder


@pytest.fixture
def running() -> Iterator[list[Watcher]]:
    """Watchers appended here are stopped after the test, even when it fails."""
    watchers: list[Watcher] = []
    yield watchers
    for w in watchers:
        w.stop()


def started(
    running: list[Watcher], folder: Path, on_hint: Callable[[Path], None], **kw: Any
) -> Watcher:
    watcher = Watcher(folder, on_hint, **kw)
    running.append(watcher)
    assert watcher.start()
    return watcher


# --- kind and scan_tree ------------------------------------------------------------------


def test_kind_classifies_crops_metadata_and_the_rest() -> None:
    assert kind(Path("a") / crop_name(0)) == "crop"
    assert kind("odd_name.JPG") == "crop"
    assert kind(meta_name()) == "metadata"
    assert kind("notes.json") is None
    assert kind("readme.txt") is None
    for ignored in (".hidden.png", "a.png.tmp", "a.png.part", "a.png~", f".{meta_name()}"):
        assert kind(ignored) is None, ignored


def test_scan_tree_finds_crops_and_metadata_with_their_stats(tmp_path: Path) -> None:
    frame = tmp_path / FRAME
    crops = [write(frame / "crops" / crop_name(i), b"y" * (10 + i)) for i in range(3)]
    meta = write(frame / meta_name(), b"{}")
    write(frame / "notes.txt")
    top = write(tmp_path / "loose.png", b"zz")

    found = list(scan_tree(tmp_path))

    assert [f.path for f in found] == [top, meta, *crops]  # name order, depth first
    for f in found:
        st = f.path.stat()
        assert (f.size, f.mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert [kind(f.path) for f in found] == ["crop", "metadata", "crop", "crop", "crop"]


def test_scan_tree_not_recursive_stays_at_the_top(tmp_path: Path) -> None:
    top = write(tmp_path / crop_name(0))
    write(tmp_path / "sub" / crop_name(1))
    assert [f.path for f in scan_tree(tmp_path, recursive=False)] == [top]


def test_scan_tree_skips_hidden_temporary_symlinked_and_odd_entries(tmp_path: Path) -> None:
    root = tmp_path / "watch"
    outside = tmp_path / "outside"
    secret = write(outside / "secret.png")
    write(outside / "dir" / crop_name(9))
    keep = write(root / crop_name(0))
    for name in (".hidden.png", "a.png.tmp", "a.png.part", "a.png~"):
        write(root / name)
    write(root / ".cache" / crop_name(1))  # hidden directory: not entered
    write(root / "x.png" / crop_name(2))  # directory named like an image: not entered
    (root / "link.png").symlink_to(secret)
    (root / "linkdir").symlink_to(outside / "dir", target_is_directory=True)
    os.mkfifo(root / "pipe.png")

    assert [f.path for f in scan_tree(root)] == [keep]


def test_scan_tree_raises_for_a_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        list(scan_tree(tmp_path / "gone"))


def test_scan_tree_survives_a_directory_vanishing_mid_walk(tmp_path: Path) -> None:
    first = write(tmp_path / "a" / crop_name(0))
    write(tmp_path / "b" / crop_name(1))
    last = write(tmp_path / "c" / crop_name(2))

    walk = scan_tree(tmp_path)
    assert next(walk).path == first
    shutil.rmtree(tmp_path / "b")  # listed already, gone before it is entered
    with capture_logs() as logs:
        rest = [f.path for f in walk]

    assert rest == [last]
    assert [e["event"] for e in logs] == ["scan_error"]
    assert "ENOENT" in logs[0]["reason"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads directories whatever their mode")
def test_scan_tree_survives_an_unreadable_directory(tmp_path: Path) -> None:
    locked = tmp_path / "a"
    write(locked / crop_name(0))
    ok = write(tmp_path / "b" / crop_name(1))
    locked.chmod(0)
    try:
        with capture_logs() as logs:
            found = [f.path for f in scan_tree(tmp_path)]
    finally:
        locked.chmod(0o755)
    assert found == [ok]
    assert [e["event"] for e in logs] == ["scan_error"]


# --- Settler (fake clock, real files) ----------------------------------------------------


def test_settler_waits_settle_s_after_first_seen_even_for_a_stable_file(tmp_path: Path) -> None:
    clock = FakeClock()
    path = write(tmp_path / crop_name(0))
    seen = next(iter(scan_tree(tmp_path)))
    settler = Settler(tmp_path, 0.5, clock=clock)
    settler.offer(path, seen)  # a fresh stat: no second look needed, only time

    clock.advance(0.49)
    assert settler.poll().ready == ()
    clock.advance(0.01)
    result = settler.poll()
    assert result.ready == (seen,)
    assert settler.pending == 0


def test_settler_needs_two_equal_stats_settle_s_apart(tmp_path: Path) -> None:
    clock = FakeClock()
    path = write(tmp_path / crop_name(0))
    settler = Settler(tmp_path, 0.5, clock=clock)
    settler.offer(path)
    clock.advance(1.0)
    assert settler.poll().ready == ()  # first stat only: stable since now
    clock.advance(0.4)
    assert settler.poll().ready == ()
    clock.advance(0.1)
    assert [f.path for f in settler.poll().ready] == [path]


def test_settler_retimes_a_file_that_keeps_growing(tmp_path: Path) -> None:
    clock = FakeClock()
    path = write(tmp_path / crop_name(0), b"a" * 10)
    settler = Settler(tmp_path, 0.5, clock=clock)
    settler.offer(path)
    settler.poll()
    for _ in range(5):  # a chunk every 0.3 s: never quiet for 0.5 s
        clock.advance(0.3)
        with path.open("ab") as fh:
            fh.write(b"b" * 10)
        assert settler.poll().ready == ()
    clock.advance(0.3)
    assert settler.poll().ready == ()  # quiet for 0.3 s only
    clock.advance(0.2)
    (ready,) = settler.poll().ready
    assert ready.size == 60
    assert ready.mtime_ns == path.stat().st_mtime_ns


def test_settler_offer_restarts_the_settle_time(tmp_path: Path) -> None:
    clock = FakeClock()
    path = write(tmp_path / crop_name(0))
    settler = Settler(tmp_path, 0.5, clock=clock)
    settler.offer(path)
    settler.poll()
    clock.advance(0.4)
    settler.offer(path)  # a fresh event: the writer is still busy
    clock.advance(0.4)
    assert settler.poll().ready == ()
    clock.advance(0.1)
    assert len(settler.poll().ready) == 1


def test_settler_releases_once_and_accepts_the_path_again(tmp_path: Path) -> None:
    clock = FakeClock()
    path = write(tmp_path / crop_name(0))
    settler = Settler(tmp_path, 0.2, clock=clock)
    for _ in range(2):
        settler.offer(path)
        assert settler.pending == 1
        settler.poll()
        clock.advance(0.2)
        assert [f.path for f in settler.poll().ready] == [path]
        assert settler.pending == 0
        assert settler.poll().ready == ()


def test_settler_reports_a_vanished_file_once(tmp_path: Path) -> None:
    clock = FakeClock()
    gone = write(tmp_path / crop_name(0))
    stays = write(tmp_path / crop_name(1))
    settler = Settler(tmp_path, 0.5, clock=clock)
    settler.offer(gone)
    settler.offer(stays)
    gone.unlink()

    first = settler.poll()
    assert first.vanished == (gone,)
    assert first.root_available
    assert settler.pending == 1
    clock.advance(0.5)
    second = settler.poll()
    assert second.vanished == ()
    assert [f.path for f in second.ready] == [stays]


def test_settler_drops_what_is_not_a_regular_file(tmp_path: Path) -> None:
    clock = FakeClock()
    outside = write(tmp_path / "outside" / "secret.png")
    root = tmp_path / "watch"
    (root / "x.png").mkdir(parents=True)
    (root / "link.png").symlink_to(outside)
    os.mkfifo(root / "pipe.png")
    settler = Settler(root, 0.0, clock=clock)
    for name in ("x.png", "link.png", "pipe.png"):
        settler.offer(root / name)

    result = settler.poll()
    assert result.not_regular == tuple(sorted(root / n for n in ("x.png", "link.png", "pipe.png")))
    assert result.ready == ()
    assert settler.pending == 0


def test_settler_reports_a_failing_stat_with_its_reason(tmp_path: Path) -> None:
    settler = Settler(tmp_path, 0.0, clock=FakeClock())
    bad = tmp_path / ("n" * 300 + ".png")  # longer than NAME_MAX
    settler.offer(bad)
    result = settler.poll()
    assert [p for p, _ in result.failed] == [bad]
    assert "ENAMETOOLONG" in result.failed[0][1]
    assert settler.pending == 0


def test_settler_reports_nothing_vanished_while_the_root_is_unavailable(tmp_path: Path) -> None:
    clock = FakeClock()
    root = tmp_path / "mnt" / "watch"
    paths = [write(root / FRAME / "crops" / crop_name(i)) for i in range(3)]
    settler = Settler(root, 0.5, clock=clock)
    for p in paths:
        settler.offer(p)
    settler.poll()
    root.rename(tmp_path / "mnt" / "away")  # the mount is gone

    with capture_logs() as logs:
        for _ in range(3):
            clock.advance(1.0)
            result = settler.poll()
            assert not result.root_available
            assert (result.ready, result.vanished, result.failed) == ((), (), ())
            assert settler.pending == 3
    assert [e["event"] for e in logs] == ["watch_root_unavailable"]  # once per outage

    (tmp_path / "mnt" / "away").rename(root)
    with capture_logs() as logs:
        back = settler.poll()
    assert back.root_available
    assert back.ready == ()  # settling starts over after an outage
    assert [e["event"] for e in logs] == ["watch_root_available"]
    clock.advance(0.5)
    assert [f.path for f in settler.poll().ready] == paths


def test_settler_ignores_errors_when_the_root_vanishes_during_a_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "watch"
    paths = [write(root / crop_name(i)) for i in range(2)]
    settler = Settler(root, 0.5, clock=FakeClock())
    for p in paths:
        settler.offer(p)
    real_lstat = os.lstat

    def lstat_losing_the_mount(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if root.exists():
            root.rename(tmp_path / "away")  # gone after the root check passed
        return real_lstat(path, *args, **kwargs)

    # watch calls os.lstat through the os module: patching it there reaches it.
    monkeypatch.setattr(os, "lstat", lstat_losing_the_mount)
    result = settler.poll()
    assert not result.root_available
    assert result.vanished == ()
    assert settler.pending == 2


def test_settler_rejects_a_negative_settle_time(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="settle_s"):
        Settler(tmp_path, -1.0)


# --- Watcher with real observers ---------------------------------------------------------


def test_half_written_crop_is_hinted_but_not_released_until_writes_stop(
    watched: Path, running: list[Watcher]
) -> None:
    settler = Settler(watched, 0.3)
    started(running, watched, settler.offer)
    path = watched / crop_name(0)
    released: list[FileSeen] = []
    with path.open("wb") as fh:
        fh.write(b"a" * 1000)
        fh.flush()
        assert wait_for(lambda: settler.pending == 1)  # hinted while half-written
        for _ in range(6):  # a slow writer: a chunk every 0.1 s, 0.6 s in all
            time.sleep(0.1)
            fh.write(b"b" * 1000)
            fh.flush()
            released.extend(settler.poll().ready)
    assert released == []

    def settled() -> bool:
        released.extend(settler.poll().ready)
        return bool(released)

    assert wait_for(settled)
    assert [(f.path, f.size) for f in released] == [(path, 7000)]


def test_new_frame_folders_and_their_files_are_hinted(
    watched: Path, running: list[Watcher]
) -> None:
    hints = Hints()
    started(running, watched, hints)
    frames = [f"{FRAME}-{n}" for n in range(3)]
    expected: set[Path] = set()
    for frame in frames:  # each file written right after its folders exist
        expected.add(write(watched / frame / "crops" / crop_name(0, frame)))
    assert wait_for(lambda: all(hints.wait(watched / f, 0) for f in frames))

    def found() -> set[Path]:
        # What a caller gets: file hints, plus scans of hinted new directories.
        paths = hints.paths
        scanned = {f.path for p in paths if p.is_dir() for f in scan_tree(p)}
        return {p for p in paths if p.is_file()} | scanned

    assert wait_for(lambda: expected <= found())
    assert watched not in hints.paths


def test_metadata_landing_after_its_crops_is_hinted(watched: Path, running: list[Watcher]) -> None:
    hints = Hints()
    started(running, watched, hints)
    crops = [write(watched / FRAME / "crops" / crop_name(i)) for i in range(2)]
    assert wait_for(lambda: set(crops) <= hints.paths)
    meta = write(watched / FRAME / meta_name(), b'{"boxes": []}')
    assert hints.wait(meta)
    assert kind(meta) == "metadata"


def test_files_present_before_start_are_found_by_scan_not_hinted(
    watched: Path, running: list[Watcher]
) -> None:
    before = write(watched / FRAME / "crops" / crop_name(0))
    hints = Hints()
    started(running, watched, hints)
    sentinel = write(watched / crop_name(1))
    assert hints.wait(sentinel)
    assert before not in hints.paths
    assert before in {f.path for f in scan_tree(watched)}


def test_a_file_moved_in_is_hinted_by_its_destination(
    tmp_path: Path, watched: Path, running: list[Watcher]
) -> None:
    hints = Hints()
    started(running, watched, hints)
    outside = write(tmp_path / "outside" / crop_name(0))
    moved_in = watched / crop_name(0)
    outside.rename(moved_in)
    partial = write(watched / (crop_name(1) + ".part"))
    renamed = watched / crop_name(1)
    partial.rename(renamed)  # the usual write-then-rename
    assert hints.wait(moved_in)
    assert hints.wait(renamed)
    assert partial not in hints.paths


def test_hidden_temporary_and_odd_names_are_not_hinted(
    tmp_path: Path, watched: Path, running: list[Watcher]
) -> None:
    hints = Hints()
    started(running, watched, hints)
    for name in (".hidden.png", "a.png.tmp", "a.png.part", "a.png~", "notes.txt"):
        write(watched / name)
    write(watched / ".cache" / crop_name(0))
    (watched / "x.png").mkdir()
    write(watched / "x.png" / crop_name(1))
    secret = write(tmp_path / "secret.png")
    link = watched / crop_name(2)
    link.symlink_to(secret)
    sentinel = write(watched / crop_name(3))
    assert hints.wait(sentinel)
    # The symlink may be hinted (events carry no file type); the settler drops it unread.
    assert hints.paths - {link} == {sentinel}
    settler = Settler(watched, 0.0)
    settler.offer(link)
    assert settler.poll().not_regular == (link,)


def test_an_exception_in_on_hint_does_not_stop_watching(
    watched: Path, running: list[Watcher]
) -> None:
    hints = Hints()

    def on_hint(path: Path) -> None:
        if "boom" in path.name:
            raise RuntimeError(f"cannot handle {path.name}")
        hints(path)

    with capture_logs() as logs:
        watcher = started(running, watched, on_hint)
        write(watched / "boom_1.png")
        write(watched / "boom_2.png")
        assert wait_for(lambda: watcher.handler_errors >= 2)
        after = write(watched / crop_name(0))
        assert hints.wait(after)
    assert watcher.healthy
    errors = [e for e in logs if e["event"] == "watch_handler_error"]
    assert len(errors) == 1  # once per kind of error
    assert errors[0]["error_kind"] == "RuntimeError"


def test_polling_mode_sees_new_files(watched: Path, running: list[Watcher]) -> None:
    hints = Hints()
    watcher = started(running, watched, hints, polling=True, poll_interval_s=0.1)
    assert watcher.mode == "polling"
    path = write(watched / FRAME / "crops" / crop_name(0))
    assert hints.wait(path)


def test_check_restarts_a_stopped_observer(watched: Path, running: list[Watcher]) -> None:
    clock = FakeClock()
    hints = Hints()
    factory = RecordingFactory()
    watcher = started(running, watched, hints, observer_factory=factory, clock=clock)
    assert not watcher.check()  # healthy: nothing to do
    factory.built[0].stop()
    factory.built[0].join()
    assert not watcher.healthy

    clock.advance(1.0)
    with capture_logs() as logs:
        assert watcher.check()
    assert [e["event"] for e in logs] == ["observer_restarted"]
    assert watcher.healthy
    assert len(factory.built) == 2
    assert not watcher.check()
    path = write(watched / crop_name(0))
    assert hints.wait(path)


def test_check_restarts_after_the_watched_folder_was_removed_and_recreated(
    watched: Path, running: list[Watcher]
) -> None:
    clock = FakeClock()
    hints = Hints()
    watcher = started(running, watched, hints, clock=clock)
    watched.rmdir()
    assert wait_for(lambda: not watcher.healthy)  # the inotify emitter stopped itself
    clock.advance(1.0)
    assert not watcher.check()  # still missing: start fails, no crash
    watched.mkdir()
    clock.advance(2.0)
    assert watcher.check()
    path = write(watched / crop_name(0))
    assert hints.wait(path)


def test_missing_folder_at_start_is_retried_with_backoff(tmp_path: Path) -> None:
    clock = FakeClock()
    folder = tmp_path / "not-yet"
    hints = Hints()
    factory = RecordingFactory()
    watcher = Watcher(folder, hints, observer_factory=factory, clock=clock, restart_backoff_s=1.0)
    try:
        with capture_logs() as logs:
            assert not watcher.start()
        assert [e["event"] for e in logs] == ["watch_start_failed"]
        attempts = [clock.now]
        for _ in range(64):  # 8 s of checks, 0.125 s apart (exact in binary)
            clock.advance(0.125)
            before = len(factory.calls)
            assert not watcher.check()
            if len(factory.calls) > before:
                attempts.append(clock.now)
        gaps = [b - a for a, b in itertools.pairwise(attempts)]
        assert gaps == [1.0, 2.0, 4.0]  # doubling, not spinning

        folder.mkdir()
        clock.advance(8.0)
        assert watcher.check()
        path = write(folder / crop_name(0))
        assert hints.wait(path)
    finally:
        watcher.stop()


def failing_on_create() -> ObserverFactory:
    """inotify_init fails: the instance limit is used up."""
    return RecordingFactory(fail_with=OSError(errno.EMFILE, "inotify instance limit reached"))


def failing_on_schedule() -> ObserverFactory:
    """A real inotify observer whose root watch cannot be added."""

    def factory(mode: WatchMode, interval: float) -> BaseObserver:
        if mode == "inotify":
            return ExhaustedInotifyObserver()
        observer: BaseObserver = default_observer_factory(mode, interval)
        return observer

    return factory


@pytest.mark.parametrize(
    ("make_factory", "reason"),
    [
        (failing_on_create, "inotify instance limit reached"),
        (failing_on_schedule, "inotify watch limit reached"),
    ],
    ids=["emfile-on-create", "enospc-on-schedule"],
)
def test_falls_back_to_polling_when_inotify_is_exhausted(
    watched: Path,
    running: list[Watcher],
    make_factory: Callable[[], ObserverFactory],
    reason: str,
) -> None:
    factory = make_factory()
    hints = Hints()
    with capture_logs() as logs:
        watcher = started(running, watched, hints, observer_factory=factory, poll_interval_s=0.1)
    assert watcher.mode == "polling"
    fallbacks = [e for e in logs if e["event"] == "watch_fallback_polling"]
    assert [e["reason"] for e in fallbacks] == [reason]
    path = write(watched / crop_name(0))
    assert hints.wait(path)


def test_other_start_errors_do_not_switch_to_polling(watched: Path) -> None:
    factory = RecordingFactory(fail_with=OSError(errno.EACCES, "Permission denied"))
    watcher = Watcher(watched, Hints(), observer_factory=factory, clock=FakeClock())
    try:
        assert not watcher.start()
        assert watcher.mode == "inotify"
        assert factory.calls == ["inotify"]
    finally:
        watcher.stop()


def test_stop_ends_the_observer_thread(watched: Path) -> None:
    factory = RecordingFactory()
    watcher = Watcher(watched, Hints(), observer_factory=factory)
    assert watcher.start()
    watcher.stop()
    assert not factory.built[0].is_alive()
    assert not watcher.healthy
    assert not watcher.check()  # stopped on purpose: no restart


def test_watcher_rejects_bad_intervals(watched: Path) -> None:
    with pytest.raises(ValueError, match="poll_interval_s"):
        Watcher(watched, Hints(), poll_interval_s=0)
    with pytest.raises(ValueError, match="restart_backoff_s"):
        Watcher(watched, Hints(), restart_backoff_s=5, max_restart_backoff_s=1)
