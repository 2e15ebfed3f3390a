"""Tests for the atomic output writers, the embeddings pickle and cluster folders."""

from __future__ import annotations

import csv
import errno
import os
import pickle
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crop_clusterd import atomic
from crop_clusterd.atomic import atomic_write, remove_stale_temp_files
from crop_clusterd.clusterdirs import NOT_CLUSTERED, cluster_folder_plan, pick_representatives
from crop_clusterd.csvfiles import (
    CLUSTERS_CSV,
    ERRORS_CSV,
    MERGES_CSV,
    read_clusters_csv,
    read_errors_csv,
    write_clusters_csv,
    write_errors_csv,
    write_merges_csv,
)
from crop_clusterd.embfile import EMBEDDINGS_PKL, load_embeddings_pickle, write_embeddings_pickle
from crop_clusterd.linktree import TREE_MARKER, sync_link_tree
from crop_clusterd.records import Assignment, Merge, Skipped

NASTY_NAMES = [
    "plain.png",
    "with,comma.png",
    'with"quote.png',
    "with\nnewline.png",
    "with\r\ncrlf.png",
    "lone\rreturn.png",
    "ünïcödé_蟲.png",
    "=cmd|' /C calc'!A0.png",
    " leading space.png",
    "",
    os.fsdecode(b"latin1_\xe9.png"),  # not UTF-8 on disk: a surrogate-escaped name
]


def _leftovers(folder: Path) -> list[str]:
    """Hidden temporary files left in ``folder``."""
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name]


# --------------------------------------------------------------------------- atomic_write


def write_bytes(handle: BinaryIO, payload: bytes) -> None:
    handle.write(payload)


def test_atomic_write_replaces_content(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    atomic_write(target, lambda f: write_bytes(f, b"new"))
    assert target.read_bytes() == b"new"
    assert _leftovers(tmp_path) == []


def test_atomic_write_keeps_old_file_when_writer_raises_midway(tmp_path: Path) -> None:
    target = tmp_path / "clusters.csv"
    target.write_bytes(b"previous complete file")
    seen_tmp: list[str] = []

    def writer(handle: BinaryIO) -> None:
        handle.write(b"half of the new")
        handle.flush()
        seen_tmp.extend(_leftovers(tmp_path))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write(target, writer)
    assert target.read_bytes() == b"previous complete file"
    assert _leftovers(tmp_path) == []
    # The temporary file was hidden and lived next to the target.
    assert len(seen_tmp) == 1 and seen_tmp[0].startswith(".clusters.csv.tmp-")


def test_atomic_write_propagates_enospc_unchanged(tmp_path: Path) -> None:
    target = tmp_path / "merges.csv"
    target.write_bytes(b"intact")
    error = OSError(errno.ENOSPC, "No space left on device")

    def writer(handle: BinaryIO) -> None:
        handle.write(b"x" * 1000)
        raise error

    with pytest.raises(OSError) as info:
        atomic_write(target, writer)
    assert info.value is error
    assert target.read_bytes() == b"intact"
    assert _leftovers(tmp_path) == []


def test_atomic_write_cleans_up_when_replace_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "errors.csv"
    target.write_bytes(b"intact")

    def failing_replace(src: object, dst: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError) as info:
        atomic_write(target, lambda f: write_bytes(f, b"new"))
    monkeypatch.undo()
    assert info.value.errno == errno.EROFS
    assert target.read_bytes() == b"intact"
    assert _leftovers(tmp_path) == []


def test_atomic_write_new_file_gets_umask_mode(tmp_path: Path) -> None:
    target = tmp_path / "new.csv"
    atomic_write(target, lambda f: write_bytes(f, b"x"))
    # mkstemp makes 0600 files; readers of the output folder need the usual mode.
    assert target.stat().st_mode & 0o777 == 0o666 & ~_current_umask()


def test_atomic_write_keeps_existing_mode(tmp_path: Path) -> None:
    target = tmp_path / "kept.csv"
    target.write_bytes(b"old")
    target.chmod(0o640)
    atomic_write(target, lambda f: write_bytes(f, b"new"))
    assert target.stat().st_mode & 0o777 == 0o640


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------- CSV files


def test_clusters_csv_round_trips_nasty_names(tmp_path: Path) -> None:
    rows = [Assignment(seq=i, name=n, cluster=i % 3 - 1) for i, n in enumerate(NASTY_NAMES)]
    path = tmp_path / "clusters.csv"
    write_clusters_csv(path, rows)
    assert read_clusters_csv(path) == [(a.name, a.cluster) for a in rows]
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as handle:
        assert next(csv.reader(handle)) == ["filename", "cluster"]


@settings(max_examples=40, deadline=None)
@given(
    # Any text a path can decode to: every character but NUL and lone surrogates,
    # plus the surrogateescape range that undecodable bytes of a file name become.
    names=st.lists(
        st.text(
            alphabet=st.characters(exclude_characters="\x00", exclude_categories=["Cs"])
            | st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF)
        ),
        max_size=6,
    ),
    clusters=st.lists(st.integers(-(2**62), 2**62), min_size=6, max_size=6),
)
def test_clusters_csv_round_trips_any_text(names: list[str], clusters: list[int]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "clusters.csv"
        rows = [Assignment(i, name, clusters[i]) for i, name in enumerate(names)]
        write_clusters_csv(path, rows)
        assert read_clusters_csv(path) == [(a.name, a.cluster) for a in rows]


def test_clusters_csv_with_labels_column(tmp_path: Path) -> None:
    rows = [Assignment(0, "a,1.png", 0), Assignment(1, "b.png", 0), Assignment(2, "c.png", 2)]
    path = tmp_path / "clusters.csv"
    write_clusters_csv(path, rows, labels={"a,1.png": 'moth "x"', "c.png": "fly"})
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as handle:
        table = list(csv.reader(handle))
    assert table == [
        ["filename", "cluster", "label"],
        ["a,1.png", "0", 'moth "x"'],
        ["b.png", "0", ""],
        ["c.png", "2", "fly"],
    ]
    assert read_clusters_csv(path) == [("a,1.png", 0), ("b.png", 0), ("c.png", 2)]


def test_read_clusters_csv_names_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "clusters.csv"
    path.write_text("filename,cluster\na.png,1\nb.png,x\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 3"):
        read_clusters_csv(path)
    path.write_text("name,id\n", encoding="utf-8")
    with pytest.raises(ValueError, match="header"):
        read_clusters_csv(path)


def test_errors_csv_round_trip(tmp_path: Path) -> None:
    skipped = [Skipped(name=n, reason=f"bad, {n!r}\nsecond line") for n in NASTY_NAMES]
    path = tmp_path / "errors.csv"
    write_errors_csv(path, skipped)
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as handle:
        assert next(csv.reader(handle)) == ["filename", "reason"]
    assert read_errors_csv(path) == [(s.name, s.reason) for s in skipped]


def test_merges_csv_times_are_iso_utc(tmp_path: Path) -> None:
    path = tmp_path / "merges.csv"
    write_merges_csv(path, [(0.0, Merge(7, 3)), (1_700_000_000.25, Merge(9, 3))])
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as handle:
        table = list(csv.reader(handle))
    assert table == [
        ["time", "from", "into"],
        ["1970-01-01T00:00:00.000+00:00", "7", "3"],
        ["2023-11-14T22:13:20.250+00:00", "9", "3"],
    ]


# --------------------------------------------------------------------------- embeddings pickle


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    norms: np.ndarray = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.asarray(matrix / norms, dtype=np.float64)


def test_embeddings_pickle_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(5, 7)).astype(np.float32)
    names = NASTY_NAMES[:5]
    labels = ["a", None, "b", "a", None]
    path = tmp_path / "embeddings.pkl"
    write_embeddings_pickle(path, names, vectors, labels)

    with open(path, "rb") as handle:
        raw = pickle.load(handle)  # what the old tool's readers do
    assert set(raw) == {"filename", "embedding", "label"}
    assert raw["filename"] == names and raw["label"] == labels
    assert raw["embedding"].dtype == np.float32 and raw["embedding"].shape == (5, 7)

    loaded = load_embeddings_pickle(path)
    assert loaded.names == tuple(names)
    assert loaded.labels == tuple(labels)
    assert loaded.embeddings.dtype == np.float32
    assert loaded.embeddings.flags.c_contiguous and loaded.embeddings.flags.writeable
    np.testing.assert_allclose(loaded.embeddings, _unit_rows(vectors), rtol=1e-6, atol=1e-6)


def test_embeddings_pickle_without_labels(tmp_path: Path) -> None:
    path = tmp_path / "embeddings.pkl"
    write_embeddings_pickle(path, ["a", "b"], np.eye(2, 3))
    with open(path, "rb") as handle:
        assert "label" not in pickle.load(handle)
    assert load_embeddings_pickle(path).labels is None


def test_write_embeddings_rejects_length_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="3 names but 2"):
        write_embeddings_pickle(tmp_path / "e.pkl", ["a", "b", "c"], np.ones((2, 4)))
    assert not (tmp_path / "e.pkl").exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_load_old_list_format(tmp_path: Path, protocol: int) -> None:
    rng = np.random.default_rng(protocol)
    rows = rng.normal(size=(4, 6))
    # The old tool stored a list of per-crop vectors: arrays of any float type,
    # sometimes (1, d) straight from the model, or plain lists.
    old_vectors: list[object] = [
        rows[0].astype(np.float32),
        rows[1][None, :].astype(np.float32),
        rows[2].tolist(),
        rows[3],
    ]
    path = tmp_path / "old.pkl"
    path.write_bytes(
        pickle.dumps(
            {
                "filename": ["w", "x", "y", "z"],
                "embedding": old_vectors,
                "label": ["p", "q", 3, None],
            },
            protocol=protocol,
        )
    )
    loaded = load_embeddings_pickle(path)
    assert loaded.names == ("w", "x", "y", "z")
    assert loaded.labels == ("p", "q", "3", None)
    assert loaded.embeddings.shape == (4, 6) and loaded.embeddings.dtype == np.float32
    np.testing.assert_allclose(loaded.embeddings, _unit_rows(rows), rtol=1e-5, atol=1e-6)


def test_float64_matrix_becomes_normalised_float32(tmp_path: Path) -> None:
    matrix = np.array([[3.0, 4.0], [0.0, -2.0], [1e-3, 1e-3]], dtype=np.float64)
    path = tmp_path / "e.pkl"
    path.write_bytes(pickle.dumps({"filename": ["a", "b", "c"], "embedding": matrix}))
    loaded = load_embeddings_pickle(path)
    assert loaded.embeddings.dtype == np.float32
    np.testing.assert_allclose(
        loaded.embeddings, [[0.6, 0.8], [0.0, -1.0], [2**-0.5, 2**-0.5]], rtol=1e-6
    )


def test_fortran_ordered_matrix_comes_back_c_contiguous(tmp_path: Path) -> None:
    matrix = np.asfortranarray(np.arange(1, 13, dtype=np.float32).reshape(4, 3))
    path = tmp_path / "e.pkl"
    path.write_bytes(pickle.dumps({"filename": list("abcd"), "embedding": matrix}))
    loaded = load_embeddings_pickle(path)
    assert loaded.embeddings.flags.c_contiguous
    np.testing.assert_allclose(loaded.embeddings, _unit_rows(matrix), rtol=1e-6)


class _Evil:
    """Pickles into a call to os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_os_system(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"filename": ["a"], "embedding": [_Evil(marker)]}, protocol=2))
    with pytest.raises(ValueError, match=r"disallowed global '(posix|os|nt)\.system'"):
        load_embeddings_pickle(path)
    assert not marker.exists()


def test_restricted_unpickler_refuses_other_callables(tmp_path: Path) -> None:
    path = tmp_path / "evil.pkl"
    # builtins.eval is a builtin but not a container: must be refused too.
    path.write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(ValueError, match=r"builtins\.eval"):
        load_embeddings_pickle(path)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"embedding": np.ones((1, 2))}, "missing key 'filename'"),
        ({"filename": ["a"]}, "missing key 'embedding'"),
        ({"filename": ["a", "b"], "embedding": [np.ones(3), np.ones(4)]}, "ragged"),
        ({"filename": ["a", "b"], "embedding": np.ones((3, 2))}, "2 filenames but 3"),
        ({"filename": ["a", "b"], "embedding": np.array([[1.0, np.nan], [1, 1]])}, "embedding 0"),
        (
            {"filename": ["a", "b"], "embedding": np.array([[1.0, 1.0], [0, 0]])},
            "embedding 1 is all zeros",
        ),
        ({"filename": ["a"], "embedding": np.ones((1, 2)), "label": ["x", "y"]}, "2 labels but 1"),
        ({"filename": [1], "embedding": np.ones((1, 2))}, "'filename' item 0"),
        ([1, 2], "expected a dict"),
    ],
)
def test_load_embeddings_clear_errors(tmp_path: Path, payload: object, message: str) -> None:
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(ValueError, match=message):
        load_embeddings_pickle(path)


def _peak_load_ratio(path: Path, data_bytes: int) -> float:
    """Peak memory allocated while loading ``path``, in units of the float32 data size."""
    tracemalloc.start()
    try:
        loaded = load_embeddings_pickle(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert loaded.embeddings.nbytes == data_bytes
    return peak / data_bytes


def test_load_is_memory_frugal(tmp_path: Path) -> None:
    # numpy reports its buffers to tracemalloc, so peaks are measurable.
    n, dim = 4000, 384
    matrix = np.random.default_rng(1).normal(size=(n, dim)).astype(np.float32)
    names = [f"crop_{i}.png" for i in range(n)]
    ours = tmp_path / "ours.pkl"
    write_embeddings_pickle(ours, names, matrix)
    # Our own format loads in place: no second copy of the matrix.
    assert _peak_load_ratio(ours, matrix.nbytes) < 1.4
    old = tmp_path / "old.pkl"
    old.write_bytes(pickle.dumps({"filename": names, "embedding": list(matrix)}, protocol=4))
    # The old list format needs the list plus the result, never more.
    assert _peak_load_ratio(old, matrix.nbytes) < 2.6


def test_load_truncated_pickle_is_value_error(tmp_path: Path) -> None:
    path = tmp_path / "cut.pkl"
    write_embeddings_pickle(path, ["a", "b"], np.ones((2, 8)))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match="not a readable embeddings pickle"):
        load_embeddings_pickle(path)


# --------------------------------------------------------------------------- sync_link_tree


def _sources(tmp_path: Path, count: int) -> list[Path]:
    folder = tmp_path / "src"
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"crop_{i}.png"
        path.write_bytes(f"crop {i}".encode())
        paths.append(path)
    return paths


def test_sync_creates_hard_links_and_is_idempotent(tmp_path: Path) -> None:
    src = _sources(tmp_path, 3)
    root = tmp_path / "clusters"
    wanted = {
        PurePosixPath("0/a.png"): src[0],
        PurePosixPath("0/b.png"): src[1],
        PurePosixPath("not-clustered/c.png"): src[2],
    }
    first = sync_link_tree(root, wanted)
    assert (first.linked, first.copied, first.unchanged) == (3, 0, 0)
    for rel, source in wanted.items():
        assert os.path.samestat((root / rel).stat(), source.stat())
    assert sorted(_files(root)) == sorted(wanted)

    inodes = {rel: (root / rel).stat().st_ino for rel in wanted}
    second = sync_link_tree(root, wanted)
    assert (second.linked, second.copied, second.removed, second.unchanged) == (0, 0, 0, 3)
    assert {rel: (root / rel).stat().st_ino for rel in wanted} == inodes
    assert _leftovers(root / "0") == []


def _files(root: Path) -> list[PurePosixPath]:
    return [
        PurePosixPath(p.relative_to(root).as_posix())
        for p in root.rglob("*")
        if not p.is_dir() and p.name != TREE_MARKER
    ]


def test_sync_removes_stale_entries_and_empty_folders(tmp_path: Path) -> None:
    src = _sources(tmp_path, 3)
    root = tmp_path / "clusters"
    sync_link_tree(
        root,
        {PurePosixPath("0/a.png"): src[0], PurePosixPath("5/b.png"): src[1]},
    )
    # Cluster 5 merged into 0 and a new crop arrived.
    stats = sync_link_tree(
        root,
        {
            PurePosixPath("0/a.png"): src[0],
            PurePosixPath("0/b.png"): src[1],
            PurePosixPath("0/c.png"): src[2],
        },
    )
    assert (stats.linked, stats.unchanged, stats.removed, stats.dirs_removed) == (2, 1, 1, 1)
    assert not (root / "5").exists()
    assert sorted(_files(root)) == [
        PurePosixPath("0/a.png"),
        PurePosixPath("0/b.png"),
        PurePosixPath("0/c.png"),
    ]


def test_sync_repoints_entry_whose_source_changed(tmp_path: Path) -> None:
    src = _sources(tmp_path, 2)
    root = tmp_path / "dedup"
    sync_link_tree(root, {PurePosixPath("0_rep.png"): src[0]})
    stats = sync_link_tree(root, {PurePosixPath("0_rep.png"): src[1]})
    assert (stats.linked, stats.replaced) == (1, 1)
    assert os.path.samestat((root / "0_rep.png").stat(), src[1].stat())
    assert src[0].read_bytes() == b"crop 0"  # the old source is untouched


@pytest.mark.parametrize("bad", ["../escape.png", "/etc/passwd", "0/../../x.png", "."])
def test_sync_rejects_paths_outside_root(tmp_path: Path, bad: str) -> None:
    src = _sources(tmp_path, 1)
    root = tmp_path / "clusters"
    with pytest.raises(ValueError):
        sync_link_tree(root, {PurePosixPath(bad): src[0]})
    assert not (tmp_path / "escape.png").exists()


def test_sync_never_follows_symlink_in_root(tmp_path: Path) -> None:
    src = _sources(tmp_path, 1)
    root = tmp_path / "clusters"
    outside = tmp_path / "outside"
    outside.mkdir()
    sync_link_tree(root, {})
    (root / "0").symlink_to(outside, target_is_directory=True)
    stats = sync_link_tree(root, {PurePosixPath("0/a.png"): src[0]})
    assert list(outside.iterdir()) == []  # nothing was written through the link
    assert (root / "0").is_dir() and not (root / "0").is_symlink()
    assert os.path.samestat((root / "0/a.png").stat(), src[0].stat())
    assert stats.removed == 1


def test_sync_copies_when_link_fails(tmp_path: Path) -> None:
    src = _sources(tmp_path, 2)
    root = tmp_path / "clusters"
    calls: list[tuple[Path, Path]] = []

    def cross_device(source: Path, dest: Path) -> None:
        calls.append((source, dest))
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    wanted = {PurePosixPath("0/a.png"): src[0], PurePosixPath("0/b.png"): src[1]}
    stats = sync_link_tree(root, wanted, link=cross_device)
    assert (stats.linked, stats.copied) == (0, 2) and len(calls) == 2
    for rel, source in wanted.items():
        assert (root / rel).read_bytes() == source.read_bytes()
        assert not os.path.samestat((root / rel).stat(), source.stat())
    # The copies are recognised as correct on the next call: nothing recopied.
    again = sync_link_tree(root, wanted, link=cross_device)
    assert (again.copied, again.unchanged) == (0, 2) and len(calls) == 2


def test_sync_propagates_other_link_errors(tmp_path: Path) -> None:
    src = _sources(tmp_path, 1)
    root = tmp_path / "clusters"

    def no_space(source: Path, dest: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as info:
        sync_link_tree(root, {PurePosixPath("0/a.png"): src[0]}, link=no_space)
    assert info.value.errno == errno.ENOSPC
    assert _leftovers(root / "0") == []


def test_sync_refuses_foreign_non_empty_folder(tmp_path: Path) -> None:
    src = _sources(tmp_path, 1)
    root = tmp_path / "clusters"
    root.mkdir()
    (root / "precious.txt").write_text("user data")
    with pytest.raises(ValueError, match="not created by crop-clusterd"):
        sync_link_tree(root, {PurePosixPath("0/a.png"): src[0]})
    assert (root / "precious.txt").read_text() == "user data"


def test_sync_reports_missing_sources(tmp_path: Path) -> None:
    src = _sources(tmp_path, 1)
    root = tmp_path / "clusters"
    gone = tmp_path / "src" / "gone.png"
    stats = sync_link_tree(root, {PurePosixPath("0/a.png"): src[0], PurePosixPath("0/g.png"): gone})
    assert stats.missing == (PurePosixPath("0/g.png"),)
    assert stats.linked == 1


def test_sync_rejects_file_folder_clash(tmp_path: Path) -> None:
    src = _sources(tmp_path, 2)
    with pytest.raises(ValueError, match="both a file and a folder"):
        sync_link_tree(
            tmp_path / "clusters",
            {PurePosixPath("0"): src[0], PurePosixPath("0/a.png"): src[1]},
        )


# --------------------------------------------------------------------------- folder plans


def _assign(clusters: list[int]) -> list[Assignment]:
    return [Assignment(seq=i, name=f"crop_{i}.png", cluster=c) for i, c in enumerate(clusters)]


def test_plan_gen_cluster_dirs_layout(tmp_path: Path) -> None:
    assignments = _assign([0, 0, 2, 3, 0])
    sources = {a.name: tmp_path / "in" / a.name for a in assignments}
    plan = cluster_folder_plan(assignments, sources)
    assert plan == {
        PurePosixPath("0/crop_0.png"): sources["crop_0.png"],
        PurePosixPath("0/crop_1.png"): sources["crop_1.png"],
        PurePosixPath("0/crop_4.png"): sources["crop_4.png"],
        PurePosixPath(f"{NOT_CLUSTERED}/crop_2.png"): sources["crop_2.png"],
        PurePosixPath(f"{NOT_CLUSTERED}/crop_3.png"): sources["crop_3.png"],
    }


def test_plan_dedup_layout(tmp_path: Path) -> None:
    assignments = _assign([0, 0, 2, 3, 3, 3])
    sources = {a.name: tmp_path / a.name for a in assignments}
    plan = cluster_folder_plan(assignments, sources, representatives={0: 1, 3: 5})
    assert plan == {
        PurePosixPath("0_crop_1.png"): sources["crop_1.png"],
        PurePosixPath("3_crop_5.png"): sources["crop_5.png"],
        PurePosixPath(f"{NOT_CLUSTERED}/crop_2.png"): sources["crop_2.png"],
    }
    with pytest.raises(ValueError, match="not a member"):
        cluster_folder_plan(assignments, sources, representatives={0: 4, 3: 5})
    with pytest.raises(ValueError, match="no representative"):
        cluster_folder_plan(assignments, sources, representatives={0: 1})


def test_plan_sanitises_and_deduplicates_basenames(tmp_path: Path) -> None:
    assignments = [
        Assignment(seq=4, name="a", cluster=1),
        Assignment(seq=2, name="b", cluster=1),
        Assignment(seq=9, name="c", cluster=1),
        Assignment(seq=7, name="d", cluster=8),
    ]
    sources = {
        "a": tmp_path / "frame1" / "crop.png",
        "b": tmp_path / "frame2" / "crop.png",
        "c": tmp_path / "x" / ".hid\x01den\\.png",
        "d": tmp_path / "y" / "single.png",
    }
    plan = cluster_folder_plan(assignments, sources)
    names = {source: rel for rel, source in plan.items()}
    # Lowest seq keeps the plain name; the other gets its seq appended.
    assert names[sources["b"]] == PurePosixPath("1/crop.png")
    assert names[sources["a"]] == PurePosixPath("1/crop~4.png")
    assert names[sources["c"]] == PurePosixPath("1/_hid_den_.png")
    assert names[sources["d"]] == PurePosixPath(f"{NOT_CLUSTERED}/single.png")
    # Same input in another order, same plan.
    assert cluster_folder_plan(list(reversed(assignments)), sources) == plan
    # The plan is usable as is.
    for source in sources.values():
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_bytes(b"x")
    stats = sync_link_tree(tmp_path / "clusters", plan)
    assert stats.linked == 4


def test_plan_dedup_name_fits_255_bytes(tmp_path: Path) -> None:
    source = tmp_path / ("é" * 125 + ".png")  # 254 bytes: legal on disk
    source.write_bytes(b"x")
    other = tmp_path / "other.png"
    other.write_bytes(b"y")
    assignments = [Assignment(0, "long", 123), Assignment(1, "other", 123)]
    plan = cluster_folder_plan(
        assignments, {"long": source, "other": other}, representatives={123: 0}
    )
    (rel,) = plan
    assert rel.name.startswith("123_") and rel.name.endswith(".png")
    assert len(rel.name.encode()) <= 255
    assert sync_link_tree(tmp_path / "dedup", plan).linked == 1


# --------------------------------------------------------------------------- representatives


def test_pick_representatives_closest_to_mean() -> None:
    vectors = np.array(
        [
            [1.0, 0.0, 0.0],  # cluster 0
            [0.0, 1.0, 0.0],  # cluster 0
            [0.7, 0.7, 0.0],  # cluster 0: closest to the mean direction
            [0.0, 0.0, 1.0],  # singleton 5: no representative
            [1.0, 0.0, 0.0],  # cluster 9, identical pair: smallest seq wins
            [1.0, 0.0, 0.0],
        ],
        dtype=np.float32,
    )
    assignments = [
        Assignment(10, "a", 0),
        Assignment(11, "b", 0),
        Assignment(12, "c", 0),
        Assignment(13, "d", 5),
        Assignment(21, "e", 9),
        Assignment(20, "f", 9),
    ]
    assert pick_representatives(assignments, vectors) == {0: 12, 9: 20}


def test_pick_representatives_matches_brute_force() -> None:
    rng = np.random.default_rng(3)
    n = 300
    vectors = rng.normal(size=(n, 8))
    clusters = rng.integers(0, 40, size=n)
    assignments = [Assignment(int(i), f"n{i}", int(c)) for i, c in enumerate(clusters)]
    picked = pick_representatives(assignments, vectors.astype(np.float32))
    for cluster in np.unique(clusters):
        members = np.flatnonzero(clusters == cluster)
        if len(members) < 2:
            assert int(cluster) not in picked
            continue
        mean = vectors[members].mean(axis=0)
        cos = vectors[members] @ mean / np.linalg.norm(vectors[members], axis=1)
        assert picked[int(cluster)] == int(members[np.argmax(cos)])


def test_pick_representatives_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="2 assignments"):
        pick_representatives(_assign([0, 0]), np.ones((3, 4), dtype=np.float32))


def test_stale_temp_files_of_a_killed_write_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "clusters.csv"
    write_clusters_csv(target, [Assignment(0, "a.png", 0)])
    # What a SIGKILL between mkstemp and rename leaves behind:
    stale = tmp_path / ".clusters.csv.tmp-k1ll3d"
    stale.write_bytes(b"filename,clu")
    other = tmp_path / ".embeddings.pkl.tmp-k1ll3d"
    other.write_bytes(b"x")
    assert remove_stale_temp_files(target) == 1
    assert not stale.exists() and other.exists()
    assert read_clusters_csv(target) == [("a.png", 0)]


def test_every_output_writer_goes_through_atomic_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writers call ``atomic.atomic_write`` through the module, so one wrapper sees every
    file (scripts/soak.py widens the crash window this way)."""
    seen: list[str] = []
    original = atomic.atomic_write

    def spy(path: Path, write: Callable[[BinaryIO], None]) -> None:
        seen.append(Path(path).name)
        original(path, write)

    monkeypatch.setattr(atomic, "atomic_write", spy)
    rows = [Assignment(0, "a.png", 0)]
    write_clusters_csv(tmp_path / CLUSTERS_CSV, rows)
    write_errors_csv(tmp_path / ERRORS_CSV, [Skipped("b.png", "truncated")])
    write_merges_csv(tmp_path / MERGES_CSV, [(0.0, Merge(1, 0))])
    write_embeddings_pickle(tmp_path / EMBEDDINGS_PKL, ["a.png"], np.ones((1, 2)))
    source = tmp_path / "a.png"
    source.write_bytes(b"x")
    sync_link_tree(tmp_path / "tree", {PurePosixPath("a.png"): source})
    assert seen == [CLUSTERS_CSV, ERRORS_CSV, MERGES_CSV, EMBEDDINGS_PKL, TREE_MARKER]


def test_sync_stats_count_every_step_of_one_call(tmp_path: Path) -> None:
    """One call that removes, replaces, keeps, links and prunes reports each count."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("keep", "new", "moved"):
        (src / f"{name}.png").write_bytes(name.encode())
    root = tmp_path / "tree"
    first = {
        PurePosixPath("k/keep.png"): src / "keep.png",
        PurePosixPath("r/moved.png"): src / "keep.png",
        PurePosixPath("gone/deep/stale.png"): src / "keep.png",
        PurePosixPath("file/inner.png"): src / "keep.png",
    }
    sync_link_tree(root, first)
    stats = sync_link_tree(
        root,
        {
            PurePosixPath("k/keep.png"): src / "keep.png",
            PurePosixPath("r/moved.png"): src / "moved.png",
            PurePosixPath("n/new.png"): src / "new.png",
            PurePosixPath("file"): src / "new.png",
            PurePosixPath("m/missing.png"): src / "missing.png",
        },
    )
    assert (stats.linked, stats.copied, stats.replaced, stats.unchanged) == (3, 0, 1, 1)
    # stale.png and file/inner.png, then the folder "file" where a file is now wanted.
    assert stats.removed == 3
    assert stats.dirs_removed == 2  # gone/deep, then gone
    assert stats.missing == (PurePosixPath("m/missing.png"),)
    assert not (root / "gone").exists() and (root / "file").is_file()
