"""A restart bounded by what changed (issue 10, point 5): the scan cache, READY before
the watches, and the verify walk that finds what no folder mtime tells.

The folders are aged an hour (`age`) so that the scan trusts their mtimes (see RACY_S).
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from fakes import BLUE, GREEN, RED
from test_identity import config_for, png, rows
from test_notify import named
from test_registry import HOUR_NS, CountingLister, age, old_tree
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


# --- frozen folders: old nights are neither stat'ed nor entered by routine walks -------------

DAY_NS = 24 * HOUR_NS
FREEZE_S = 6 * 3600.0


def season(root: Path, nights: int, frames: int) -> list[Path]:
    """``nights`` night folders of ``frames`` frames (``n<k>/f<i>/crops/x.png``): the
    last one an hour old (tonight's, not frozen), the others two days old (frozen)."""
    crops: list[Path] = []
    for k in range(nights):
        ns = HOUR_NS if k == nights - 1 else 2 * DAY_NS
        for i in range(frames):
            crop = png(root / f"n{k}" / f"f{i}" / "crops" / "x.png", RED[0])
            age(crop.parent, ns)
            age(crop.parent.parent, ns)
            crops.append(crop)
        age(root / f"n{k}", ns)
    age(root, HOUR_NS)
    return crops


def below(root: Path, *names: str) -> set[Path]:
    """The folders under ``root / names...``, that one included."""
    found, todo = set(), [root.joinpath(*names)]
    while todo:  # scandir's types: no stat for CountingStat to count
        folder = todo.pop()
        found.add(folder)
        with os.scandir(folder) as entries:
            todo += [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]
    return found


class CountingStat:
    """Records the folders under ``root`` that are stat'ed (lstat or stat)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
        self.root = str(root)
        self.stated: list[Path] = []
        for name in ("lstat", "stat"):
            real = getattr(os, name)
            monkeypatch.setattr(os, name, self._counting(real))

    def _counting(self, real: Callable[..., os.stat_result]) -> Callable[..., os.stat_result]:
        def counting(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
            result = real(path, *args, **kwargs)
            ours = isinstance(path, (str, Path)) and str(path).startswith(self.root)
            if ours and stat.S_ISDIR(result.st_mode):
                self.stated.append(Path(path))
            return result

        return counting

    def take(self) -> set[Path]:
        stated, self.stated = self.stated, []
        assert len(stated) == len(set(stated))  # each folder once a walk
        return set(stated)


def frozen_dirs(cache_file: Path, root: Path) -> tuple[DirMtimes, RecordingCache]:
    cache = RecordingCache(cache_file, root)
    return DirMtimes(cache=cache, freeze_after_s=FREEZE_S), cache


def test_a_walk_after_a_restart_stats_only_the_folders_not_frozen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "W"
    season(root, 6, 5)
    cache_file = tmp_path / SCAN_CACHE_NAME
    dirs, cache = frozen_dirs(cache_file, root)
    assert dirs.restore() is False
    _, listed = walk(root, dirs, full=True)
    assert len(listed) == 1 + 6 * 11
    # Memory keeps the old nights' folders, not what is below them (the cache has it).
    assert len(dirs) == 1 + 5 + 11
    cache.close()

    new = png(root / "n5" / "f2" / "crops" / "y.png", GREEN[0])  # tonight, while stopped
    stats = CountingStat(monkeypatch, root)
    dirs, cache = frozen_dirs(cache_file, root)
    assert dirs.restore() is True
    assert len(dirs) == 1 + 5 + 11  # the start reads no more than that either
    found, listed = walk(root, dirs, full=False)
    assert stats.take() == {root} | below(root, "n5")  # not one folder of an old night
    assert dirs.frozen == 5 and [f.path for f in found] == [new.parent / "x.png", new]
    assert listed == [new.parent]
    # Writes follow the change: the listed folder (young: "list it") and its ancestors.
    [(upserts, gone)] = cache.writes
    assert sorted(p for p, _ in upserts) == sorted(
        map(str, [root, root / "n5", root / "n5" / "f2", new.parent])
    )
    assert gone == []

    found, listed = walk(root, dirs, full=True)  # after lost events: everything
    assert len(stats.take()) == len(listed) == 1 + 6 * 11 and len(found) == 31
    cache.close()


def test_a_file_added_to_a_frozen_folder_is_found_once_an_event_thaws_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "W"
    crops = season(root, 3, 4)
    cache_file = tmp_path / SCAN_CACHE_NAME
    dirs, cache = frozen_dirs(cache_file, root)
    walk(root, dirs, full=True)
    cache.close()
    dirs, cache = frozen_dirs(cache_file, root)  # a restart: n0's frames not in memory
    dirs.restore()
    stats = CountingStat(monkeypatch, root)
    assert walk(root, dirs, full=False)[0] == []
    assert stats.take() == {root} | below(root, "n2")

    new = png(root / "n0" / "f1" / "crops" / "y.png", GREEN[0])
    shutil.rmtree(root / "n0" / "f3")
    stats.take()
    assert walk(root, dirs, full=False)[0] == []  # frozen: left to the event
    assert stats.take() == {root} | below(root, "n2")
    dirs.thaw(new.parent)  # the intake does this for each hint
    found, listed = walk(root, dirs, full=False)
    assert [f.path for f in found] == [new.parent / "x.png", new]
    # n0 and its f1 are visited again; n0's other frames stay frozen.
    thawed = {root / "n0", root / "n0" / "f1", new.parent}
    assert stats.take() == {root} | below(root, "n2") | thawed
    assert sorted(listed) == sorted([root / "n0", new.parent])
    assert cache.writes[-1][1] == [str(root / "n0" / "f3")]  # gone from a listed folder
    assert (
        str(root / "n0" / "f3" / "crops")
        not in ScanCache(cache_file, root=root, recursive=True).load()
    )
    assert str(root / "n1" / "f3" / "crops") in cache.load()  # not visited, not gone

    # Once quiet for freeze_after_s the thawed night freezes again.
    for folder in (new.parent, root / "n0", root / "n0" / "f1"):
        age(folder, 2 * DAY_NS)
    stats.take()
    walk(root, dirs, full=False)
    stats.take()
    walk(root, dirs, full=False)
    assert stats.take() == {root} | below(root, "n2")
    assert crops[0].exists()
    cache.close()


def test_a_forgotten_folder_in_a_frozen_night_is_listed_after_a_restart(
    tmp_path: Path,
) -> None:
    root = tmp_path / "W"
    crops = season(root, 2, 3)
    cache_file = tmp_path / SCAN_CACHE_NAME
    dirs, cache = frozen_dirs(cache_file, root)
    walk(root, dirs, full=True)
    dirs.forget(crops[1].parent)  # a file there could not be read; then a stop
    dirs.flush_forgotten()
    cache.close()
    dirs, cache = frozen_dirs(cache_file, root)
    dirs.restore()
    found, listed = walk(root, dirs, full=False)
    assert listed == [crops[1].parent] and [f.path for f in found] == [crops[1]]
    cache.close()


def test_an_old_scan_cache_means_one_full_walk(tmp_path: Path) -> None:
    root = tmp_path / "W"
    season(root, 2, 2)
    cache_file = tmp_path / SCAN_CACHE_NAME
    with sqlite3.connect(cache_file) as db:  # version 1: no parent, no newest
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        db.execute("CREATE TABLE dirs (path TEXT PRIMARY KEY, mtime_ns INTEGER) WITHOUT ROWID")
        meta = {"version": "1", "root": str(root), "recursive": "True"}
        db.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
        db.execute("INSERT INTO dirs VALUES (?, ?)", (str(root), 1))
    db.close()
    dirs, cache = frozen_dirs(cache_file, root)
    assert dirs.restore() is False
    assert len(walk(root, dirs, full=True)[1]) == 1 + 2 * 5
    cache.close()
    assert frozen_dirs(cache_file, root)[0].restore() is True


def frozen_config(tmp_path: Path, watch: Path) -> Config:
    config = idle_config(tmp_path, watch)
    return dataclasses.replace(
        config, watch=dataclasses.replace(config.watch, freeze_after_s=600.0)
    )


def test_a_crop_added_to_a_frozen_folder_while_stopped_is_found_by_the_verify_walk(
    tmp_path: Path,
) -> None:
    out = io.StringIO()
    configure_logging("json", "debug", out, environ={})
    watch = tmp_path / "W"
    crops = old_tree(watch, 4)  # an hour old: frozen after 600 s
    config = frozen_config(tmp_path, watch)
    Daemon(config, embedder=CountingEmbedder(EmbedderOptions()), exit_when_idle_s=0.5).run()
    new = png(crops[2].parent / "y.png", GREEN[0])
    out.truncate(0)
    out.seek(0)
    Daemon(config, embedder=CountingEmbedder(EmbedderOptions()), exit_when_idle_s=0.5).run()
    assert str(new) in {n for n, _ in rows(config)}
    first = named(out, "rescanned")[0]
    assert first["full"] is False and first["dirs_frozen"] == 4
    assert first["dirs_listed"] == 0 and first["new_files"] == 0
    [done] = named(out, "verify_walk_done")
    assert done["new_files"] == 1 and done["files"] == 5


def test_a_crop_added_to_a_frozen_folder_while_running_is_found_by_its_event(
    tmp_path: Path,
) -> None:
    out = io.StringIO()
    configure_logging("json", "debug", out, environ={})
    watch = tmp_path / "W"
    crops = old_tree(watch, 3)
    config = frozen_config(tmp_path, watch)  # rescans an hour apart: only the event
    run = Run(config)
    try:
        wait_for(lambda: len(rows(config)) == 3 and run.daemon.pipeline is not None)
        wait_for(lambda: run.daemon.pipeline is not None and run.daemon.pipeline.intake.verified)
        new = png(crops[1].parent / "y.png", GREEN[0])
        wait_for(lambda: len(rows(config)) == 4)
    finally:
        run.daemon.request_stop()
        run.join()
    assert str(new) in {n for n, _ in rows(config)}
    assert named(out, "rescanned")[-1]["dirs_frozen"] == 3  # the last before the event
