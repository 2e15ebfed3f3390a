"""A restart bounded by what changed (issue 10, point 5): the scan cache, READY before
the watches, and the verify walk that finds what no folder mtime tells.

The folders are aged an hour (`age`) so that the scan trusts their mtimes (see RACY_S).
"""

from __future__ import annotations

import dataclasses
import io
import shutil
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fakes import BLUE, GREEN
from test_identity import config_for, png, rows
from test_notify import named
from test_registry import CountingLister, age, old_tree
from test_soak import DeafObserver
from test_supervisor import CountingEmbedder, wait_for
from watchdog.observers.api import BaseObserver

from crop_clusterd.config import Config
from crop_clusterd.embed import EmbedderOptions
from crop_clusterd.log import configure_logging
from crop_clusterd.notify import Notifier
from crop_clusterd.scancache import SCAN_CACHE_NAME, Row, ScanCache
from crop_clusterd.supervisor import Daemon
from crop_clusterd.watch import DirMtimes, FileSeen, WatchMode, scan_tree


class RecordingCache(ScanCache):
    """The real cache, recording what each walk wrote."""

    def __init__(self, path: Path, root: Path) -> None:
        super().__init__(path, root=root, recursive=True)
        self.writes: list[tuple[list[tuple[str, Row]], list[str]]] = []

    def write(self, upserts: Iterable[tuple[str, Row]], gone: Iterable[str]) -> None:
        upserts, gone = list(upserts), list(gone)
        self.writes.append((upserts, gone))
        super().write(upserts, gone)


def walk(root: Path, dirs: DirMtimes, *, full: bool) -> tuple[list[FileSeen], list[Path]]:
    lister = CountingLister()
    dirs.begin(full=full)
    return list(scan_tree(root, dirs=dirs, listdir=lister)), lister.listed


def restarted(cache_file: Path, root: Path) -> tuple[DirMtimes, RecordingCache]:
    cache = RecordingCache(cache_file, root)
    return DirMtimes(cache=cache), cache


def test_the_cache_survives_a_restart_and_the_first_scan_lists_changed_folders_only(
    tmp_path: Path,
) -> None:
    root = tmp_path / "W"
    crops = old_tree(root, 20)
    cache_file = tmp_path / SCAN_CACHE_NAME
    dirs, cache = restarted(cache_file, root)
    assert dirs.restore() is False  # nothing stored yet: the first walk is full
    found, listed = walk(root, dirs, full=True)
    assert len(listed) == 41 and sorted(f.path for f in found) == crops
    [(upserts, deletes)] = cache.writes
    assert len(upserts) == 41 and deletes == []
    cache.close()

    new = png(root / "frame999" / "crops" / "x.png", GREEN[0])  # while stopped
    dirs, cache = restarted(cache_file, root)
    assert dirs.restore() is True and len(dirs) == 41
    found, listed = walk(root, dirs, full=False)
    assert [f.path for f in found] == [new]
    assert sorted(listed) == sorted([root, new.parent.parent, new.parent])
    # Only what changed is written: the young folders as "list again", the root's mtime.
    [(upserts, deletes)] = cache.writes
    assert sorted(p for p, _ in upserts) == sorted(map(str, listed)) and deletes == []

    for folder in (root, new.parent.parent, new.parent):
        age(folder)
    walk(root, dirs, full=False)
    walk(root, dirs, full=False)  # nothing changed since: nothing written
    assert len(cache.writes) == 2
    cache.close()


def test_a_removed_folder_leaves_the_cache_with_its_sub_folders(tmp_path: Path) -> None:
    root = tmp_path / "W"
    old_tree(root, 3)
    cache_file = tmp_path / SCAN_CACHE_NAME
    dirs, cache = restarted(cache_file, root)
    walk(root, dirs, full=True)
    shutil.rmtree(root / "frame001")
    age(root)
    walk(root, dirs, full=False)
    assert cache.writes[-1][1] == [str(root / "frame001")]  # with its sub-folders
    cache.close()
    stored = ScanCache(cache_file, root=root, recursive=True).load()
    assert len(stored) == 5 and str(root / "frame001") not in stored


def test_a_deleted_or_corrupt_cache_means_one_full_walk_and_no_error(tmp_path: Path) -> None:
    out = io.StringIO()
    configure_logging("json", "debug", out, environ={})
    root = tmp_path / "W"
    crops = old_tree(root, 5)
    cache_file = tmp_path / SCAN_CACHE_NAME
    dirs, cache = restarted(cache_file, root)
    walk(root, dirs, full=True)
    cache.close()
    cache_file.write_bytes(b"not a database, " * 512)  # a torn or foreign file
    for suffix in ("-wal", "-shm"):
        Path(f"{cache_file}{suffix}").unlink(missing_ok=True)
    dirs, cache = restarted(cache_file, root)
    assert dirs.restore() is False
    assert named(out, "scan_cache_unreadable")
    found, listed = walk(root, dirs, full=True)
    assert sorted(f.path for f in found) == crops and len(listed) == 11
    cache.close()
    assert restarted(cache_file, root)[0].restore() is True  # written afresh

    cache_file.unlink()
    dirs, cache = restarted(cache_file, root)
    assert dirs.restore() is False
    cache.close()
    # The cache of another watched folder is not trusted either.
    other = restarted(cache_file, tmp_path / "elsewhere")[0]
    assert other.restore() is False


# --- through the daemon --------------------------------------------------------------------


class ReadyNotifier(Notifier):
    """No socket; records READY and whether the observer's start was still blocked then."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__(None)
        self.gate = gate
        self.ready_while_blocked: bool | None = None

    def ready(self, status: str | None = None) -> bool:
        self.ready_while_blocked = not self.gate.is_set()
        return super().ready(status)


class GatedObserver(DeafObserver):
    """A deaf observer whose start (where inotify sets its watches) waits for ``gate``."""

    gate = threading.Event()
    entered = threading.Event()

    def start(self) -> None:
        type(self).entered.set()
        assert type(self).gate.wait(60), "the test never released the observer"
        super().start()


def gated(mode: WatchMode, poll_interval_s: float) -> BaseObserver:
    return GatedObserver()


class Run:
    def __init__(self, config: Config, **kwargs: Any) -> None:
        self.daemon = Daemon(config, embedder=CountingEmbedder(EmbedderOptions()), **kwargs)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.daemon.run()
        except BaseException as exc:
            self.error = exc

    def join(self) -> None:
        self.thread.join(60)
        assert not self.thread.is_alive() and self.error is None, self.error


def idle_config(tmp_path: Path, watch: Path) -> Config:
    config = config_for(tmp_path, watch)
    return dataclasses.replace(config, watch=dataclasses.replace(config.watch, rescan_s=3600.0))


def test_ready_goes_before_the_watches_and_a_crop_written_before_them_is_found(
    tmp_path: Path,
) -> None:
    out = io.StringIO()
    configure_logging("json", "debug", out, environ={})
    watch = tmp_path / "W"
    crops = old_tree(watch, 3)
    config = idle_config(tmp_path, watch)
    Daemon(config, embedder=CountingEmbedder(EmbedderOptions()), exit_when_idle_s=0.5).run()
    assert len(rows(config)) == 3

    GatedObserver.gate.clear()
    GatedObserver.entered.clear()
    notifier = ReadyNotifier(GatedObserver.gate)
    run = Run(config, notifier=notifier, observer_factory=gated, exit_when_idle_s=0.5)
    try:
        assert GatedObserver.entered.wait(30)
        wait_for(lambda: run.daemon.pipeline is not None and run.daemon.pipeline.intake.scans > 0)
        assert notifier.ready_while_blocked is True
        # Between the first scan and the watches, which see nothing of this (a deaf
        # observer besides): a new crop in a listed folder and a rewrite in place.
        new = png(crops[0].parent / "y.png", GREEN[0])
        with open(crops[1], "r+b") as f:  # in place: no folder changes its mtime
            f.write(png(tmp_path / "blue.png", BLUE[0]).read_bytes())
    finally:
        GatedObserver.gate.set()
    run.join()
    names = {n for n, _ in rows(config)}
    assert str(new) in names and len(names) == 4
    done = named(out, "verify_walk_done")[-1]  # the restart's
    assert done["files"] == 4 and done["new_files"] == 1  # the rewrite; the new one before
    scans = named(out, "rescanned")
    assert scans[-2]["full"] is False  # the restart's first scan: the stored walk
    assert scans[-1]["full"] is False and scans[-1]["new_files"] == 1  # once watched


def test_a_crop_rewritten_while_stopped_is_found_by_the_verify_walk(tmp_path: Path) -> None:
    out = io.StringIO()
    configure_logging("json", "debug", out, environ={})
    watch = tmp_path / "W"
    crops = old_tree(watch, 4)
    config = idle_config(tmp_path, watch)
    Daemon(config, embedder=CountingEmbedder(EmbedderOptions()), exit_when_idle_s=0.5).run()
    assert (config.state.folder / SCAN_CACHE_NAME).exists()
    blue = png(tmp_path / "blue.png", BLUE[0]).read_bytes()
    with open(crops[2], "r+b") as f:
        f.write(blue)
    CountingEmbedder.embedded = 0
    out.truncate(0)
    out.seek(0)
    Daemon(config, embedder=CountingEmbedder(EmbedderOptions()), exit_when_idle_s=0.5).run()
    assert CountingEmbedder.embedded == 1
    [first] = named(out, "rescanned")[:1]
    assert first["full"] is False and first["dirs_listed"] == 0 and first["new_files"] == 0
    [done] = named(out, "verify_walk_done")
    assert done["new_files"] == 1
    assert [e["file"] for e in named(out, "crop_rewritten")] == [str(crops[2])]
