"""A crop's identity across moves, renames and rewrites (issue 9, cases 1-3).

Unit tests of :mod:`crop_clusterd.identity` and the state database's schema 2,
then each case through the live daemon (real observer, real state folder, the
colour fake as model) and across a restart.
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fakes import BLUE, GREEN, RED, ColourEmbedder
from PIL import Image
from test_notify import named
from test_supervisor import CountingEmbedder, make_config, partition, wait_for

from crop_clusterd.config import Config
from crop_clusterd.csvfiles import read_clusters_csv
from crop_clusterd.embed import EmbedderOptions
from crop_clusterd.identity import Fingerprint, Registry, content_hash
from crop_clusterd.log import configure_logging
from crop_clusterd.store import StateError, StateStore
from crop_clusterd.storeschema import SCHEMA_VERSION
from crop_clusterd.supervisor import Daemon

pytestmark = pytest.mark.usefixtures("restore_logging")

# The two frames of case 2: 8 + 9 crops of the seed example.
FRAMES = ("20230908001617-00-06", "20230908001619-00-06")


# --- helpers ---------------------------------------------------------------------------


@pytest.fixture
def log_lines() -> io.StringIO:
    """The daemon's log as JSON lines."""
    out = io.StringIO()
    configure_logging("json", "debug", out, environ={})
    return out


def png(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (12, 10)) -> Path:
    """An uncompressed solid PNG: its byte size depends only on its pixel size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path, compress_level=0)
    return path


def seed_frames(seed_crops: list[Path], watch: Path) -> set[str]:
    """Case 2's layout: ``W/<frame>/crops/`` for two frames of the seed example (17 crops)."""
    out: set[str] = set()
    for frame in FRAMES:
        for crop in seed_crops:
            if f"crop_{frame}_" in crop.name:
                dest = watch / frame / "crops" / crop.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(crop, dest)
                out.add(str(dest))
    return out


def config_for(tmp: Path, watch: Path) -> Config:
    """The supervisor tests' config with quick decode retries."""
    c = make_config(tmp, watch)
    return dataclasses.replace(
        c, watch=dataclasses.replace(c.watch, decode_retries=1, retry_backoff_s=0.1)
    )


def rows(config: Config) -> list[tuple[str, int]]:
    path = config.output.folder / "clusters.csv"
    return read_clusters_csv(path) if path.exists() else []


def error_names(config: Config) -> list[str]:
    path = config.output.folder / "errors.csv"
    if not path.exists():
        return []
    return [line.split(",")[0] for line in path.read_text().splitlines()[1:]]


class Running:
    """A daemon on a thread, stopped (and its error re-raised) by ``stop``."""

    def __init__(self, config: Config, embedder: ColourEmbedder | None = None) -> None:
        self.daemon = Daemon(config, embedder=embedder or ColourEmbedder(EmbedderOptions()))
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="test-daemon")
        self.thread.start()

    def _run(self) -> None:
        try:
            self.daemon.run()
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self.daemon.request_stop("test")
        self.thread.join(60)
        assert not self.thread.is_alive()
        assert self.error is None, self.error


@pytest.fixture
def counting() -> Iterator[type[CountingEmbedder]]:
    CountingEmbedder.embedded = 0
    yield CountingEmbedder


def run_until_idle(config: Config) -> None:
    Daemon(config, embedder=CountingEmbedder(EmbedderOptions()), exit_when_idle_s=1.0).run()


# --- identity and registry --------------------------------------------------------------


def test_a_rename_is_found_by_inode_and_a_copy_is_not_a_move(tmp_path: Path) -> None:
    a = png(tmp_path / "a.png", RED[0])
    fp = Fingerprint.of(os.lstat(a))
    registry = Registry()
    registry.set(str(a), "crop", fp, content_hash(a))
    b = tmp_path / "b.png"
    shutil.copy2(a, b)  # a copy beside the original: new crop
    assert registry.moved_from(Fingerprint.of(os.lstat(b)), content_hash(b)) is None
    os.rename(a, tmp_path / "c.png")  # a rename: same inode, size, mtime
    c_fp = Fingerprint.of(os.lstat(tmp_path / "c.png"))
    assert registry.moved_from(c_fp, None) == str(a)
    # The copy's bytes match too once the original is gone (copy-and-delete).
    assert registry.moved_from(Fingerprint.of(os.lstat(b)), content_hash(b)) == str(a)
    registry.forget(str(a))
    assert registry.moved_from(c_fp, content_hash(tmp_path / "c.png")) is None


def test_same_size_other_pixels_is_another_content(tmp_path: Path) -> None:
    a = png(tmp_path / "a.png", RED[0])
    before = content_hash(a), os.path.getsize(a)
    png(a, GREEN[0])
    assert os.path.getsize(a) == before[1]
    assert content_hash(a) != before[0]


V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE crops (
    seq INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, size INTEGER, mtime_ns INTEGER,
    frame TEXT, crop_index INTEGER, time REAL, cx REAL, cy REAL, batch INTEGER NOT NULL,
    cluster INTEGER NOT NULL, added REAL NOT NULL, vector BLOB NOT NULL);
CREATE INDEX crops_added ON crops(added);
CREATE TABLE merges (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL,
    batch INTEGER NOT NULL, from_cluster INTEGER NOT NULL, into_cluster INTEGER NOT NULL);
CREATE TABLE skipped (path TEXT PRIMARY KEY, reason TEXT NOT NULL, size INTEGER,
    mtime_ns INTEGER, at REAL NOT NULL);
CREATE TABLE runtime (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema', '1');
"""


def downgrade_to_v1(state: Path) -> None:
    """Rewrite a state database in the version 1 layout (as the previous release wrote it)."""
    db = state / "state.sqlite3"
    old = state / "v2.sqlite3"
    con = sqlite3.connect(db)
    con.execute("VACUUM INTO ?", (str(old),))  # a copy with the WAL folded in
    con.close()
    for suffix in ("", "-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    con = sqlite3.connect(db)
    con.executescript(V1_SCHEMA)
    con.execute("ATTACH DATABASE ? AS v2", (str(old),))
    con.executescript(
        "INSERT INTO crops SELECT seq, path, size, mtime_ns, frame, crop_index, time, cx, cy, "
        "batch, cluster, added, vector FROM v2.crops;"
        "INSERT INTO merges SELECT id, at, batch, from_cluster, into_cluster FROM v2.merges;"
        "INSERT INTO skipped SELECT path, reason, size, mtime_ns, at FROM v2.skipped;"
        "INSERT INTO meta SELECT * FROM v2.meta WHERE key != 'schema';"
    )
    con.commit()
    con.close()
    old.unlink()


def test_a_version_1_state_is_migrated_in_place_and_resumes(
    tmp_path: Path, seed_crops: list[Path], counting: type[CountingEmbedder]
) -> None:
    watch = tmp_path / "W"
    names = seed_frames(seed_crops, watch)
    config = config_for(tmp_path, watch)
    run_until_idle(config)
    before = partition(rows(config))
    downgrade_to_v1(config.state.folder)
    counting.embedded = 0
    # Moved while the old release was in charge: its rows have no hash, the inode tells.
    (watch / "2023-09-08").mkdir()
    for frame in FRAMES:
        os.rename(watch / frame, watch / "2023-09-08" / frame)
    run_until_idle(config)
    assert counting.embedded == 0
    moved = {n.replace(str(watch), str(watch / "2023-09-08")) for n in names}
    assert sorted(n for n, _ in rows(config)) == sorted(moved)
    renamed = {
        frozenset(n.replace(str(watch), str(watch / "2023-09-08")) for n in g) for g in before
    }
    assert partition(rows(config)) == renamed
    with StateStore(config.state.folder) as store:
        assert store.get_meta("schema") == str(SCHEMA_VERSION)


def test_a_newer_schema_is_refused_with_its_version(tmp_path: Path) -> None:
    StateStore(tmp_path).close()
    con = sqlite3.connect(tmp_path / "state.sqlite3")
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    con.commit()
    con.close()
    with pytest.raises(StateError, match="schema version 99"):
        StateStore(tmp_path)


# --- case 1: once bad, later good ---------------------------------------------------------


def replace_like_rsync(target: Path, data: bytes) -> None:
    """What rsync does: write ``.name.XXXXXX`` beside the target and rename it over."""
    temp = target.parent / f".{target.name}.Ab12Cd"
    temp.write_bytes(data)
    os.replace(temp, target)


def test_a_truncated_crop_completed_later_is_clustered_once_live(
    tmp_path: Path, seed_crops: list[Path]
) -> None:
    watch = tmp_path / "W"
    names = seed_frames(seed_crops, watch)
    config = config_for(tmp_path, watch)
    good = seed_crops[-1]
    target = watch / "late" / "crops" / good.name
    target.parent.mkdir(parents=True)
    data = good.read_bytes()
    run = Running(config)
    try:
        wait_for(lambda: len(rows(config)) == len(names))
        target.write_bytes(data[: len(data) // 3])  # an interrupted rsync --partial
        wait_for(lambda: error_names(config) == [str(target)])
        replace_like_rsync(target, data)
        wait_for(lambda: len(rows(config)) == len(names) + 1)
        wait_for(lambda: error_names(config) == [])
    finally:
        run.stop()
    listed = [n for n, _ in rows(config)]
    assert sorted(listed) == sorted(names | {str(target)})


def test_a_skipped_file_replaced_while_stopped_is_clustered_at_start(
    tmp_path: Path, seed_crops: list[Path], counting: type[CountingEmbedder]
) -> None:
    watch = tmp_path / "W"
    good = seed_crops[0]
    target = watch / "f" / "crops" / good.name
    target.parent.mkdir(parents=True)
    data = good.read_bytes()
    target.write_bytes(data[:100])
    config = config_for(tmp_path, watch)
    run_until_idle(config)
    assert error_names(config) == [str(target)] and rows(config) == []
    # Same size as the bad one: the mtime and inode tell it changed.
    bad_again = b"\x89PNG\r\n\x1a\n" + bytes(92)
    replace_like_rsync(target, bad_again)
    run_until_idle(config)
    assert error_names(config) == [str(target)] and rows(config) == []
    replace_like_rsync(target, data)
    counting.embedded = 0
    run_until_idle(config)
    assert counting.embedded == 1
    assert [n for n, _ in rows(config)] == [str(target)]
    assert error_names(config) == []


# --- case 2: moved after clustering ---------------------------------------------------------


def test_frames_moved_into_a_folder_keep_their_rows_and_clusters_live(
    tmp_path: Path, seed_crops: list[Path], counting: type[CountingEmbedder], log_lines: io.StringIO
) -> None:
    watch = tmp_path / "W"
    names = seed_frames(seed_crops, watch)
    assert len(names) == 17
    config = config_for(tmp_path, watch)
    run = Running(config, CountingEmbedder(EmbedderOptions()))
    try:
        wait_for(lambda: len(rows(config)) == 17)
        before = partition(rows(config))
        counting.embedded = 0
        # mkdir W/2023-09-08 && mv W/2023090800* W/2023-09-08/
        (watch / "2023-09-08").mkdir()
        for frame in FRAMES:
            shutil.move(watch / frame, watch / "2023-09-08" / frame)
        moved = {n.replace(str(watch), str(watch / "2023-09-08")) for n in names}
        wait_for(lambda: {n for n, _ in rows(config)} == moved)
        # A second pattern: one crop file renamed in place.
        one = sorted(moved)[0]
        renamed = one.replace(".png", "_checked.png")
        os.rename(one, renamed)
        moved = (moved - {one}) | {renamed}
        wait_for(lambda: {n for n, _ in rows(config)} == moved)
    finally:
        run.stop()
    assert counting.embedded == 0
    listed = rows(config)
    assert len(listed) == 17
    expected = {
        frozenset(
            renamed if m == one else m
            for m in (n.replace(str(watch), str(watch / "2023-09-08")) for n in g)
        )
        for g in before
    }
    assert partition(listed) == expected
    assert len(named(log_lines, "crop_moved")) == 18


def test_a_copy_beside_the_original_is_a_new_crop(
    tmp_path: Path, counting: type[CountingEmbedder]
) -> None:
    watch = tmp_path / "W"
    a = png(watch / "f" / "a.png", RED[0])
    config = config_for(tmp_path, watch)
    run_until_idle(config)
    shutil.copy2(a, watch / "f" / "b.png")
    counting.embedded = 0
    run_until_idle(config)
    assert counting.embedded == 1
    assert sorted(n for n, _ in rows(config)) == [str(a), str(watch / "f" / "b.png")]


# --- case 3: rewritten in place ---------------------------------------------------------------


def test_crops_rewritten_with_other_pixels_are_embedded_again_and_reassigned(
    tmp_path: Path, counting: type[CountingEmbedder], log_lines: io.StringIO
) -> None:
    watch = tmp_path / "W"
    reds = [png(watch / "f1" / f"r{i}.png", rgb) for i, rgb in enumerate(RED)]
    greens = [png(watch / "f2" / f"g{i}.png", rgb) for i, rgb in enumerate(GREEN)]
    config = config_for(tmp_path, watch)
    run = Running(config, CountingEmbedder(EmbedderOptions()))
    try:
        wait_for(lambda: len(rows(config)) == 6)
        counting.embedded = 0
        # Same names, same byte size (uncompressed, same pixel size), other pixels.
        sizes = [r.stat().st_size for r in reds[:2]]
        for r in reds[:2]:
            png(r, BLUE[0])
        assert [r.stat().st_size for r in reds[:2]] == sizes
        wait_for(lambda: counting.embedded == 2)
        blue = {str(r) for r in reds[:2]}
        wait_for(lambda: frozenset(blue) in partition(rows(config)))
    finally:
        run.stop()
    listed = rows(config)
    assert sorted(n for n, _ in listed) == sorted(str(p) for p in reds + greens)
    assert partition(listed) == {
        frozenset(blue),
        frozenset({str(reds[2])}),
        frozenset(str(g) for g in greens),
    }
    assert {e["file"] for e in named(log_lines, "crop_rewritten")} == blue
    # Across a restart nothing is embedded again and the result stands.
    counting.embedded = 0
    run_until_idle(config)
    assert counting.embedded == 0
    assert partition(rows(config)) == partition(listed)
    with StateStore(config.state.folder, readonly=True) as store:
        assert store.counts().crops == 6
        assert len(store.retired_seqs()) == 2


def test_a_crop_rewritten_while_stopped_is_embedded_again_at_start(
    tmp_path: Path, counting: type[CountingEmbedder], log_lines: io.StringIO
) -> None:
    watch = tmp_path / "W"
    a = png(watch / "f" / "a.png", RED[0])
    b = png(watch / "f" / "b.png", RED[1])
    config = config_for(tmp_path, watch)
    run_until_idle(config)
    assert len(partition(rows(config))) == 1
    png(a, GREEN[0])
    counting.embedded = 0
    run_until_idle(config)
    assert counting.embedded == 1
    assert partition(rows(config)) == {frozenset({str(a)}), frozenset({str(b)})}
    assert [e["file"] for e in named(log_lines, "crop_rewritten")] == [str(a)]
    # Touched without a change of bytes: the stat is refreshed, nothing embedded.
    os.utime(b, ns=(1_000_000_000, 1_000_000_000))
    counting.embedded = 0
    run_until_idle(config)
    assert counting.embedded == 0
    assert len(rows(config)) == 2


def test_track_moves_and_rewrites_across_restarts(
    tmp_path: Path, seed_crops: list[Path], counting: type[CountingEmbedder]
) -> None:
    """``track`` (frame by frame; restores from its checkpoint and the batches after
    it): a moved frame keeps its tracks, rewritten crops are embedded again, and the
    restore over retired rows still reproduces the stored ids at the next start."""
    watch = tmp_path / "W"
    names = seed_frames(seed_crops, watch)
    config = dataclasses.replace(
        config_for(tmp_path, watch),
        link=dataclasses.replace(make_config(tmp_path, watch, "track").link),
    )
    run_until_idle(config)
    before = partition(rows(config))
    assert len(rows(config)) == 17
    os.rename(watch / FRAMES[0], watch / "moved")
    moved = {n.replace(f"/W/{FRAMES[0]}/", "/W/moved/") for n in names}
    rewritten = sorted(p for p in (watch / "moved" / "crops").iterdir())[:3]
    for p in rewritten:
        png(p, BLUE[0], (30, 30))
    counting.embedded = 0
    run_until_idle(config)
    assert counting.embedded == 3
    listed = rows(config)
    assert sorted(n for n, _ in listed) == sorted(moved)
    # The crops neither moved-and-rewritten keep their tracks.
    kept = {frozenset(n.replace(f"/W/{FRAMES[0]}/", "/W/moved/") for n in g) for g in before}
    untouched = {str(p) for p in rewritten}
    now = partition(listed)
    assert {g - untouched for g in now if g - untouched} == {
        g - untouched for g in kept if g - untouched
    }
    counting.embedded = 0
    run_until_idle(config)  # the replay of the stored batches must still match
    assert counting.embedded == 0
    assert partition(rows(config)) == now


def cluster_of(config: Config, path: Path) -> int:
    return dict(rows(config))[str(path)]


def test_a_rewritten_crops_old_embedding_stops_linking_live_and_after_restart(
    tmp_path: Path,
) -> None:
    """Cluster ids are the smallest member's seq: a new red crop joining seq 0's
    cluster would show that the retired red embedding of ``a`` still links."""
    watch = tmp_path / "W"
    a = png(watch / "f" / "a.png", RED[0])
    config = config_for(tmp_path, watch)
    run = Running(config)
    try:
        wait_for(lambda: len(rows(config)) == 1)
        assert cluster_of(config, a) == 0
        png(a, BLUE[0])
        wait_for(lambda: cluster_of(config, a) == 1)  # seq 1: its new row
        b = png(watch / "f" / "b.png", RED[1])
        wait_for(lambda: len(rows(config)) == 2)
        assert cluster_of(config, b) == 2  # not 0: the old red `a` is retired
    finally:
        run.stop()
    c = png(watch / "f" / "c.png", RED[2])
    run_until_idle(config)
    assert partition(rows(config)) == {frozenset({str(a)}), frozenset({str(b), str(c)})}
    assert cluster_of(config, c) == 2


@pytest.mark.parametrize("brute_force_below", [4096, 1])
def test_linker_retire_refuses_pairs_also_where_an_index_holds_the_old_vector(
    brute_force_below: int,
) -> None:
    """With ``brute_force_below=1`` the HNSW index (its own copy of the vectors)
    proposes the pair; the retired crop must still not link."""
    from crop_clusterd.linking import LinkBatch
    from crop_clusterd.linking.base import HnswParams
    from crop_clusterd.linking.cosine import CosineLinker

    rng = np.random.default_rng(0)
    base = rng.normal(size=(40, 16)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    linker = CosineLinker(0.9, hnsw=HnswParams(brute_force_below=brute_force_below, threads=1))
    linker.add(LinkBatch.from_embeddings(base.copy()))  # adopted: retire() zeroes its rows
    linker.retire(np.array([3]))
    again = linker.add(LinkBatch.from_embeddings(base[3:4].copy()))  # the old crop's twin
    assert linker.cluster_of(np.array(again.seqs))[0] == again.seqs.start
    twin = linker.add(LinkBatch.from_embeddings(base[5:6].copy()))  # others still link
    assert linker.cluster_of(np.array(twin.seqs))[0] == linker.cluster_of(np.array([5]))[0]
    with pytest.raises(IndexError):
        linker.retire(np.array([10_000]))


def test_store_moves_retires_and_vacates_in_one_commit(tmp_path: Path) -> None:
    """The state database's side: a skip row goes when its path gets a crop, a
    move keeps the seq, a rewrite retires the live row, and a row moved without a
    stat (moved and rewritten, new content not yet committed) is looked at again."""
    from crop_clusterd.records import CommittedCrop, Crop, DecodeFailure, Embedded, Moved

    def crop(name: str, seq: int, content: str) -> CommittedCrop:
        c = Crop(Path(name), name, size=10, mtime_ns=5, inode=seq + 100, content=content)
        return CommittedCrop(Embedded(c, np.full(4, 0.5, dtype=np.float32)), seq, seq)

    with StateStore(tmp_path) as store:
        store.commit_batch(0, [crop("/w/a.png", 0, "h0")], [], [DecodeFailure("/w/b.png", "bad")])
        store.commit_batch(1, [crop("/w/b.png", 1, "h1")], [], [])
        assert [s.path for s in store.load_skipped()] == []
        store.commit_batch(
            2, [], [], [], moved=[Moved("/w/a.png", "/w/x/a.png", "crop", 10, 6, 100, "h0")]
        )
        store.commit_batch(3, [crop("/w/b.png", 2, "h2")], [], [])
        assert store.retired_seqs() == frozenset({1})
        assert store.paths_version() == 2
        store.commit_batch(
            4, [], [], [], moved=[Moved("/w/x/a.png", "/w/y.png", "crop", None, None, None, None)]
        )
        got = {path: (kind, fp, content) for path, kind, fp, content in store.registry_rows()}
        assert got == {
            "/w/y.png": ("crop", None, "h0"),
            "/w/b.png": ("crop", Fingerprint(10, 5, 102), "h2"),
        }
        assert store.load_crops().paths == ("/w/y.png", "/w/b.png", "/w/b.png")
        assert store.counts().crops == 2
