"""Tests for the snapshot writer: files agree with the state store, atomically."""

from __future__ import annotations

import csv
import errno
import os
import shutil
import threading
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt
import pytest
from structlog.testing import capture_logs

from crop_clusterd.activity import ACTIVITY_CSV, ACTIVITY_PNG
from crop_clusterd.atomic import atomic_write
from crop_clusterd.clusterdirs import CLUSTER_DIRS, DEDUP_DIRS, NOT_CLUSTERED
from crop_clusterd.config import OutputConfig
from crop_clusterd.csvfiles import CLUSTERS_CSV, ERRORS_CSV, MERGES_CSV, read_clusters_csv
from crop_clusterd.embfile import EMBEDDINGS_PKL, load_embeddings_pickle
from crop_clusterd.embparts import EMBEDDINGS_DIR, read_parts
from crop_clusterd.gallery import GALLERY_DIR, INDEX_HTML
from crop_clusterd.records import (
    Assignment,
    CommittedCrop,
    Crop,
    DecodeFailure,
    Embedded,
    Merge,
    Skipped,
)
from crop_clusterd.snapshot import OutputFiles, SnapshotError, SnapshotWriter
from crop_clusterd.store import (
    StateError,
    StateStore,
    current_clusters,
)

DIM = 8
T0 = 1_700_000_000.0


def unit_vectors(rng: np.random.Generator, n: int) -> npt.NDArray[np.float32]:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    unit: npt.NDArray[np.float32] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return unit


class Builder:
    """Commits micro-batches to a real store, remembering what it committed."""

    def __init__(self, folder: Path, src: Path | None = None, seed: int = 0) -> None:
        self.store = StateStore(folder)
        self.src = src
        self.rng = np.random.default_rng(seed)
        self.names: list[str] = []
        self.vectors: list[npt.NDArray[np.float32]] = []
        self.batch = 0

    def name(self, seq: int) -> str:
        if self.src is None:
            return f"frame{seq // 3}/crops/crop_{seq}.png"
        path = self.src / f"crop_{seq}.png"
        path.write_bytes(f"image {seq}".encode())
        return str(path)

    def commit(
        self,
        clusters: Sequence[int],
        merges: Sequence[Merge] = (),
        skipped: Sequence[str] = (),
        *,
        at: float | None = None,
    ) -> None:
        start = len(self.names)
        vectors = unit_vectors(self.rng, len(clusters))
        crops = []
        for i, cluster in enumerate(clusters):
            seq = start + i
            name = self.name(seq)
            crops.append(
                CommittedCrop(Embedded(Crop(path=Path(name), name=name), vectors[i]), seq, cluster)
            )
            self.names.append(name)
            self.vectors.append(vectors[i])
        skips = [DecodeFailure(p, "truncated image") for p in skipped]
        self.store.commit_batch(
            self.batch, crops, merges, skips, now=T0 + self.batch if at is None else at
        )
        self.batch += 1


def output(tmp_path: Path, **kw: bool) -> OutputConfig:
    return replace(OutputConfig(), folder=tmp_path / "out", **kw)


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


@pytest.fixture
def built(tmp_path: Path) -> Builder:
    b = Builder(tmp_path / "state")
    b.commit([0, 0, 2, 3])
    # seq 4 joins cluster 2; seq 5 joins 0 and 3, so 3 is merged into 0.
    b.commit([2, 0], [Merge(3, 0)], ["frame9/crops/bad.png"])
    return b


def test_snapshot_files_match_the_store(tmp_path: Path, built: Builder) -> None:
    writer = SnapshotWriter(tmp_path / "state", output(tmp_path))
    report = writer.write(now=T0 + 10)
    out = tmp_path / "out"

    expected = [0, 0, 2, 0, 2, 0]
    assert read_clusters_csv(out / "clusters.csv") == list(zip(built.names, expected, strict=True))
    stored = built.store.load_cluster_column()
    merges = [m.merge for m in built.store.load_merges()]
    assert current_clusters(stored, merges).tolist() == expected

    # write() is the final snapshot at daemon stop: it writes embeddings.pkl too.
    emb = load_embeddings_pickle(out / "embeddings.pkl")
    assert emb.names == tuple(built.names)
    np.testing.assert_allclose(emb.embeddings, np.stack(built.vectors), atol=1e-6)
    parts = read_parts(out / EMBEDDINGS_DIR)
    assert parts.names == tuple(built.names) and parts.locals.tolist() == list(range(6))
    np.testing.assert_array_equal(parts.vectors, np.stack(built.vectors))

    rows = read_csv(out / MERGES_CSV)
    assert rows[0] == ["time", "from", "into"]
    assert [r[1:] for r in rows[1:]] == [["3", "0"]]
    assert rows[1][0].startswith("2023-11-14T22:13:21")  # T0 + 1 (batch 1) in UTC
    assert read_csv(out / "errors.csv") == [
        ["filename", "reason"],
        ["frame9/crops/bad.png", "truncated image"],
    ]
    assert (report.crops, report.clusters, report.merges, report.skipped) == (6, 2, 1, 1)
    assert report.at == T0 + 10
    assert report.seconds >= 0
    # No temporary files left behind, and no folders when they are not asked for.
    assert sorted(p.name for p in out.iterdir()) == [
        ACTIVITY_CSV,
        ACTIVITY_PNG,
        "clusters.csv",
        EMBEDDINGS_DIR,
        "embeddings.pkl",
        "errors.csv",
        GALLERY_DIR,
        INDEX_HTML,
        "merges.csv",
    ]


def test_incremental_snapshots_follow_new_commits(tmp_path: Path, built: Builder) -> None:
    writer = SnapshotWriter(tmp_path / "state", output(tmp_path, save_embeddings=False))
    assert writer.write_if_changed(now=T0) is not None
    built.commit([6, 6, 8])
    # seq 9 joins 2 and 6 (6 into 2), then seq 10 joins 0 and 2 (2 into 0).
    built.commit([2, 0], [Merge(6, 2), Merge(2, 0)])
    report = writer.write_if_changed(now=T0 + 20)

    assert report is not None
    assert (report.crops, report.clusters, report.merges) == (11, 2, 3)
    got = read_clusters_csv(tmp_path / "out" / "clusters.csv")
    assert [c for _, c in got] == [0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0]
    assert [n for n, _ in got] == built.names
    assert [r[1:] for r in read_csv(tmp_path / "out" / MERGES_CSV)[1:]] == [
        ["3", "0"],
        ["6", "2"],
        ["2", "0"],
    ]
    assert not (tmp_path / "out" / "embeddings.pkl").exists()
    assert not (tmp_path / "out" / EMBEDDINGS_DIR).exists()


def test_no_write_when_nothing_changed(tmp_path: Path, built: Builder) -> None:
    files = CountingFiles()
    writer = SnapshotWriter(tmp_path / "state", output(tmp_path), files=files)
    assert writer.write_if_changed(now=T0) is not None
    # A part of the new embeddings, merges.csv, errors.csv, clusters.csv; no pickle.
    assert files.calls == ["part", "merges", "errors", "clusters"]
    assert writer.write_if_changed(now=T0 + 1) is None
    assert len(files.calls) == 4

    # A newly skipped file alone is a change: errors.csv must list it (no new part).
    built.commit([], skipped=["frame9/crops/other.png"])
    report = writer.write_if_changed(now=T0 + 2)
    assert report is not None and report.skipped == 2
    assert len(read_csv(tmp_path / "out" / "errors.csv")) == 3
    assert files.calls[4:] == ["merges", "errors", "clusters"]
    # write() always writes (shutdown), even with nothing new, and adds the pickle.
    writer.write(now=T0 + 3)
    assert files.calls[7:] == ["embeddings", "merges", "errors", "clusters"]


def test_waits_for_the_database_to_appear(tmp_path: Path) -> None:
    writer = SnapshotWriter(tmp_path / "state", output(tmp_path))
    assert writer.write_if_changed(now=T0) is None
    with pytest.raises(StateError, match="no state database"):
        writer.write(now=T0)
    assert not (tmp_path / "out").exists()

    b = Builder(tmp_path / "state")
    report = writer.write_if_changed(now=T0)  # an empty state is still a first snapshot
    assert report is not None and report.crops == 0
    assert read_clusters_csv(tmp_path / "out" / "clusters.csv") == []
    b.commit([0, 0])
    assert writer.write_if_changed(now=T0) is not None
    assert read_parts(tmp_path / "out" / EMBEDDINGS_DIR).names == tuple(b.names)


def test_a_replaced_database_is_read_from_scratch(tmp_path: Path, built: Builder) -> None:
    writer = SnapshotWriter(tmp_path / "state", output(tmp_path))
    writer.write(now=T0)
    built.store.close()
    shutil.rmtree(tmp_path / "state")
    fresh = Builder(tmp_path / "state", seed=1)
    fresh.commit([0, 1, 1])

    with capture_logs() as logs:
        report = writer.write_if_changed(now=T0 + 5)
    assert report is not None and report.crops == 3
    got = read_clusters_csv(tmp_path / "out" / "clusters.csv")
    assert [c for _, c in got] == [0, 1, 1]
    # The old database's parts reach past the new one's crops: they are rewritten,
    # and its pickle (of crops this database does not have) is withdrawn.
    assert any(e["event"] == "embedding_parts_reset" for e in logs)
    parts = read_parts(tmp_path / "out" / EMBEDDINGS_DIR)
    np.testing.assert_array_equal(parts.vectors, np.stack(fresh.vectors))
    assert not (tmp_path / "out" / "embeddings.pkl").exists()
    assert read_csv(tmp_path / "out" / MERGES_CSV) == [["time", "from", "into"]]
    writer.write(now=T0 + 6)
    emb = load_embeddings_pickle(tmp_path / "out" / "embeddings.pkl")
    np.testing.assert_allclose(emb.embeddings, np.stack(fresh.vectors), atol=1e-6)


class CountingFiles(OutputFiles):
    """Records which files are written, in order."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def embeddings(
        self, path: Path, names: Sequence[str], vectors: npt.NDArray[np.float32]
    ) -> None:
        self.calls.append("embeddings")
        super().embeddings(path, names, vectors)

    def part(
        self,
        folder: Path,
        names: Sequence[str],
        locals_: npt.NDArray[np.int64],
        vectors: npt.NDArray[np.float32],
    ) -> None:
        self.calls.append("part")
        super().part(folder, names, locals_, vectors)

    def merges(self, path: Path, merges: Iterable[tuple[float, Merge]]) -> None:
        self.calls.append("merges")
        super().merges(path, merges)

    def errors(self, path: Path, skipped: Iterable[Skipped]) -> None:
        self.calls.append("errors")
        super().errors(path, skipped)

    def clusters(self, path: Path, rows: Iterable[Assignment]) -> None:
        self.calls.append("clusters")
        super().clusters(path, rows)


class DiskFullFiles(OutputFiles):
    """Writing ``clusters.csv`` runs out of space part-way, like a full disk."""

    def __init__(self) -> None:
        self.full = False

    def clusters(self, path: Path, rows: Iterable[Assignment]) -> None:
        if not self.full:
            super().clusters(path, rows)
            return

        def write(handle: BinaryIO) -> None:
            handle.write(b"filename,cluster\npartial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        atomic_write(path, write)


def test_disk_full_keeps_old_files_and_recovers(tmp_path: Path, built: Builder) -> None:
    files = DiskFullFiles()
    writer = SnapshotWriter(tmp_path / "state", output(tmp_path), files=files)
    writer.write_if_changed(now=T0)
    out = tmp_path / "out"
    before = (out / "clusters.csv").read_bytes()

    built.commit([6, 7])
    files.full = True
    with capture_logs() as logs, pytest.raises(SnapshotError) as caught:
        writer.write_if_changed(now=T0 + 10)
    assert caught.value.errno_name == "ENOSPC"
    assert caught.value.file == out / "clusters.csv"
    assert "ENOSPC" in str(caught.value) and "clusters.csv" in str(caught.value)
    assert writer.last_error == str(caught.value)
    assert (out / "clusters.csv").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files
    failed = [e for e in logs if e["event"] == "snapshot_failed"]
    assert len(failed) == 1 and failed[0]["errno"] == "ENOSPC"
    assert failed[0]["log_level"] == "error"

    # Nothing new was committed, but the failed snapshot must still be retried.
    with pytest.raises(SnapshotError):
        writer.write_if_changed(now=T0 + 20)
    files.full = False
    with capture_logs() as logs:
        report = writer.write_if_changed(now=T0 + 30)
    assert report is not None and report.crops == 8
    assert [c for _, c in read_clusters_csv(out / "clusters.csv")][-2:] == [6, 7]
    recovered = [e for e in logs if e["event"] == "snapshot_recovered"]
    assert len(recovered) == 1
    assert recovered[0]["attempts"] == 2 and recovered[0]["failed_for_s"] == 20
    assert writer.last_error is None
    assert writer.write_if_changed(now=T0 + 40) is None


def test_cluster_folders_are_hard_links_updated_on_merge(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    b = Builder(tmp_path / "state", src)
    b.commit([0, 0, 2, 2, 4])
    writer = SnapshotWriter(tmp_path / "state", output(tmp_path, gen_cluster_dirs=True, dedup=True))
    writer.write(now=T0)
    tree = tmp_path / "out" / "clusters"

    def listing(root: Path) -> dict[str, str]:
        return {
            str(p.relative_to(root)): p.name
            for p in root.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        }

    assert sorted(listing(tree)) == [
        "0/crop_0.png",
        "0/crop_1.png",
        "2/crop_2.png",
        "2/crop_3.png",
        f"{NOT_CLUSTERED}/crop_4.png",
    ]
    for rel in listing(tree):
        linked = os.stat(tree / rel)
        source = os.stat(src / Path(rel).name)
        assert (linked.st_dev, linked.st_ino) == (source.st_dev, source.st_ino)
    dedup = listing(tmp_path / "out" / "dedup")
    assert len([r for r in dedup if r.startswith("0_")]) == 1
    assert len([r for r in dedup if r.startswith("2_")]) == 1

    # seq 5 joins 0 and 2: cluster 2's folder is folded into 0; seq 6 joins 4.
    b.commit([0, 4], [Merge(2, 0)])
    assert writer.write_if_changed(now=T0 + 1) is not None
    assert sorted(listing(tree)) == [
        "0/crop_0.png",
        "0/crop_1.png",
        "0/crop_2.png",
        "0/crop_3.png",
        "0/crop_5.png",
        "4/crop_4.png",
        "4/crop_6.png",
    ]
    assert not (tree / "2").exists() and not (tree / NOT_CLUSTERED).exists()
    dedup = listing(tmp_path / "out" / "dedup")
    assert sorted(r.split("_")[0] for r in dedup) == ["0", "4"]


def test_folder_not_owned_is_reported_not_emptied(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    b = Builder(tmp_path / "state", src)
    b.commit([0, 0])
    foreign = tmp_path / "out" / "clusters"
    foreign.mkdir(parents=True)
    (foreign / "mine.txt").write_text("keep")
    writer = SnapshotWriter(tmp_path / "state", output(tmp_path, gen_cluster_dirs=True))
    with pytest.raises(SnapshotError, match="not empty") as caught:
        writer.write(now=T0)
    assert caught.value.file == foreign and caught.value.errno_name is None
    assert (foreign / "mine.txt").read_text() == "keep"
    # The files themselves were still written before the folders.
    assert len(read_clusters_csv(tmp_path / "out" / "clusters.csv")) == 2


def test_readers_never_see_a_partial_file(tmp_path: Path) -> None:
    b = Builder(tmp_path / "state")
    writer = SnapshotWriter(tmp_path / "state", output(tmp_path))
    out = tmp_path / "out"
    batch = 7
    b.commit(list(range(batch)))
    writer.write(now=T0)
    stop = threading.Event()
    problems: list[str] = []
    reads = [0]

    def reader() -> None:
        while not stop.is_set():
            try:
                rows = read_clusters_csv(out / "clusters.csv")
                emb = read_parts(out / EMBEDDINGS_DIR)
            except Exception as exc:  # any parse failure is what this test looks for
                problems.append(repr(exc))
                return
            for n in (len(rows), len(emb.names)):
                if n == 0 or n % batch:
                    problems.append(f"{n} rows is not a whole number of batches")
            if [r[0] for r in rows] != b.names[: len(rows)]:
                problems.append("clusters.csv rows out of order")
            reads[0] += 1

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(25):
            start = len(b.names)
            b.commit(list(range(start, start + batch)))
            writer.write_if_changed(now=T0)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert problems == []
    assert reads[0] > 0
    assert len(read_clusters_csv(out / "clusters.csv")) == 26 * batch


def test_output_name_constants_are_what_the_writers_write(tmp_path: Path, built: Builder) -> None:
    """The names the snapshot imports from each writer's module are the files it writes."""
    src = tmp_path / "src"
    src.mkdir()
    b = Builder(tmp_path / "state2", src)
    b.commit([0, 0, 2], skipped=["bad.png"])
    SnapshotWriter(tmp_path / "state", output(tmp_path)).write(now=T0)
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        ACTIVITY_CSV,
        ACTIVITY_PNG,
        GALLERY_DIR,
        INDEX_HTML,
        CLUSTERS_CSV,
        EMBEDDINGS_DIR,
        EMBEDDINGS_PKL,
        MERGES_CSV,
        ERRORS_CSV,
    }
    folders = replace(output(tmp_path, gen_cluster_dirs=True, dedup=True), folder=tmp_path / "o2")
    SnapshotWriter(tmp_path / "state2", folders).write(now=T0)
    files = {CLUSTERS_CSV, EMBEDDINGS_DIR, EMBEDDINGS_PKL, MERGES_CSV, ERRORS_CSV}
    files |= {ACTIVITY_CSV, ACTIVITY_PNG, GALLERY_DIR, INDEX_HTML}
    assert {p.name for p in (tmp_path / "o2").iterdir()} == files | {CLUSTER_DIRS, DEDUP_DIRS}
    assert (tmp_path / "o2" / CLUSTER_DIRS / NOT_CLUSTERED).is_dir()
