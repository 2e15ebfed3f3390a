"""Tests for the per-session outputs: session folders, ``current``, final files, export."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from structlog.testing import capture_logs

from crop_clusterd.activity import ACTIVITY_CSV, ACTIVITY_PNG
from crop_clusterd.cli import main
from crop_clusterd.config import OutputConfig
from crop_clusterd.csvfiles import read_clusters_csv, read_errors_csv
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
)
from crop_clusterd.sessionfiles import CURRENT_LINK, ExportError, export_session
from crop_clusterd.sessions import SessionRule
from crop_clusterd.snapshot import OutputFiles, SnapshotError, SnapshotWriter
from crop_clusterd.store import StateStore
from crop_clusterd.summary import SUMMARY_JSON, HourFigures, SessionSummary, read_summary

DIM = 8
T0 = 1_717_000_000.0  # wall clock of the first commit
NIGHT = SessionRule(split="night")
A, B = "2024-06-01", "2024-06-02"


def at(day: int, hour: int, minute: int = 0) -> float:
    """A capture time: the trap's local wall clock stored as if UTC."""
    return datetime(2024, 6, day, hour, minute, tzinfo=UTC).timestamp()


class Nights:
    """Commits micro-batches of several sessions to a real store, as the link stage does."""

    def __init__(self, folder: Path, seed: int = 0) -> None:
        self.store = StateStore(folder)
        self.rng = np.random.default_rng(seed)
        self.seq = 0
        self.batch = 0
        self.wall = T0
        self.names: dict[str, list[str]] = {}
        self.vectors: dict[str, list[npt.NDArray[np.float32]]] = {}

    def commit(
        self,
        session: str,
        clusters: Sequence[int],
        merges: Sequence[Merge] = (),
        *,
        times: Sequence[float] | None = None,
        skipped: Sequence[str] = (),
    ) -> None:
        """Commit crops of ``session`` with these local cluster ids."""
        names = self.names.setdefault(session, [])
        start = len(names)
        raw = self.rng.normal(size=(len(clusters), DIM)).astype(np.float32)
        vectors = raw / np.linalg.norm(raw, axis=1, keepdims=True)
        day = int(session[-2:]) if session[-2:].isdigit() else 1
        crops = []
        for i, cluster in enumerate(clusters):
            local = start + i
            name = f"{session}/frame{local // 3}/crop_{local}.png"
            t = times[i] if times is not None else at(day, 22) + 60.0 * local
            crop = Crop(path=Path(name), name=name, time=t)
            crops.append(CommittedCrop(Embedded(crop, vectors[i]), self.seq + i, cluster, local))
            names.append(name)
            self.vectors.setdefault(session, []).append(vectors[i])
        skips = [DecodeFailure(p, "truncated image") for p in skipped]
        self.wall += 1.0
        self.store.commit_batch(self.batch, crops, merges, skips, now=self.wall, session=session)
        self.seq += len(clusters)
        self.batch += 1

    def close(self, session: str) -> None:
        self.wall += 1.0
        self.store.close_session(session, self.wall)


def writer(
    tmp_path: Path, files: OutputFiles | None = None, rule: SessionRule | None = NIGHT, **kw: bool
) -> SnapshotWriter:
    output = replace(OutputConfig(), folder=tmp_path / "out", **kw)
    return SnapshotWriter(tmp_path / "state", output, session=rule, files=files)


def tree_state(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under ``folder``: (inode, mtime_ns, bytes)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            st = path.stat()
            out[str(path.relative_to(folder))] = (st.st_ino, st.st_mtime_ns, path.read_bytes())
    return out


@pytest.fixture
def nights(tmp_path: Path) -> Nights:
    return Nights(tmp_path / "state")


def test_each_session_has_its_folder_and_current_points_at_the_newest(
    tmp_path: Path, nights: Nights
) -> None:
    out = tmp_path / "out"
    w = writer(tmp_path)
    nights.commit(A, [0, 0, 2], skipped=["bad.png"])
    report = w.write_if_changed(now=T0 + 10)
    assert report is not None and (report.session, report.crops, report.clusters) == (A, 3, 2)
    assert sorted(p.name for p in out.iterdir()) == [A, CURRENT_LINK]
    assert os.readlink(out / CURRENT_LINK) == A  # relative
    assert sorted(p.name for p in (out / A).iterdir()) == [
        ACTIVITY_CSV,
        ACTIVITY_PNG,
        "clusters.csv",
        EMBEDDINGS_DIR,
        "errors.csv",
        GALLERY_DIR,
        INDEX_HTML,
        "merges.csv",
    ]
    assert read_errors_csv(out / CURRENT_LINK / "errors.csv") == [("bad.png", "truncated image")]

    nights.close(A)
    nights.commit(B, [0, 1])
    report = w.write_if_changed(now=T0 + 20)
    assert report is not None and report.session == B and report.closed == (A,)
    assert os.readlink(out / CURRENT_LINK) == B
    assert [c for _, c in read_clusters_csv(out / CURRENT_LINK / "clusters.csv")] == [0, 1]
    # Ids are local to each session; a session's folder lists its own crops only.
    assert read_clusters_csv(out / A / "clusters.csv") == list(
        zip(nights.names[A], [0, 0, 2], strict=True)
    )
    assert (out / A / SUMMARY_JSON).exists() and (out / A / EMBEDDINGS_PKL).exists()
    assert not (out / B / SUMMARY_JSON).exists() and not (out / B / EMBEDDINGS_PKL).exists()
    pkl = load_embeddings_pickle(out / A / EMBEDDINGS_PKL)
    assert pkl.names == tuple(nights.names[A])
    np.testing.assert_allclose(pkl.embeddings, np.stack(nights.vectors[A]), atol=1e-6)


def test_a_closed_session_with_its_summary_is_never_written_again(
    tmp_path: Path, nights: Nights
) -> None:
    w = writer(tmp_path, gen_cluster_dirs=False)
    nights.commit(A, [0, 0, 2, 2, 4])
    w.write_if_changed(now=T0)
    nights.close(A)
    nights.commit(B, [0])
    w.write_if_changed(now=T0 + 1)
    before = tree_state(tmp_path / "out" / A)
    assert SUMMARY_JSON in before

    for k in range(3):
        nights.commit(B, [0, 1], [Merge(1, 0)], skipped=[f"bad{k}.png"])
        assert w.write_if_changed(now=T0 + 2 + k) is not None
    w.write(now=T0 + 10)  # the final snapshot at daemon stop
    # A restarted daemon (a new writer) finds the summary and leaves the folder alone.
    restarted = writer(tmp_path)
    nights.commit(B, [0])
    restarted.write_if_changed(now=T0 + 20)
    restarted.write(now=T0 + 21)
    assert tree_state(tmp_path / "out" / A) == before


def test_a_late_crop_reopens_a_closed_session_and_it_is_finalised_again(
    tmp_path: Path, nights: Nights
) -> None:
    out = tmp_path / "out"
    w = writer(tmp_path)
    nights.commit(A, [0, 0])
    nights.close(A)
    nights.commit(B, [0])
    w.write_if_changed(now=T0)
    first = read_summary(out / A / SUMMARY_JSON)
    assert first.crops == 2

    # A late file of night A: the link stage closes B and the commit reopens A.
    nights.close(B)
    nights.commit(A, [0])
    report = w.write_if_changed(now=T0 + 1)
    assert report is not None and report.session == A and report.closed == (B,)
    assert not (out / A / SUMMARY_JSON).exists()  # not final any more
    assert len(read_clusters_csv(out / A / "clusters.csv")) == 3
    assert os.readlink(out / CURRENT_LINK) == B  # the newest session is still B

    nights.close(A)
    report = w.write_if_changed(now=T0 + 2)
    assert report is not None and report.closed == (A,)
    again = read_summary(out / A / SUMMARY_JSON)
    assert again.crops == 3 and again.closed is not None and again.closed > (first.closed or 0)
    assert len(load_embeddings_pickle(out / A / EMBEDDINGS_PKL).names) == 3
    assert read_parts(out / A / EMBEDDINGS_DIR).locals.tolist() == [0, 1, 2]


def test_summary_json_of_a_small_night(tmp_path: Path, nights: Nights) -> None:
    w = writer(tmp_path)
    # 22h: crops 0, 1 (cluster 0) and 2 (cluster 2); 23h: crop 3 joins 2, crop 4 alone;
    # 00h next day: crop 5 (cluster 5) and 6, which joins 5 and merges 2 into 0.
    times = [at(1, 22, 5), at(1, 22, 30), at(1, 22, 50), at(1, 23, 10), at(1, 23, 40)]
    nights.commit(A, [0, 0, 2, 2, 4], times=times)
    nights.commit(A, [5, 5], times=[at(2, 0, 20), at(2, 0, 45)])
    nights.commit(A, [], [Merge(2, 0)])
    nights.close(A)
    w.write_if_changed(now=T0)
    s = read_summary(tmp_path / "out" / A / SUMMARY_JSON)
    # Clusters: {0,1,2,3} {4} {5,6}.
    assert (s.session, s.crops, s.clusters, s.clusters_2plus, s.singletons) == (A, 7, 3, 2, 1)
    assert (s.first_time, s.last_time) == ("2024-06-01T22:05:00", "2024-06-02T00:45:00")
    assert s.per_hour == (
        HourFigures("2024-06-01T22", crops=3, new_clusters=1),
        HourFigures("2024-06-01T23", crops=2, new_clusters=1),
        HourFigures("2024-06-02T00", crops=2, new_clusters=1),
    )
    assert s.closed == nights.wall


class MeteredFiles(OutputFiles):
    """Counts the bytes of every file written, by kind."""

    def __init__(self) -> None:
        self.parts = 0
        self.part_bytes: list[int] = []
        self.other_bytes = 0

    def part(
        self,
        folder: Path,
        names: Sequence[str],
        locals_: npt.NDArray[np.int64],
        vectors: npt.NDArray[np.float32],
    ) -> None:
        before = {p.name for p in folder.glob("*.parquet")}
        super().part(folder, names, locals_, vectors)
        new = [p for p in folder.glob("*.parquet") if p.name not in before]
        self.parts += 1
        self.part_bytes.append(sum(p.stat().st_size for p in new))

    def embeddings(
        self, path: Path, names: Sequence[str], vectors: npt.NDArray[np.float32]
    ) -> None:
        super().embeddings(path, names, vectors)
        self.other_bytes += path.stat().st_size

    def clusters(self, path: Path, rows: Iterable[Assignment]) -> None:
        super().clusters(path, rows)
        self.other_bytes += path.stat().st_size


def test_parts_append_only_new_rows(tmp_path: Path, nights: Nights) -> None:
    files = MeteredFiles()
    w = writer(tmp_path, files)
    batch = 20
    for _ in range(8):
        nights.commit(
            A, list(range(len(nights.names.get(A, [])), len(nights.names.get(A, [])) + batch))
        )
        w.write_if_changed(now=T0)
    assert files.parts == 8
    # The embeddings written per snapshot do not grow with the session's history.
    assert max(files.part_bytes) - min(files.part_bytes) < 300
    assert min(files.part_bytes) >= batch * DIM * 4
    back = read_parts(tmp_path / "out" / A / EMBEDDINGS_DIR)
    assert back.names == tuple(nights.names[A])
    np.testing.assert_array_equal(back.vectors, np.stack(nights.vectors[A]))
    # No change, no part (and no file at all).
    assert w.write_if_changed(now=T0) is None and files.parts == 8


def night_cost(tmp_path: Path, history: int) -> tuple[int, int]:
    """Bytes of parts and of other files written for a small night after ``history``
    crops of an earlier night."""
    nights = Nights(tmp_path / "state")
    w = writer(tmp_path, files := MeteredFiles())
    if history:
        for start in range(0, history, 500):
            nights.commit(A, list(range(start, start + 500)))
        w.write_if_changed(now=T0)
        nights.close(A)
        w.write_if_changed(now=T0)
    files.part_bytes.clear()
    files.other_bytes = 0
    for k in range(5):
        nights.commit(B, list(range(10 * k, 10 * k + 10)))
        w.write_if_changed(now=T0)
    w.write(now=T0)
    return sum(files.part_bytes), files.other_bytes


def test_a_nights_bytes_do_not_depend_on_the_nights_before(tmp_path: Path) -> None:
    fresh = night_cost(tmp_path / "fresh", 0)
    after = night_cost(tmp_path / "after", 3000)
    assert after == fresh


def test_the_writer_holds_the_open_session_only(tmp_path: Path, nights: Nights) -> None:
    w = writer(tmp_path)
    nights.commit(A, list(range(50)))
    w.write_if_changed(now=T0)
    nights.close(A)
    nights.commit(B, [0, 1, 2])
    w.write_if_changed(now=T0)
    cached = w._cache
    assert cached is not None and cached.id == B and len(cached) == 3
    nights.close(B)
    w.write_if_changed(now=T0)
    assert w._cache is None


class FailingFiles(OutputFiles):
    """One kind of file fails once with ENOSPC."""

    def __init__(self, fail: str) -> None:
        self.fail = fail

    def _maybe(self, kind: str) -> None:
        if kind == self.fail:
            self.fail = ""
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def summary(self, path: Path, summary: SessionSummary) -> None:
        self._maybe("summary")
        super().summary(path, summary)

    def clusters(self, path: Path, rows: Iterable[Assignment]) -> None:
        self._maybe("clusters")
        super().clusters(path, rows)


def test_a_failed_close_is_finished_by_the_next_snapshot(tmp_path: Path, nights: Nights) -> None:
    out = tmp_path / "out"
    w = writer(tmp_path, FailingFiles("summary"))
    nights.commit(A, [0, 0, 2])
    nights.close(A)
    with pytest.raises(SnapshotError, match=r"summary\.json"):
        w.write_if_changed(now=T0)
    assert not (out / A / SUMMARY_JSON).exists()  # not final: it will be written again
    report = w.write_if_changed(now=T0 + 1)
    assert report is not None and report.closed == (A,)
    assert read_summary(out / A / SUMMARY_JSON).crops == 3


def test_current_never_points_at_a_folder_without_its_files(tmp_path: Path, nights: Nights) -> None:
    out = tmp_path / "out"
    files = FailingFiles("")
    w = writer(tmp_path, files)
    nights.commit(A, [0])
    w.write_if_changed(now=T0)
    nights.close(A)
    nights.commit(B, [0])
    files.fail = "clusters"  # A's final clusters.csv fails
    with pytest.raises(SnapshotError):
        w.write_if_changed(now=T0)
    assert os.readlink(out / CURRENT_LINK) == A
    assert not (out / B).exists()
    w.write_if_changed(now=T0)
    assert os.readlink(out / CURRENT_LINK) == B


def test_split_none_keeps_the_layout_from_before_sessions(tmp_path: Path) -> None:
    store = Nights(tmp_path / "state")
    store.commit("all", [0, 0, 2])
    w = writer(tmp_path, rule=SessionRule(split="none"))
    w.write_if_changed(now=T0)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        ACTIVITY_CSV,
        ACTIVITY_PNG,
        "clusters.csv",
        EMBEDDINGS_DIR,
        "errors.csv",
        GALLERY_DIR,
        INDEX_HTML,
        "merges.csv",
    ]
    w.write(now=T0)
    assert load_embeddings_pickle(out / EMBEDDINGS_PKL).names == tuple(store.names["all"])
    # New crops after the pickle was written make it stale: it is withdrawn.
    store.commit("all", [3])
    w.write_if_changed(now=T0)
    assert not (out / EMBEDDINGS_PKL).exists()
    assert len(read_parts(out / EMBEDDINGS_DIR)) == 4


def test_a_closed_session_without_vectors_still_gets_its_listing(
    tmp_path: Path, nights: Nights
) -> None:
    nights.commit(A, [0, 0, 2])
    nights.close(A)
    nights.commit(B, [0])
    nights.store.drop_vectors(A)
    w = writer(tmp_path)
    with capture_logs() as logs:
        report = w.write_if_changed(now=T0)
    assert report is not None and report.closed == (A,)
    folder = tmp_path / "out" / A
    assert [c for _, c in read_clusters_csv(folder / "clusters.csv")] == [0, 0, 2]
    assert read_summary(folder / SUMMARY_JSON).clusters == 2
    assert not (folder / EMBEDDINGS_PKL).exists()
    assert any(e["event"] == "session_vectors_dropped" for e in logs)


# -- export --------------------------------------------------------------------------------


def test_export_writes_the_old_tools_pickle_of_a_session(tmp_path: Path, nights: Nights) -> None:
    nights.commit(A, [0, 0, 2])
    nights.commit(A, [0, 4], [Merge(2, 0)])
    nights.close(A)
    nights.commit(B, [0, 1])
    writer(tmp_path).write_if_changed(now=T0)
    target = tmp_path / "a.pkl"
    assert export_session(tmp_path / "state", A, target) == 5
    # Byte for byte the pickle the daemon wrote when the session closed.
    assert target.read_bytes() == (tmp_path / "out" / A / EMBEDDINGS_PKL).read_bytes()
    # What the batch tool's pickle reader reads back.
    loaded = load_embeddings_pickle(target)
    assert loaded.names == tuple(nights.names[A]) and loaded.labels is None
    np.testing.assert_allclose(loaded.embeddings, np.stack(nights.vectors[A]), atol=1e-6)
    # The open session can be exported too (its pickle otherwise comes at daemon stop).
    assert export_session(tmp_path / "state", B, tmp_path / "b.pkl") == 2


def test_export_refuses_unknown_sessions_and_dropped_vectors(
    tmp_path: Path, nights: Nights
) -> None:
    nights.commit(A, [0])
    nights.close(A)
    nights.commit(B, [0])
    with pytest.raises(ExportError, match=r"no session '2024-06-09'.*2024-06-01, 2024-06-02"):
        export_session(tmp_path / "state", "2024-06-09", tmp_path / "x.pkl")
    nights.store.drop_vectors(A)
    with pytest.raises(ExportError, match="dropped"):
        export_session(tmp_path / "state", A, tmp_path / "x.pkl")
    assert not (tmp_path / "x.pkl").exists()


def test_export_command(
    tmp_path: Path,
    nights: Nights,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nights.commit(A, [0, 0])
    state = str(tmp_path / "state")
    assert main(["export", A, "--state", state, "-o", str(tmp_path / "a.pkl")]) == 0
    assert f"2 crops of session {A} written to" in capsys.readouterr().out
    assert load_embeddings_pickle(tmp_path / "a.pkl").names == tuple(nights.names[A])
    monkeypatch.chdir(tmp_path)
    assert main(["export", A, "--state", state]) == 0
    assert (tmp_path / f"embeddings-{A}.pkl").exists()
    assert main(["export", "nope", "--state", state]) == 1
    assert "no session 'nope'" in capsys.readouterr().err
    config = tmp_path / "c.toml"
    config.write_text(f'[state]\nfolder = "{state}"\n', encoding="utf-8")
    assert main(["export", A, "--config", str(config), "-o", str(tmp_path / "c.pkl")]) == 0
    config.write_text("[state]\nfolder = 3\n", encoding="utf-8")
    assert main(["export", A, "--config", str(config)]) == 2


def _wchar() -> int:
    with open("/proc/self/io", encoding="ascii") as io:
        return int(next(line for line in io if line.startswith("wchar:")).split()[1])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
def test_reading_a_session_writes_nothing(tmp_path: Path) -> None:
    """Reading a session's rows in order must not sort the vectors through a temp file."""
    nights = Nights(tmp_path / "state")
    nights.rng = np.random.default_rng(5)
    big = 1536  # 1200 crops x 6 KB: more than SQLite sorts in memory
    store = nights.store
    crops = []
    raw = nights.rng.normal(size=(1200, big)).astype(np.float32)
    for i in range(1200):
        crop = Crop(path=Path(f"c{i}.png"), name=f"c{i}.png", time=at(1, 22))
        crops.append(CommittedCrop(Embedded(crop, raw[i]), i, i, i))
    store.commit_batch(0, crops, [], [], now=T0, session=A)
    with StateStore(tmp_path / "state", readonly=True) as reader:
        before = _wchar()
        rows = reader.load_crops(0, session=A)
        assert _wchar() - before < 64 * 1024
        np.testing.assert_array_equal(rows.vectors, raw)
        names_only = reader.load_crops(600, session=A, vectors=False)
    assert names_only.vectors.shape == (600, 0)
    assert names_only.locals.tolist() == list(range(600, 1200))
    # Names stay readable once the vectors are dropped (the snapshot writer lists them).
    store.close_session(A, T0 + 1)
    store.drop_vectors(A)
    assert len(store.load_crops(0, session=A, vectors=False)) == 1200


def test_a_night_of_bad_files_only_has_its_errors_csv(tmp_path: Path, nights: Nights) -> None:
    """Every skip is in some session's errors.csv, also where no crop of its night
    was good: the night gets a folder with an empty clusters.csv and a summary."""
    out = tmp_path / "out"
    w = writer(tmp_path, gen_cluster_dirs=False)
    nights.commit(A, [], skipped=["a/bad1.png", "a/bad2.png"])
    assert w.write_if_changed(now=T0) is not None
    assert read_errors_csv(out / A / "errors.csv") == [
        ("a/bad1.png", "truncated image"),
        ("a/bad2.png", "truncated image"),
    ]
    assert read_clusters_csv(out / A / "clusters.csv") == []
    nights.close(A)
    nights.commit(B, [0])
    w.write_if_changed(now=T0 + 1)
    assert read_summary(out / A / SUMMARY_JSON).crops == 0
    assert len(read_errors_csv(out / A / "errors.csv")) == 2
