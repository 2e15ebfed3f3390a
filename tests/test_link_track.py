"""``track`` limits that fit the trap, margin matching and stitching (issue 11)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from crop_clusterd.linking import LinkBatch, Motion, Stitch, TrackLinker
from crop_clusterd.records import FrameId, TrapId

TRAP = TrapId("/trap", "")
DIM = 32


def unit(v: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    out: npt.NDArray[np.float64] = v / np.linalg.norm(v, axis=-1, keepdims=True)
    return out


class Scene:
    """Crops frame by frame: each an embedding, a time, a centre and a frame size."""

    def __init__(self) -> None:
        self.emb: list[npt.NDArray[np.float64]] = []
        self.times: list[float] = []
        self.centers: list[tuple[float, float]] = []
        self.frames: list[FrameId] = []
        self.sizes: list[tuple[float, float]] = []

    def crop(
        self,
        frame: int,
        t: float,
        vector: npt.NDArray[np.float64],
        at: tuple[float, float],
        size: tuple[float, float] = (np.nan, np.nan),
    ) -> int:
        self.emb.append(unit(vector))
        self.times.append(t)
        self.centers.append(at)
        self.frames.append(FrameId(f"2024{frame:06d}", TRAP))
        self.sizes.append(size)
        return len(self.emb) - 1

    def batch(self) -> LinkBatch:
        return LinkBatch(
            np.array(self.emb, dtype=np.float32),
            np.array(self.times),
            np.array(self.centers, dtype=np.float64),
            tuple(self.frames),
            np.array(self.sizes, dtype=np.float64),
        )


def clusters(linker: TrackLinker, scene: Scene) -> list[int]:
    linker.add(scene.batch())
    ids: list[int] = linker.cluster_ids().tolist()
    return ids


def test_a_trap_with_one_frame_a_minute_keeps_its_tracks() -> None:
    """Every frame a minute apart, A missed for 3 frames (3 minutes): the track
    waits its idle limit in frames of its trap (4 by default: 8 s at a frame
    every 2 s, 4 minutes here), not in seconds."""
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, DIM))
    scene = Scene()
    seen = [f for f in range(20) if not 5 <= f < 8]
    for f in range(20):
        if f in seen:
            scene.crop(f, 60.0 * f, a + 0.1 * rng.standard_normal(DIM), (500.0, 500.0))
        scene.crop(f, 60.0 * f, b + 0.1 * rng.standard_normal(DIM), (1500.0, 900.0))
    ids = clusters(TrackLinker(0.7, Motion(), stitch=None), scene)
    assert len(set(ids)) == 2
    # The time cap still ends a track that waited longer than it.
    capped = TrackLinker(0.7, Motion(), idle_cap_s=200.0, stitch=None)
    assert len(set(clusters(capped, scene))) == 3


def test_a_trap_with_frames_4000_px_wide_keeps_its_tracks() -> None:
    """Moves of 400 px a frame: large in pixels, small (8%) in a 4000 x 3000 frame,
    whether the size comes from the metadata or is estimated from the boxes."""
    rng = np.random.default_rng(2)
    looks = rng.standard_normal((3, DIM))
    for size in ((4000.0, 3000.0), (np.nan, np.nan)):
        scene = Scene()
        for f in range(12):
            for i, look in enumerate(looks):
                x = 300.0 + 400.0 * f if i < 2 else 3900.0 - 300.0 * f
                y = 400.0 + 1000.0 * i
                scene.crop(f, 2.0 * f, look + 0.1 * rng.standard_normal(DIM), (x, y), size)
        ids = np.array(clusters(TrackLinker(0.7, Motion(), stitch=None), scene))
        # Sequence order is frame by frame, three crops each: one track per look.
        assert [len(set(ids[i::3].tolist())) for i in range(3)] == [1, 1, 1], size
        assert len(set(ids.tolist())) == 3


def test_in_a_small_frame_the_same_moves_break_the_track() -> None:
    """The limit is relative: the 400 px moves are 40% of a 1000 x 300 frame."""
    rng = np.random.default_rng(3)
    look = rng.standard_normal(DIM)
    scene = Scene()
    for f in range(4):
        scene.crop(f, 2.0 * f, look, (100.0 + 400.0 * f, 150.0), (1000.0, 300.0))
    assert len(set(clusters(TrackLinker(0.7, Motion(), stitch=None), scene))) == 4


def test_margin_prefers_one_good_match_to_two_mediocre_ones() -> None:
    """x is very like track A (0.95) and fairly like B (0.7); y fairly like A
    only (0.7). Summed similarity gives x to B and y to A (1.4 > 0.95); with
    the margin each match must beat starting a new track, and x -> A wins."""
    e = np.eye(DIM)
    a = e[0]
    b = 0.6 * e[0] + 0.8 * e[1]
    x = 0.95 * e[0] + 0.1625 * e[1] + np.sqrt(1 - 0.95**2 - 0.1625**2) * e[2]
    y = 0.7 * e[0] - 0.275 * e[1] + np.sqrt(1 - 0.7**2 - 0.275**2) * e[3]
    assert np.allclose([x @ a, x @ b, y @ a, y @ b], [0.95, 0.7, 0.7, 0.2])

    def run(margin: float) -> list[int]:
        scene = Scene()
        scene.crop(0, 0.0, a, (100.0, 100.0))
        scene.crop(0, 0.0, b, (200.0, 100.0))
        scene.crop(1, 2.0, x, (150.0, 100.0))
        scene.crop(1, 2.0, y, (150.0, 120.0))
        return clusters(TrackLinker(0.5, None, margin=margin, stitch=None, memory=1), scene)

    assert run(0.0) == [0, 1, 1, 0]  # the swap: two mediocre matches
    assert run(0.5) == [0, 1, 0, 3]  # x continues A; y starts a track of its own


def blurred_insect(seed: int) -> tuple[Scene, list[int], list[int]]:
    """One insect sitting still for 30 frames, every third frame blurred: the
    blurred crops are like each other (~0.99) but below the crop threshold to
    the sharp ones (~0.89). The stitch threshold here (0.85) is below the crop
    threshold (0.92): the test checks the mechanism, not the defaults."""
    rng = np.random.default_rng(seed)
    sharp = unit(rng.standard_normal(DIM))
    blur = unit(rng.standard_normal(DIM))
    scene = Scene()
    sharp_seqs, blurred_seqs = [], []
    for f in range(30):
        at = (800.0 + rng.normal(0, 5), 600.0 + rng.normal(0, 5))
        if f % 3 == 2:
            v = sharp + 0.5 * blur + 0.02 * rng.standard_normal(DIM)
            blurred_seqs.append(scene.crop(f, 2.0 * f, v, at, (2000.0, 1500.0)))
        else:
            v = sharp + 0.02 * rng.standard_normal(DIM)
            sharp_seqs.append(scene.crop(f, 2.0 * f, v, at, (2000.0, 1500.0)))
    return scene, sharp_seqs, blurred_seqs


def track_settings(stitch: Stitch | None) -> TrackLinker:
    return TrackLinker(0.92, Motion(), idle_frames=4, margin=0.3, stitch=stitch, memory=2)


STITCH = Stitch(threshold=0.85, gap_frames=8, max_move=0.1)


def test_stitching_joins_the_blurred_half_of_one_insect() -> None:
    scene, sharp, blurred = blurred_insect(4)
    emb = np.array(scene.emb)
    assert (emb[sharp] @ emb[blurred].T).max() < 0.92  # no single crop links them
    # The insect then leaves: its tracklets close 8 frames later, then stitch.
    last = len(scene.emb)
    rng = np.random.default_rng(5)
    for f in range(30, 45):
        scene.crop(f, 2.0 * f, rng.standard_normal(DIM), (100.0, 100.0), (2000.0, 1500.0))
    apart = np.array(clusters(track_settings(None), scene))
    assert len(set(apart[:last].tolist())) == 2
    joined = np.array(clusters(track_settings(STITCH), scene))
    assert len(set(joined[:last].tolist())) == 1
    # Never two crops of one frame in a cluster: the halves share no frame.
    assert set(joined[sharp].tolist()) == set(joined[blurred].tolist())


def test_stitching_joins_an_interrupted_track_not_another_insect_elsewhere() -> None:
    """A is missed for 6 frames (past the idle limit) and comes back where it
    was; B, the same look (a look-alike), appears far away meanwhile."""
    rng = np.random.default_rng(6)
    look = rng.standard_normal(DIM)
    scene = Scene()
    size = (2000.0, 1500.0)
    a1, a2, far = [], [], []
    for f in range(40):

        def seen(at: tuple[float, float], f: int = f) -> int:
            return scene.crop(f, 2.0 * f, look + 0.05 * rng.standard_normal(DIM), at, size)

        if f < 10:
            a1.append(seen((500.0, 500.0)))
        elif 16 <= f < 26:
            a2.append(seen((520.0, 510.0)))
        if 12 <= f < 22:
            far.append(seen((1800.0, 1300.0)))
        if f >= 26:  # something else, so frames go on and the tracklets close
            scene.crop(f, 2.0 * f, rng.standard_normal(DIM), (100.0, 1400.0), size)
    apart = np.array(clusters(track_settings(None), scene))
    assert apart[a1[0]] != apart[a2[0]]
    ids = np.array(clusters(track_settings(STITCH), scene))
    assert len(set(ids[a1 + a2].tolist())) == 1
    assert not set(ids[far].tolist()) & set(ids[a1 + a2].tolist())


def test_a_stitch_is_reported_as_a_merge_once_its_window_has_passed() -> None:
    """Fed frame by frame, the stitch comes as a merge of two published clusters,
    in the frame where the earlier tracklet's window closes."""
    scene, _, _ = blurred_insect(4)
    rng = np.random.default_rng(5)
    for f in range(30, 45):
        scene.crop(f, 2.0 * f, rng.standard_normal(DIM), (100.0, 100.0), (2000.0, 1500.0))
    whole = scene.batch()
    linker = track_settings(STITCH)
    merges_at: list[int] = []
    for frame in dict.fromkeys(whole.frames):
        assert frame is not None
        rows = np.array([i for i, g in enumerate(whole.frames) if g == frame])
        result = linker.add(whole.rows(rows))
        merges_at += [int(frame.name[4:])] * len(result.merges)
        for merge in result.merges:
            assert merge.into_cluster < merge.from_cluster < result.seqs.start
    # The halves' last crops are in frames 28 and 29; the first to close (the
    # blurred one) does so when its window (8 frames) has passed: frame 37.
    assert merges_at == [28 + STITCH.gap_frames + 1]
    batch = track_settings(STITCH)
    batch.add(whole)
    assert linker.cluster_ids().tolist() == batch.cluster_ids().tolist()
