"""``track`` resumes from its checkpoint and replays only what came after it."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from crop_clusterd.linking import LinkBatch, Motion, Stitch, StoredLinks, TrackLinker
from crop_clusterd.linking.base import AddResult
from crop_clusterd.linking.trackstate import CheckpointError, TrackCheckpoint, checkpoint_path
from crop_clusterd.records import FrameId, Merge, TrapId

IntArray = npt.NDArray[np.int64]


class RecordingTrack(TrackLinker):
    """A track linker that keeps what the daemon's store would: each crop's
    cluster id at its commit and the merges (stitches) of each micro-batch."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.commit_ids: list[int] = []
        self.merges: list[tuple[int, Merge]] = []
        self.batches = 0

    def add(self, batch: LinkBatch) -> AddResult:
        result = super().add(batch)
        self.commit_ids.extend(self.cluster_of(np.array(result.seqs, dtype=np.int64)).tolist())
        self.merges.extend((self.batches, m) for m in result.merges)
        self.batches += 1
        return result


class CountingTrack(TrackLinker):
    """A track linker that counts what it is made to link (restore work included)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.added_batches = 0
        self.added_crops = 0

    def add(self, batch: LinkBatch) -> AddResult:
        self.added_batches += 1
        self.added_crops += len(batch)
        return super().add(batch)


def scene(
    seed: int,
    frames: int,
    traps: int = 2,
    individuals: int = 5,
    untimed: float = 0.1,
    noise: float = 0.15,
) -> list[LinkBatch]:
    """Individuals seen frame after frame at a few traps: one micro-batch per frame.

    Some frames have no time (they count by frame ordinal) and some crops no
    position; individuals drift and now and then leave for good.
    """
    rng = np.random.default_rng(seed)
    dim = 8
    batches: list[LinkBatch] = []
    for f in range(frames):
        trap = TrapId(f"/trap{f % traps}", "")
        # Each trap has its individuals; every 50 frames they are replaced.
        generation = np.random.default_rng([seed, f % traps, f // 50])
        ident = generation.standard_normal((individuals, dim))
        present = rng.permutation(individuals)[: rng.integers(1, individuals + 1)]
        emb = ident[present] + noise * rng.standard_normal((len(present), dim))
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        t = np.nan if rng.random() < untimed else 20.0 * f
        centers = rng.uniform(0, 400, (len(present), 2))
        centers[rng.random(len(present)) < 0.1] = np.nan
        frame = FrameId(f"2024{f:06d}", trap)
        batches.append(
            LinkBatch(
                emb.astype(np.float32),
                np.full(len(present), t),
                centers,
                (frame,) * len(present),
            )
        )
    return batches


def joined(batches: list[LinkBatch]) -> LinkBatch:
    return LinkBatch(
        np.concatenate([b.embeddings for b in batches]),
        np.concatenate([b.times for b in batches]),
        np.concatenate([b.centers for b in batches]),
        tuple(f for b in batches for f in b.frames),
    )


def stored_of(
    batches: list[LinkBatch],
    ids: IntArray,
    index_file: Path | None,
    covers: int = 0,
    history: TrackLinker | None = None,
) -> StoredLinks:
    """The state folder's record of ``batches``, one micro-batch each; with
    ``history`` (a :class:`RecordingTrack`) the ids at commit and the merges."""
    numbers = np.concatenate([np.full(len(b), i, dtype=np.int64) for i, b in enumerate(batches)])
    if not isinstance(history, RecordingTrack):
        return StoredLinks(joined(batches), ids, numbers, index_file, covers)
    n = len(numbers)
    commit = np.array(history.commit_ids[:n], dtype=np.int64)
    merges = tuple((b, m) for b, m in history.merges if b < len(batches))
    return StoredLinks(joined(batches), ids, numbers, index_file, covers, commit, merges)


# Positions lie within 400 px: the diagonal is the 1,000 px floor of its estimate.
# The stitch window (4 frames) outlasts the idle limit (3), so tracklets wait
# open, stitching state included, across the checkpoints.
STITCH = Stitch(threshold=0.7, gap_frames=4, max_move=0.5)


def make(
    kind: type[TrackLinker] = RecordingTrack, threshold: float = 0.8, stitch: Stitch | None = STITCH
) -> TrackLinker:
    return kind(
        threshold,
        Motion(max_move=0.25),
        idle_frames=3,
        idle_cap_s=100.0,
        memory=2,
        margin=0.3,
        stitch=stitch,
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    frames=st.integers(2, 40),
    cut=st.floats(0.0, 1.0),
    stored_more=st.floats(0.0, 1.0),
    retire=st.booleans(),
    threshold=st.floats(0.3, 0.95),
)
def test_restored_from_a_checkpoint_goes_on_like_a_linker_that_never_stopped(
    tmp_path_factory: pytest.TempPathFactory,
    seed: int,
    frames: int,
    cut: float,
    stored_more: float,
    retire: bool,
    threshold: float,
) -> None:
    """Saved after batch j, the store holding batches up to J >= j (a crash after
    more commits), the restored linker continues exactly like the one that ran on."""
    index = tmp_path_factory.mktemp("state") / "index.hnsw"
    batches = scene(seed, frames)
    j = 1 + int(cut * (frames - 1))
    big_j = j + int(stored_more * (frames - j))
    live = make(threshold=threshold)
    for b in batches[:j]:
        live.add(b)
    retired = np.arange(0, len(live), 3, dtype=np.int64) if retire else np.empty(0, np.int64)
    live.retire(retired)
    assert live.save(index) == len(live)
    for b in batches[j:big_j]:
        live.add(b)

    restored = make(CountingTrack, threshold)
    with capture_logs() as logs:
        stored = stored_of(batches[:big_j], live.cluster_ids(), index, history=live)
        used = restored.restore(stored)
    restored.retire(retired)  # as the daemon does after a restore
    assert used
    assert [e for e in logs if e["log_level"] == "warning"] == []
    assert isinstance(restored, CountingTrack)
    assert restored.added_batches == big_j - j
    assert np.array_equal(restored.cluster_ids(), live.cluster_ids())
    for b in batches[big_j:]:
        seqs = np.arange(len(live), len(live) + len(b), dtype=np.int64)
        live.add(b)
        restored.add(b)
        assert np.array_equal(restored.cluster_of(seqs), live.cluster_of(seqs))
    assert np.array_equal(restored.cluster_ids(), live.cluster_ids())


def test_restore_replays_only_the_batches_after_the_checkpoint(tmp_path: Path) -> None:
    index = tmp_path / "index.hnsw"
    batches = scene(3, 120)
    live = make()
    for b in batches[:100]:
        live.add(b)
    live.save(index)
    for b in batches[100:]:
        live.add(b)
    after = sum(len(b) for b in batches[100:])
    assert 0 < after < len(live) // 4
    # Stitches both before and after the checkpoint: its open stitching state counts.
    assert isinstance(live, RecordingTrack)
    assert {b < 100 for b, _ in live.merges} == {True, False}

    with_file = make(CountingTrack)
    assert with_file.restore(stored_of(batches, live.cluster_ids(), index, history=live))
    without = make(CountingTrack)
    assert not without.restore(stored_of(batches, live.cluster_ids(), None, history=live))
    assert isinstance(with_file, CountingTrack) and isinstance(without, CountingTrack)
    assert (with_file.added_batches, with_file.added_crops) == (20, after)
    assert (without.added_batches, without.added_crops) == (120, len(live))
    assert np.array_equal(with_file.cluster_ids(), without.cluster_ids())
    assert np.array_equal(with_file.cluster_ids(), live.cluster_ids())


def test_checkpoint_size_follows_the_active_tracks_not_the_history(tmp_path: Path) -> None:
    """Individuals come and go; the file after 1,200 frames is no bigger than after 120."""
    batches = scene(4, 1200, individuals=6)
    linker = make()
    sizes = {}
    for i, b in enumerate(batches, start=1):
        linker.add(b)
        if i in (120, 240, 360, 1200):
            linker.save(tmp_path / f"at{i}.hnsw")
            sizes[i] = checkpoint_path(tmp_path / f"at{i}.hnsw").stat().st_size
    assert len(linker) > 3000
    # The open tracklets (and their clusters' frames) vary from frame to frame.
    assert sizes[1200] <= 1.25 * max(sizes[120], sizes[240], sizes[360])


def test_save_writes_its_own_file_and_nothing_when_empty(tmp_path: Path) -> None:
    index = tmp_path / "index.hnsw"
    index.write_bytes(b"an hnsw index of cosine")
    stale = tmp_path / ".index.track.npz.tmp-abc123"
    stale.write_bytes(b"left by a killed save")
    linker = make()
    assert linker.save(index) == 0
    assert not checkpoint_path(index).exists() and stale.exists()
    batches = scene(5, 10)
    for b in batches:
        linker.add(b)
    assert linker.save(index) == len(linker)
    assert checkpoint_path(index) == tmp_path / "index.track.npz"
    assert index.read_bytes() == b"an hnsw index of cosine"
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.hnsw", "index.track.npz"]
    # Readable without pickle: every member is a plain array.
    with np.load(checkpoint_path(index), allow_pickle=False) as npz:
        assert all(npz[name].dtype != object for name in npz.files)
        assert json.loads(bytes(npz["meta"]).decode())["covers"] == len(linker)


def saved_scene(tmp_path: Path, frames: int = 30) -> tuple[list[LinkBatch], TrackLinker, Path]:
    index = tmp_path / "index.hnsw"
    batches = scene(6, frames)
    live = make()
    for b in batches:
        live.add(b)
    live.save(index)
    return batches, live, index


def restore_logs(linker: TrackLinker, stored: StoredLinks) -> tuple[bool, list[str]]:
    """Whether the checkpoint was used, and the reasons logged for not using it."""
    with capture_logs() as logs:
        used = linker.restore(stored)
    return used, [str(e["reason"]) for e in logs if e["event"] == "track_checkpoint_unused"]


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("garbage", "unreadable checkpoint"),
        ("truncated", "unreadable checkpoint"),
        ("pickle", "unreadable checkpoint"),
        ("other format", "not a track checkpoint"),
        ("missing array", "unreadable checkpoint"),
        ("bad shape", "has shape"),
    ],
)
def test_a_damaged_checkpoint_falls_back_to_the_full_replay(
    tmp_path: Path, damage: str, reason: str
) -> None:
    batches, live, index = saved_scene(tmp_path)
    path = checkpoint_path(index)
    good = dict(np.load(path, allow_pickle=False))
    if damage == "garbage":
        path.write_bytes(b"garbage")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "pickle":
        # An object array (a pickle inside the .npz) is refused, never unpickled.
        np.savez(path, **{**good, "meta": np.array([{"format": 1}], dtype=object)})
    elif damage == "other format":
        np.savez(path, **{**good, "meta": np.frombuffer(b'{"format": "x"}', dtype=np.uint8)})
    elif damage == "missing array":
        np.savez(path, **{k: v for k, v in good.items() if k != "recent"})
    else:
        np.savez(path, **{**good, "recent": good["recent"][:, :1]})
    with pytest.raises(CheckpointError):
        TrackCheckpoint.read(path)
    restored = make(CountingTrack)
    used, reasons = restore_logs(restored, stored_of(batches, live.cluster_ids(), index))
    assert not used
    assert len(reasons) == 1 and reason in reasons[0]
    assert isinstance(restored, CountingTrack) and restored.added_crops == len(live)
    assert np.array_equal(restored.cluster_ids(), live.cluster_ids())


def test_a_checkpoint_that_does_not_fit_the_state_falls_back(tmp_path: Path) -> None:
    batches, live, index = saved_scene(tmp_path)
    ids = live.cluster_ids()

    def fallback(linker: TrackLinker, stored: StoredLinks, reason: str) -> None:
        used, reasons = restore_logs(linker, stored)
        assert not used
        assert len(reasons) == 1 and reason in reasons[0], reasons

    # Other settings.
    fallback(make(threshold=0.7), stored_of(batches, ids, index), "other settings")
    # The state holds fewer crops than the checkpoint covers (e.g. an older state).
    fewer = batches[:-3]
    fallback(make(), stored_of(fewer, ids[: len(joined(fewer))], index), "the state holds")
    # Another state of the same length: other cluster ids.
    other = ids.copy()
    other[-1] = len(other) - 1 if other[-1] != len(other) - 1 else other[-2]
    fallback(make(), stored_of(batches, other, index), "cluster ids differ")
    # Same ids, other vectors for the latest crops.
    moved = [LinkBatch(-b.embeddings, b.times, b.centers, b.frames) for b in batches]
    fallback(make(), stored_of(moved, ids, index), "latest crops differ")
    # The checkpoint ends inside a stored micro-batch (one batch, one crop more).
    extra = batches[0].rows(np.arange(1))
    one_batch = StoredLinks(
        joined([*batches, extra]),
        np.append(ids, len(ids)),
        np.zeros(len(ids) + 1, dtype=np.int64),
        index,
    )
    fallback(make(), one_batch, "inside a micro-batch")
    # A missing file is the normal first start: logged, not warned.
    checkpoint_path(index).unlink()
    with capture_logs() as logs:
        assert not make().restore(stored_of(batches, ids, index))
    (entry,) = [e for e in logs if e["event"] == "track_checkpoint_unused"]
    assert entry["log_level"] == "info"


def test_corrupt_checkpoint_members_are_refused_not_trusted(tmp_path: Path) -> None:
    """A file that reads fine but names crops outside what it covers is not used."""
    batches, live, index = saved_scene(tmp_path)
    path = checkpoint_path(index)
    good = dict(np.load(path, allow_pickle=False))
    with zipfile.ZipFile(path) as z:
        assert "meta.npy" in z.namelist()
    np.savez(path, **{**good, "last_seq": good["last_seq"] + 10**6})
    used, reasons = restore_logs(make(), stored_of(batches, live.cluster_ids(), index))
    assert not used and reasons and "does not cover" in reasons[0]
