"""The intake's registry and rescans bounded by the work in flight (issue 10, points 4-5).

Committed files are looked up in the state database instead of being held in
memory: the decisions must be those of the old in-memory registry (built from
every stored row), and what memory holds must drop to nothing once the link
stage reports the commits. Periodic rescans skip directories whose mtime is
unchanged; directory listings are counted through ``scan_tree``'s seam.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import BLUE, GREEN, RED
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_identity import Running, config_for, png, rows
from test_notify import named
from test_soak import DeafObserver
from test_supervisor import CountingEmbedder, partition, wait_for
from watchdog.observers.api import BaseObserver

from crop_clusterd.embed import EmbedderOptions
from crop_clusterd.identity import Entry, Fingerprint, Registry, touched_paths
from crop_clusterd.log import configure_logging
from crop_clusterd.records import CommittedCrop, Crop, DecodeFailure, Embedded, Moved
from crop_clusterd.store import StateStore
from crop_clusterd.storedfiles import StoredFiles
from crop_clusterd.supervisor import Daemon
from crop_clusterd.watch import DirMtimes, FileSeen, WatchMode, list_sorted, scan_tree

pytestmark = pytest.mark.usefixtures("restore_logging")

REPO = Path(__file__).resolve().parents[1]

# --- lookups through the store decide as the in-memory registry did -----------------------

# (kind, size, mtime_ns, inode, content); size None: a row without a stat (moved
# and rewritten); inode and content None: a row from a schema 1 state.
RowSpec = tuple[str, int | None, int, int | None, str | None]

SIZES = st.sampled_from([None, 10, 11])
INODES = st.sampled_from([None, 7, 8])
CONTENTS = st.sampled_from([None, "h1", "h2"])
ROW = st.tuples(st.sampled_from(["crop", "skip"]), SIZES, st.sampled_from([1, 2]), INODES, CONTENTS)
PROBE = st.tuples(
    st.sampled_from([10, 11]),
    st.sampled_from([1, 2]),
    st.sampled_from([0, 7, 8]),
    CONTENTS,
)
N_PATHS = 6


def commit_rows(store: StateStore, folder: Path, specs: dict[int, RowSpec]) -> None:
    """One commit holding a crop or skip row per path (``folder/p<i>.png``)."""
    crops: list[CommittedCrop] = []
    skips: list[DecodeFailure] = []
    for i, (kind, size, mtime, inode, content) in sorted(specs.items()):
        name = str(folder / f"p{i}.png")
        stat = (size, None if size is None else mtime, None if size is None else inode)
        if kind == "crop":
            crop = Crop(Path(name), name, size=stat[0], mtime_ns=stat[1], inode=stat[2])
            crop = dataclasses.replace(crop, content=content)
            vector = np.full(4, 0.5, dtype=np.float32)
            crops.append(CommittedCrop(Embedded(crop, vector), len(crops), len(crops)))
        else:
            skips.append(DecodeFailure(name, "bad", *stat, content))
    store.commit_batch(0, crops, [], skips)


def memory_registry(store: StateStore) -> Registry:
    """The registry as it was built before: every stored row held in memory."""
    registry = Registry()
    for path, kind, fingerprint, content in store.registry_rows():
        registry.set(path, kind, fingerprint, content)
    return registry


Decisions = tuple[list[Entry | None], list[str | None], list[str | None]]


def decisions(
    registry: Registry, paths: list[str], probes: Sequence[tuple[int, int, int, str | None]]
) -> Decisions:
    """What the intake asks: by path (unchanged?), moved from where, replaced what."""
    return (
        [registry.get(p) for p in paths],
        [registry.moved_from(Fingerprint(s, m, i), c) for s, m, i, c in probes],
        [registry.replaced(inode) for inode in (0, 7, 8)],
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.dictionaries(st.integers(0, N_PATHS - 1), ROW, max_size=N_PATHS),
    existing=st.sets(st.integers(0, N_PATHS - 1)),
    probes=st.lists(PROBE, min_size=1, max_size=5),
    move=st.tuples(st.integers(0, N_PATHS - 1), PROBE),
)
def test_lookups_through_the_store_decide_as_the_memory_registry_did(
    specs: dict[int, RowSpec],
    existing: set[int],
    probes: list[tuple[int, int, int, str | None]],
    move: tuple[int, tuple[int, int, int, str | None]],
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = [str(folder / f"p{i}.png") for i in range(N_PATHS)] + [str(folder / "q.png")]
        for i in existing:  # a stored path whose file is still there is not a move source
            Path(paths[i]).touch()
        with StateStore(folder / "state") as store:
            commit_rows(store, folder, specs)
            old = memory_registry(store)
            new = Registry(StoredFiles(folder / "state"))
            try:
                assert len(new) == 0
                assert decisions(new, paths, probes) == decisions(old, paths, probes)
                new.prefetch(paths)  # as a scan looks its files up: the same answers
                assert decisions(new, paths, probes) == decisions(old, paths, probes)
                _move_and_commit(store, old, new, paths, move)
                assert decisions(new, paths, probes) == decisions(old, paths, probes)
            finally:
                new.close()


def _move_and_commit(
    store: StateStore,
    old: Registry,
    new: Registry,
    paths: list[str],
    move: tuple[int, tuple[int, int, int, str | None]],
) -> None:
    """A stored file moved to ``q.png``: the old registry forgot the old path, the
    new one vacates it until the commit is reported; both then decide alike."""
    source, (size, mtime, inode, content) = move
    entry = old.get(paths[source])
    if entry is None:
        return
    target = paths[-1]
    content = content or "moved"  # the intake always hashes a moved file
    fingerprint = Fingerprint(size, mtime, inode)
    moved = Moved(paths[source], target, entry.kind, size, mtime, inode or None, content)
    old.forget(paths[source])
    old.set(target, entry.kind, fingerprint, content)
    new.vacate(paths[source])
    new.set(target, entry.kind, fingerprint, content)
    new.sent(touched_paths((), [moved]))
    probes = [(size, mtime, inode, content)]
    assert decisions(new, paths, probes) == decisions(old, paths, probes)
    store.commit_batch(1, [], [], [], moved=[moved])
    new.committed(touched_paths((), [moved]))
    assert len(new) == 0 and new.owed == 0


def test_a_path_found_again_stays_in_memory_until_its_own_commit(tmp_path: Path) -> None:
    """A commit reported after the path was found changed again must not let the
    newer, pending entry go (the store does not know it yet)."""
    with StateStore(tmp_path / "state") as store:
        commit_rows(store, tmp_path, {0: ("crop", 10, 1, 7, "h1")})
        registry = Registry(StoredFiles(tmp_path / "state"))
        name = str(tmp_path / "p0.png")
        registry.set(name, "crop", Fingerprint(11, 2, 7), "h2")  # rewritten, handed on
        registry.sent([name])
        registry.set(name, "pending", Fingerprint(12, 3, 7), "h3")  # and rewritten again
        registry.committed([name])  # the first rewrite's commit is reported
        assert registry.get(name) == Entry("pending", Fingerprint(12, 3, 7), "h3")
        registry.mark(name, "crop")
        registry.sent([name])
        registry.committed([name])
        assert len(registry) == 0
        assert registry.get(name) == Entry("crop", Fingerprint(10, 1, 7), "h1")  # the store's
        registry.close()


def test_a_reported_commit_drops_what_a_scan_looked_up_before_it(tmp_path: Path) -> None:
    """Looked up ahead while the crop was in flight (no row yet), committed, then let
    go of: the registry must ask the database again, not answer "unknown"."""
    with StateStore(tmp_path / "state") as store:
        commit_rows(store, tmp_path, {})
        registry = Registry(StoredFiles(tmp_path / "state"))
        name = str(tmp_path / "p0.png")
        registry.set(name, "crop", Fingerprint(10, 1, 7), "h1")
        registry.sent([name])
        registry.prefetch([name])
        commit_rows(store, tmp_path, {0: ("crop", 10, 1, 7, "h1")})
        registry.committed([name])
        assert len(registry) == 0
        assert registry.get(name) == Entry("crop", Fingerprint(10, 1, 7), "h1")
        registry.close()


def test_every_lookup_is_an_indexed_search(tmp_path: Path) -> None:
    """No lookup scans a table: its cost must not grow with the season's crops."""
    StateStore(tmp_path).close()
    files = StoredFiles(tmp_path)
    try:
        plans = files.query_plans()
    finally:
        files.close()
    assert set(plans) == {"at", "at_many", "fingerprint", "content", "stat", "inode"}
    for name, details in plans.items():
        searches = [d for d in details if d.startswith(("SEARCH", "SCAN"))]
        assert len(searches) == 2, (name, details)  # crops and skipped
        assert all(d.startswith("SEARCH") and "USING INDEX" in d for d in searches), details


# --- through the daemon: memory drops to nothing once commits are reported -------------------


@pytest.fixture
def counting() -> Iterator[type[CountingEmbedder]]:
    CountingEmbedder.embedded = 0
    yield CountingEmbedder


def held(run: Running) -> Callable[[], bool]:
    """A condition: the running daemon's registry holds nothing in memory."""

    def empty() -> bool:
        pipeline = run.daemon.pipeline
        return pipeline is not None and pipeline.intake.registry_held() == 0

    return empty


def test_the_registry_holds_nothing_once_its_commits_are_reported(
    tmp_path: Path, counting: type[CountingEmbedder]
) -> None:
    watch = tmp_path / "W"
    reds = [png(watch / "f1" / f"r{i}.png", rgb) for i, rgb in enumerate(RED)]
    greens = [png(watch / "f2" / f"g{i}.png", rgb) for i, rgb in enumerate(GREEN)]
    config = config_for(tmp_path, watch)
    run = Running(config, CountingEmbedder(EmbedderOptions()))
    try:
        wait_for(lambda: len(rows(config)) == 6)
        wait_for(held(run))
        # A move: the old paths are vacated, then let go when the move is committed.
        os.rename(watch / "f2", watch / "moved")
        moved = {str(g).replace("/f2/", "/moved/") for g in greens}
        wait_for(lambda: moved <= {n for n, _ in rows(config)})
        wait_for(held(run))
        # A rewrite: pending, handed to the model, committed, let go.
        png(reds[0], BLUE[0])
        wait_for(lambda: counting.embedded == 7)
        wait_for(lambda: frozenset({str(reds[0])}) in partition(rows(config)))
        wait_for(held(run))
    finally:
        run.stop()
    counting.embedded = 0
    # A restart loads nothing: the start-up scan looks every file up in the database.
    run = Running(config, CountingEmbedder(EmbedderOptions()))
    try:
        wait_for(lambda: run.daemon.pipeline is not None and run.daemon.pipeline.intake.scans > 0)
        assert run.daemon.pipeline is not None
        assert run.daemon.pipeline.intake.registry_held() == 0
    finally:
        run.stop()
    assert counting.embedded == 0
    assert sorted(n for n, _ in rows(config)) == sorted([str(r) for r in reds] + sorted(moved))


class HeldEmbedder(CountingEmbedder):
    """Holds the first red crop in its decode (``preprocess``, pixels read) until released."""

    name = "colour-held"
    entered = threading.Event()
    release = threading.Event()
    held = False

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        cls = type(self)
        red, green, _ = image.convert("RGB").getpixel((0, 0))  # type: ignore[misc]
        if red > 150 and green < 100 and not cls.held:
            cls.held = True
            cls.entered.set()
            assert cls.release.wait(30), "never released"
        return super().preprocess(image)


def test_a_crop_rewritten_in_place_on_its_way_is_looked_at_once_handed_on(
    tmp_path: Path,
) -> None:
    """Its folder's mtime stays, so no rescan lists it again: the event that came
    while the crop was pending must bring it back once it is handed on."""
    watch = tmp_path / "W"
    a = png(watch / "f" / "a.png", RED[0])
    b = png(watch / "f" / "b.png", GREEN[0])
    age(a.parent)
    age(watch)
    HeldEmbedder.entered.clear()
    HeldEmbedder.release.clear()
    HeldEmbedder.held = False
    HeldEmbedder.embedded = 0
    config = config_for(tmp_path, watch)
    run = Running(config, HeldEmbedder(EmbedderOptions()))
    try:
        assert HeldEmbedder.entered.wait(30)
        intake = run.daemon.pipeline.intake if run.daemon.pipeline else None
        assert intake is not None
        wait_for(lambda: intake.backlog() == 2)  # a (held) and b, decoding
        png(a, GREEN[1])  # rewritten in place, its red pixels already read
        wait_for(lambda: intake.backlog() == 3)  # the event: a is to be looked at again
        HeldEmbedder.release.set()
        wait_for(lambda: HeldEmbedder.embedded == 3)  # a (red), b, a again (green)
        wait_for(lambda: partition(rows(config)) == {frozenset({str(a), str(b)})})
    finally:
        HeldEmbedder.release.set()
        run.stop()


# --- rescans skip unchanged directories ---------------------------------------------------


class CountingLister:
    """``scan_tree``'s listing seam: lists for real and records which directories."""

    def __init__(self) -> None:
        self.listed: list[Path] = []

    def __call__(self, directory: Path) -> list[os.DirEntry[str]]:
        self.listed.append(directory)
        return list_sorted(directory)


HOUR_NS = 3600 * 10**9


def age(path: Path, ns: int = HOUR_NS) -> None:
    """Set a file's or directory's mtime ``ns`` into the past (an old folder)."""
    t = time.time_ns() - ns
    os.utime(path, ns=(t, t))


def walk(root: Path, dirs: DirMtimes, *, full: bool = False) -> tuple[list[FileSeen], list[Path]]:
    lister = CountingLister()
    dirs.begin(full=full)
    found = list(scan_tree(root, dirs=dirs, listdir=lister))
    return found, lister.listed


def old_tree(root: Path, folders: int) -> list[Path]:
    """``folders`` frame folders of one crop each (``<frame>/crops/x.png``), all old."""
    crops = [png(root / f"frame{i:03d}" / "crops" / "x.png", RED[0]) for i in range(folders)]
    for crop in crops:
        age(crop.parent)
        age(crop.parent.parent)
    age(root)
    return crops


def test_a_rescan_lists_only_new_and_changed_directories(tmp_path: Path) -> None:
    root = tmp_path / "W"
    crops = old_tree(root, 20)
    dirs = DirMtimes()
    found, listed = walk(root, dirs)
    assert sorted(f.path for f in found) == crops
    assert len(listed) == 41 and len(dirs) == 41  # the root, 20 frames, 20 crops folders

    found, listed = walk(root, dirs)  # nothing changed: nothing listed, nothing found
    assert (found, listed) == ([], [])
    assert dirs.unchanged == 41

    new = png(root / "frame999" / "crops" / "x.png", GREEN[0])  # a new folder
    added = png(root / "frame005" / "crops" / "y.png", GREEN[1])  # a file in an old one
    found, listed = walk(root, dirs)
    assert sorted(f.path for f in found) == sorted([new, crops[5], added])
    assert sorted(listed) == sorted([root, root / "frame999", new.parent, added.parent])

    shutil.rmtree(root / "frame007")  # a folder removed: forgotten with its sub-folder
    for folder in (root, root / "frame999", new.parent, added.parent):
        age(folder)
    walk(root, dirs)
    assert root / "frame007" not in dirs and root / "frame007" / "crops" not in dirs
    assert root / "frame999" in dirs and len(dirs) == 41  # 2 came, 2 went


def test_a_directory_changed_just_now_is_listed_again(tmp_path: Path) -> None:
    """A directory modified within RACY_S of its stat could change again with the
    same mtime (coarse timestamps): it is not trusted until it is older."""
    root = tmp_path / "W"
    old_tree(root, 2)
    fresh = png(root / "frame000" / "crops" / "y.png", GREEN[0]).parent
    dirs = DirMtimes()
    walk(root, dirs)
    _, listed = walk(root, dirs)
    assert listed == [fresh]
    age(fresh)
    walk(root, dirs)
    assert walk(root, dirs)[1] == []


def test_a_rewrite_in_place_is_left_to_events_and_the_full_scan(tmp_path: Path) -> None:
    root = tmp_path / "W"
    crops = old_tree(root, 3)
    dirs = DirMtimes()
    walk(root, dirs)
    png(crops[1], BLUE[0], (30, 30))  # rewritten in place: its folder's mtime stays
    assert walk(root, dirs)[0] == []
    found, listed = walk(root, dirs, full=True)  # at start, or after lost events
    assert crops[1] in [f.path for f in found] and len(listed) == 7


def test_a_forgotten_directory_is_listed_at_the_next_rescan(tmp_path: Path) -> None:
    root = tmp_path / "W"
    crops = old_tree(root, 3)
    dirs = DirMtimes()
    walk(root, dirs)
    dirs.forget(crops[2].parent)  # a file there could not be read: look again
    found, listed = walk(root, dirs)
    assert listed == [crops[2].parent] and [f.path for f in found] == [crops[2]]


def test_an_unfinished_walk_leaves_what_the_last_one_saw(tmp_path: Path) -> None:
    root = tmp_path / "W"
    old_tree(root, 3)
    dirs = DirMtimes()
    walk(root, dirs)
    dirs.begin(full=True)
    next(iter(scan_tree(root, dirs=dirs)))  # abandoned after one file
    assert walk(root, dirs)[1] == []


# --- through the daemon: a rescan finds a new folder among old ones ---------------------------


def deaf(mode: WatchMode, poll_interval_s: float) -> BaseObserver:
    return DeafObserver()


def test_the_daemons_rescan_lists_changed_folders_only_and_finds_new_files(
    tmp_path: Path, counting: type[CountingEmbedder]
) -> None:
    out = io.StringIO()
    configure_logging("json", "debug", out, environ={})
    watch = tmp_path / "W"
    old_tree(watch, 30)
    config = config_for(tmp_path, watch)
    daemon = Daemon(config, embedder=CountingEmbedder(EmbedderOptions()), observer_factory=deaf)
    runner = threading.Thread(target=daemon.run)
    runner.start()
    try:
        wait_for(lambda: len(rows(config)) == 30)
        new = png(watch / "frame999" / "crops" / "x.png", GREEN[0])
        wait_for(lambda: len(rows(config)) == 31, timeout_s=30)
    finally:
        daemon.request_stop()
        runner.join(60)
    assert not runner.is_alive()
    assert str(new) in {n for n, _ in rows(config)}
    scans = named(out, "rescanned")
    assert scans[0]["full"] is True and scans[0]["dirs_listed"] == 61
    periodic = [s for s in scans[1:] if not s["full"]]
    finding = [s for s in periodic if s["new_files"] == 1]
    assert finding and finding[0]["dirs_listed"] == 3  # the root, frame999, its crops
    # Every rescan visits every folder, and lists only those new or changed.
    assert all(s["dirs_listed"] <= 3 for s in periodic)
    assert all(s["dirs_listed"] + s["dirs_unchanged"] >= 61 for s in periodic)


# --- the benchmark script, small, so that it does not rot ---------------------------------------


@pytest.mark.slow
def test_bench_registry_script_runs_and_its_figures_agree(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    args = ["--crops", "3000", "--frames", "60", "--per-frame", "3", "--work", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_registry.py"), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    [after] = figures["registry"]
    assert (after["variant"], after["crops"], after["held"]) == ("after", 3000, 0)
    rescan = figures["rescan"]
    assert rescan["full_files"] == 180 and rescan["incremental_files"] == 3
    # The root, the new night and frame folders and its crops folder; the rest unchanged.
    assert rescan["dirs_listed"] == 4
    assert rescan["dirs_listed"] + rescan["dirs_unchanged"] == 1 + 1 + 2 * 60 + 3
    [scan] = figures["first_scan"]
    assert scan["files"] == 183 and scan["held"] == 0
