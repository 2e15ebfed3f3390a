"""The clustering engine against brute-force oracles and its own batch result."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracles import cosine_oracle, partition
from structlog.testing import capture_logs

from crop_clusterd import defaults
from crop_clusterd.linking import (
    CosineLinker,
    Gating,
    HnswParams,
    LinkBatch,
    Motion,
    Stitch,
    StoredLinks,
    TrackLinker,
    make_linker,
    pair_cosine,
    pairs_above,
)
from crop_clusterd.records import FrameId, Merge, TrapId


def fr(name: str, trap: str = "T", identifier: str = "") -> FrameId:
    """A frame ``name`` of trap folder ``/<trap>``."""
    return FrameId(name, TrapId(f"/{trap}", identifier))


def fids(*names: str) -> tuple[FrameId, ...]:
    """Frames of one trap, one per name."""
    return tuple(fr(n) for n in names)


FORCE_INDEX = HnswParams(brute_force_below=0, k_start=2, chunk=7)
# Every query still full after its first k goes to the dense-group cover.
FORCE_DENSE = HnswParams(brute_force_below=0, k_start=2, chunk=7, dense_k=2)
SEARCHES = {"exact": None, "index": FORCE_INDEX, "dense": FORCE_DENSE}


def clustered(
    rng: np.random.Generator, n: int, dim: int, centres: int, noise: float
) -> npt.NDArray[np.float32]:
    """Unit vectors scattered around a few random centres."""
    c = rng.standard_normal((centres, dim))
    x = c[rng.integers(0, centres, n)] + noise * rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def batch_of(
    emb: npt.NDArray[np.float32],
    times: npt.NDArray[np.float64] | None = None,
    centers: npt.NDArray[np.float64] | None = None,
    frames: list[str | None] | None = None,
) -> LinkBatch:
    n = len(emb)
    return LinkBatch(
        np.ascontiguousarray(emb),
        np.full(n, np.nan) if times is None else times,
        np.full((n, 2), np.nan) if centers is None else centers,
        tuple(None if f is None else fr(f) for f in frames) if frames is not None else (None,) * n,
    )


def stored(
    batch: LinkBatch,
    ids: npt.NDArray[np.int64],
    index_file: Path | None = None,
    covers: int = 0,
    batch_numbers: npt.NDArray[np.int64] | None = None,
) -> StoredLinks:
    """The state-folder record of ``batch`` (one micro-batch unless told)."""
    numbers = np.zeros(len(batch), dtype=np.int64) if batch_numbers is None else batch_numbers
    return StoredLinks(batch, ids, numbers, index_file, covers)


def feed(linker: CosineLinker | TrackLinker, batch: LinkBatch, cuts: list[int]) -> None:
    """Feed a batch in pieces split at ``cuts``."""
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(batch))), len(batch)]
    for lo, hi in itertools.pairwise(bounds):
        linker.add(
            LinkBatch(
                batch.embeddings[lo:hi].copy(),
                batch.times[lo:hi],
                batch.centers[lo:hi],
                batch.frames[lo:hi],
            )
        )


@st.composite
def scenes(draw: st.DrawFn) -> tuple[LinkBatch, float, list[int]]:
    seed = draw(st.integers(0, 2**32 - 1))
    n = draw(st.integers(1, 90))
    dim = draw(st.integers(2, 12))
    rng = np.random.default_rng(seed)
    emb = clustered(rng, n, dim, draw(st.integers(1, 8)), draw(st.floats(0.02, 0.6)))
    times = rng.uniform(0, 900, n).round(draw(st.sampled_from([0, 3])))
    times[rng.random(n) < draw(st.sampled_from([0.0, 0.1]))] = np.nan
    centers = rng.uniform(0, 400, (n, 2))
    centers[rng.random(n) < 0.1] = np.nan
    # Bit-identical copies (a stuck insect): some rows repeat earlier or later ones.
    copies = rng.random(n) < draw(st.sampled_from([0.0, 0.0, 0.5]))
    emb[copies] = emb[rng.integers(0, n, int(copies.sum()))]
    threshold = draw(st.floats(0.3, 0.995))
    cuts = draw(st.lists(st.integers(0, n), max_size=5))
    return batch_of(emb, times, centers), threshold, cuts


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scene=scenes(), gated=st.booleans(), search=st.sampled_from(sorted(SEARCHES)))
def test_cosine_equals_bruteforce_oracle(
    scene: tuple[LinkBatch, float, list[int]], gated: bool, search: str
) -> None:
    batch, threshold, cuts = scene
    gating = Gating() if gated else None
    expected = cosine_oracle(batch.embeddings, threshold, batch.times, batch.centers, gating)

    whole = CosineLinker(threshold, gating, SEARCHES[search])
    whole.add(batch)
    pieces = CosineLinker(threshold, gating, SEARCHES[search])
    feed(pieces, batch, cuts)

    # Same partition and the same ids (smallest member), fed whole or in pieces.
    assert whole.cluster_ids().tolist() == expected
    assert pieces.cluster_ids().tolist() == expected


def test_index_path_equals_oracle_with_many_pairs_near_threshold() -> None:
    """Thousands of pairs within 0.01 of the threshold, through the hnswlib path."""
    rng = np.random.default_rng(7)
    emb = clustered(rng, 6000, 32, 400, 0.33)
    threshold = 0.9
    sims = emb[:500] @ emb.T
    near = np.count_nonzero(np.abs(sims - threshold) < 0.01)
    assert near > 1000, "the data must actually stress the threshold"
    linker = CosineLinker(threshold, None, HnswParams(brute_force_below=0, chunk=1000))
    linker.add(batch_of(emb))
    expected = cosine_oracle(emb, threshold)
    assert partition(linker.cluster_ids()) == partition(expected)
    assert linker.cluster_ids().tolist() == expected


def test_widening_finds_neighbours_beyond_the_first_k() -> None:
    """A cluster far larger than k_start: every member must still be reached."""
    rng = np.random.default_rng(3)
    big = clustered(rng, 300, 16, 1, 0.01)  # 300 near-duplicates of one individual
    other = clustered(rng, 300, 16, 30, 0.05)
    emb = np.vstack([big, other])
    linker = CosineLinker(0.95, None, HnswParams(brute_force_below=0, k_start=2))
    linker.add(batch_of(emb))
    assert linker.cluster_ids().tolist() == cosine_oracle(emb, 0.95)


def near_duplicates(
    rng: np.random.Generator, centre: npt.NDArray[np.float32], n: int, cosine: float
) -> npt.NDArray[np.float32]:
    """``n`` unit vectors around ``centre`` with pairwise cosine about ``cosine``."""
    dim = len(centre)
    spread = np.sqrt(1.0 / cosine - 1.0) / np.sqrt(dim)
    x = centre.astype(np.float64) + spread * rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    out: npt.NDArray[np.float32] = x.astype(np.float32)
    return out


def link_logged(
    emb: npt.NDArray[np.float32], threshold: float, params: HnswParams, cuts: list[int]
) -> tuple[list[int], int]:
    """Cluster ids from feeding ``emb`` in pieces, and how many crops went to the dense cover."""
    linker = CosineLinker(threshold, None, params)
    with capture_logs() as logs:
        feed(linker, batch_of(emb), cuts)
    dense = sum(int(e["dense"]) for e in logs if e["event"] == "hnsw_linked")
    return linker.cluster_ids().tolist(), dense


DENSE_PARAMS = HnswParams(brute_force_below=0, chunk=500)


@pytest.mark.parametrize("cuts", [[], [700, 1100]])
def test_a_stuck_insect_is_one_cluster_equal_to_the_oracle(cuts: list[int]) -> None:
    """Case 5: hundreds of near-duplicates (pairwise ~0.99) among ordinary crops,
    fed whole and in micro-batches: the dense cover runs, and the partition is
    the all-pairs oracle's, the stuck group one cluster."""
    rng = np.random.default_rng(11)
    ordinary = clustered(rng, 900, 32, 120, 0.3)
    stuck = near_duplicates(rng, ordinary[0], 600, 0.99)
    order = rng.permutation(1500)
    emb = np.ascontiguousarray(np.vstack([ordinary, stuck])[order])
    ids, dense = link_logged(emb, 0.9, DENSE_PARAMS, cuts)
    assert dense >= 500, "the stuck crops must take the dense path"
    assert ids == cosine_oracle(emb, 0.9)
    assert len({ids[i] for i in np.flatnonzero(order >= 900)}) == 1


def test_two_dense_groups_joined_by_one_pair_are_one_cluster() -> None:
    """Each end of the bridge has only its own group among its first k
    neighbours, so a search that stops when its results share a cluster would
    lose the one pair that joins the groups."""
    rng = np.random.default_rng(5)
    dim = 24
    a_centre = np.zeros(dim, dtype=np.float32)
    a_centre[0] = 1.0
    b_centre = np.zeros(dim, dtype=np.float32)
    b_centre[0], b_centre[1] = 0.6, 0.8  # cosine 0.6 between the groups
    a = near_duplicates(rng, a_centre, 300, 0.995)
    b = near_duplicates(rng, b_centre, 300, 0.995)
    # The bridge: one crop of each group moved towards the other, cosine 0.93.
    mid = (a_centre + b_centre) / np.linalg.norm(a_centre + b_centre)
    side = (a_centre - b_centre) / np.linalg.norm(a_centre - b_centre)
    half = np.arccos(0.93) / 2
    a[0] = np.cos(half) * mid + np.sin(half) * side
    b[0] = np.cos(half) * mid - np.sin(half) * side
    emb = np.ascontiguousarray(np.vstack([a, b]))
    assert 0.92 < float(emb[0] @ emb[300]) < 0.94
    ids, dense = link_logged(emb, 0.92, DENSE_PARAMS, [])
    assert dense > 0
    assert ids == cosine_oracle(emb, 0.92) == [0] * 600


def test_a_link_from_the_edge_of_one_dense_group_to_the_edge_of_another_is_found() -> None:
    """r is a member of leader p's group (10 degrees from p), s of leader q's
    (10 degrees from q), and r-s is the only link between the groups (22
    degrees), 32 degrees from either leader: beyond the threshold angle of
    both leaders, so only a reach of threshold angle plus cover radius finds it."""
    rng = np.random.default_rng(9)
    dim = 16

    def at(degrees: float) -> npt.NDArray[np.float32]:
        v = np.zeros(dim, dtype=np.float32)
        v[0], v[1] = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
        return v

    p, r, s, q = at(0), at(10), at(32), at(42)
    group_a = np.vstack([p, near_duplicates(rng, p, 200, 0.995), r])
    group_b = np.vstack([q, near_duplicates(rng, q, 200, 0.995), s])
    # Leaders are the first dense crops by sequence number: p, then q.
    emb = np.ascontiguousarray(np.vstack([group_a, group_b]))
    ids, dense = link_logged(emb, 0.92, DENSE_PARAMS, [])
    assert dense == len(emb)
    assert ids == cosine_oracle(emb, 0.92) == [0] * len(emb)


@pytest.mark.parametrize(("cosine", "threshold"), [(0.93, 0.9), (0.97, 0.96), (0.9995, 0.999)])
def test_a_dense_group_straddling_the_threshold_equals_the_oracle(
    cosine: float, threshold: float
) -> None:
    """Groups whose pairs scatter around the threshold: not every member is
    within the cover radius of a leader, and the partition is still exact."""
    rng = np.random.default_rng(int(cosine * 1e4))
    dim = 16
    centres = clustered(rng, 4, dim, 4, 1.0)
    emb = np.vstack([near_duplicates(rng, c, 250, cosine) for c in centres])
    emb = np.ascontiguousarray(emb[rng.permutation(len(emb))])
    ids, dense = link_logged(emb, threshold, DENSE_PARAMS, [400])
    assert dense > 0
    assert ids == cosine_oracle(emb, threshold)


def test_gated_link_found_when_global_neighbours_are_all_out_of_window() -> None:
    """The global k nearest neighbours of the newcomer are all far away in time.

    A global kNN query would return only those and miss the one in-window crop
    that is above the threshold; gating candidates come from the time window.
    """
    rng = np.random.default_rng(11)
    dim = 24
    anchor = rng.standard_normal(dim)
    anchor /= np.linalg.norm(anchor)
    twins = np.repeat(anchor[None, :], 200, axis=0)  # cos 1.0 with the newcomer
    side = rng.standard_normal(dim)
    side -= side @ anchor * anchor
    side /= np.linalg.norm(side)
    in_window = 0.93 * anchor + np.sqrt(1 - 0.93**2) * side  # cos 0.93 >= 0.9
    emb = np.vstack([twins, in_window, anchor]).astype(np.float32)
    times = np.concatenate([np.full(200, 0.0), [10_000.0, 10_010.0]])
    centers = np.zeros((202, 2))
    linker = CosineLinker(0.9, Gating(), HnswParams(brute_force_below=0, k_start=4))
    linker.add(batch_of(emb[:201], times[:201], centers[:201]))
    linker.add(batch_of(emb[201:], times[201:], centers[201:]))
    ids = linker.cluster_ids()
    assert ids[201] == ids[200] == 200
    assert set(ids[:200].tolist()) == {0}


def test_gating_rule_matches_the_old_tool() -> None:
    g = Gating()
    dt = np.array([10.0, 29.9, 30.0, 200.0, 200.0, 299.9, 300.0, np.nan, 10.0])
    dist = np.array([500.0, 1e9, 500.0, 99.0, 100.0, 50.0, 50.0, 0.0, np.nan])
    assert g.supports(dt, dist).tolist() == [
        True, True, False, True, False, True, False, False, True,
    ]  # fmt: skip


def test_merges_record_two_published_clusters_joining() -> None:
    a = np.array([1.0, 0.0, 0.0], dtype=np.float32)
    b = np.array([0.0, 1.0, 0.0], dtype=np.float32)
    bridge = (a + b) / np.linalg.norm(a + b)
    linker = CosineLinker(0.7)
    first = linker.add(batch_of(np.vstack([a, b, a]).astype(np.float32)))
    assert first.merges == ()
    assert linker.cluster_ids().tolist() == [0, 1, 0]
    second = linker.add(batch_of(bridge[None, :].astype(np.float32)))
    assert [(m.from_cluster, m.into_cluster) for m in second.merges] == [(1, 0)]
    assert linker.cluster_ids().tolist() == [0, 0, 0, 0]


def test_index_grows_past_its_initial_capacity() -> None:
    rng = np.random.default_rng(5)
    emb = clustered(rng, 2500, 8, 50, 0.05)
    linker = CosineLinker(0.98, None, HnswParams(brute_force_below=100))
    for lo in range(0, 2500, 100):
        linker.add(batch_of(emb[lo : lo + 100]))
    assert linker.cluster_ids().tolist() == cosine_oracle(emb, 0.98)


def test_dimension_mismatch_is_refused() -> None:
    linker = CosineLinker(0.9)
    linker.add(batch_of(np.eye(3, dtype=np.float32)))
    with pytest.raises(ValueError, match="dimension 4"):
        linker.add(batch_of(np.eye(4, dtype=np.float32)))


def test_unknown_method_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown clustering method 'kmeans'"):
        make_linker("kmeans", 0.9)


# -- track -----------------------------------------------------------------------


@st.composite
def trap_sessions(draw: st.DrawFn) -> tuple[LinkBatch, float, int]:
    """Individuals that persist over frames, with look-alikes in the same frame."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n_ind = draw(st.integers(1, 8))
    frames = draw(st.integers(1, 12))
    dim = 8
    identity = clustered(rng, n_ind, dim, draw(st.integers(1, n_ind)), 0.3)
    position = rng.uniform(0, 600, (n_ind, 2))
    emb, times, names, centers = [], [], [], []
    for f in range(frames):
        present = rng.permutation(n_ind)[: rng.integers(0, n_ind + 1)]
        # Individuals drift, and now and then hop further than the move limit.
        position += (
            rng.normal(0, 40, position.shape) * np.where(rng.random(n_ind) < 0.1, 5, 1)[:, None]
        )
        for i in present:
            v = identity[i] + draw(st.floats(0.0, 0.2)) * rng.standard_normal(dim)
            emb.append(v / np.linalg.norm(v))
            times.append(2.0 * f)
            names.append(f"2024{f:04d}")
            centers.append(position[i] if rng.random() > 0.1 else (np.nan, np.nan))
    if not emb:
        emb, times, names, centers = [identity[0]], [0.0], ["20240000"], [(0.0, 0.0)]
    batch = LinkBatch(
        np.array(emb, dtype=np.float32), np.array(times), np.array(centers), fids(*names)
    )
    return batch, draw(st.floats(0.3, 0.95)), draw(st.integers(0, 3))


@settings(max_examples=120, deadline=None)
@given(
    session=trap_sessions(),
    gated=st.booleans(),
    stitch=st.sampled_from([None, Stitch(), Stitch(0.5, gap_frames=4, max_move=0.3)]),
    margin=st.sampled_from([0.0, defaults.TRACK_MARGIN]),
)
def test_track_invariants_and_incremental_equals_batch(
    session: tuple[LinkBatch, float, int], gated: bool, stitch: Stitch | None, margin: float
) -> None:
    batch, threshold, _ = session
    # Positions lie within 600 px: the diagonal estimate is its 1,000 px floor.
    motion = Motion(max_move=0.15) if gated else None
    options = {"idle_frames": 2, "stitch": stitch, "margin": margin}
    whole = TrackLinker(threshold, motion, **options)  # type: ignore[arg-type]
    whole.add(batch)
    ids = whole.cluster_ids()

    # Frames arriving one at a time, in time order, give the batch result, and
    # the merges reported on the way lead every id given out to the final one.
    live = TrackLinker(threshold, motion, **options)  # type: ignore[arg-type]
    frames = batch.frames
    given_out: dict[int, int] = {}
    for frame in dict.fromkeys(frames):
        idx = [i for i, f in enumerate(frames) if f == frame]
        result = live.add(
            LinkBatch(
                batch.embeddings[idx].copy(),
                batch.times[idx],
                batch.centers[idx],
                tuple(frames[i] for i in idx),
            )
        )
        for merge in result.merges:
            given_out = {s: merge.into_cluster if c == merge.from_cluster else c
                         for s, c in given_out.items()}  # fmt: skip
        given_out.update(zip(idx, live.cluster_of(np.array(idx)).tolist(), strict=True))
    assert live.cluster_ids().tolist() == ids.tolist()
    assert [given_out[i] for i in range(len(ids))] == ids.tolist()

    # Never two crops of one frame in one cluster; ids are the smallest member.
    for cluster in set(ids.tolist()):
        members = np.nonzero(ids == cluster)[0]
        assert members.min() == cluster
        assert len({frames[m] for m in members}) == len(members)
    # Each crop that continued a cluster is similar enough to some earlier member
    # (a stitch joins tracklets by their mean embeddings instead).
    for seq in range(len(batch)) if stitch is None else ():
        earlier = [m for m in np.nonzero(ids == ids[seq])[0] if m < seq]
        if earlier:
            sims = pair_cosine(batch.embeddings, np.full(len(earlier), seq), np.array(earlier))
            assert sims.max() >= threshold


def test_track_assignment_is_optimal_not_greedy() -> None:
    """Greedy would give crop x the best cluster and strand crop y."""
    a = np.array([1.0, 0.0], dtype=np.float32)
    b = np.array([0.8, 0.6], dtype=np.float32)
    x = np.array([0.9, np.sqrt(1 - 0.81)], dtype=np.float32)  # close to both
    y = np.array([1.0, 0.0], dtype=np.float32)  # only close to a
    emb = np.vstack([a, b, x, y]).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    frames = fids("f0", "f0", "f1", "f1")
    linker = TrackLinker(0.9, memory=1)
    linker.add(LinkBatch(emb, np.array([0.0, 0.0, 2.0, 2.0]), np.zeros((4, 2)), frames))
    # Optimal: y -> a (1.0), x -> b (0.98); greedy x -> a would leave y alone.
    assert linker.cluster_ids().tolist() == [0, 1, 1, 0]


def test_track_prefers_the_nearer_of_two_equally_similar_clusters() -> None:
    v = np.array([1.0, 0.0], dtype=np.float32)
    emb = np.repeat(v[None, :], 3, axis=0)
    centers = np.array([[0.0, 0.0], [250.0, 0.0], [240.0, 5.0]])
    frames = fids("f0", "f0", "f1")
    linker = TrackLinker(0.9, Motion(max_move=0.3, penalty=0.3), margin=0.0)
    linker.add(LinkBatch(emb, np.array([0.0, 0.0, 2.0]), centers, frames))
    assert linker.cluster_ids().tolist() == [0, 1, 1]
    # Without positions the tie goes to the first cluster; the motion term decided.
    blind = TrackLinker(0.9, None, margin=0.0)
    blind.add(LinkBatch(emb.copy(), np.array([0.0, 0.0, 2.0]), centers, frames))
    assert blind.cluster_ids().tolist() == [0, 1, 0]


def test_track_never_continues_beyond_max_move() -> None:
    v = np.array([[1.0, 0.0]], dtype=np.float32)
    # A 1,000 x 1,000 frame: a diagonal of 1,414 px, a move limit of 141 px.
    linker = TrackLinker(0.9, Motion(max_move=0.1), stitch=None)
    size = np.array([[1000.0, 1000.0]])
    for f, x in enumerate((0.0, 130.0, 300.0)):
        centre = np.array([[x, 0.0]])
        linker.add(LinkBatch(v.copy(), np.array([2.0 * f]), centre, (fr(f"f{f}"),), size))
    assert linker.cluster_ids().tolist() == [0, 0, 2]


def test_track_compares_with_the_latest_crops_not_only_the_last() -> None:
    a = np.array([1.0, 0.0], dtype=np.float32)
    blurred = np.array([0.6, 0.8], dtype=np.float32)  # cos 0.6 with a
    emb = np.vstack([a, blurred, a]).astype(np.float32)
    frames = fids("f0", "f1", "f2")
    times = np.array([0.0, 2.0, 4.0])
    for memory, expected in ((1, [0, 0, 2]), (3, [0, 0, 0])):
        linker = TrackLinker(0.55, None, memory=memory, margin=0.0)
        # A low threshold lets the blurred crop continue the cluster; a strict one
        # for the sharp crop after it: only memory reaches back past the blur.
        linker.add(LinkBatch(emb[:2].copy(), times[:2], np.zeros((2, 2)), frames[:2]))
        linker.threshold = 0.9
        linker.add(LinkBatch(emb[2:].copy(), times[2:], np.zeros((1, 2)), frames[2:]))
        assert linker.cluster_ids().tolist() == expected, memory


def test_track_cluster_expires_after_the_idle_cap() -> None:
    v = np.array([[1.0, 0.0]], dtype=np.float32)
    linker = TrackLinker(0.9, None, idle_cap_s=300.0, stitch=None)
    for t in (0.0, 300.0, 601.0):
        linker.add(LinkBatch(v.copy(), np.array([t]), np.zeros((1, 2)), (fr(f"f{t}"),)))
    assert linker.cluster_ids().tolist() == [0, 0, 2]


def test_track_without_times_counts_frames() -> None:
    v = np.array([[1.0, 0.0]], dtype=np.float32)
    linker = TrackLinker(0.9, None, idle_frames=2, memory=1)
    emb = np.repeat(v, 5, axis=0)
    frames = fids("a", "b", "c", "d", "e")
    # a, then nothing matching for two frames (other crops), then e
    other = np.array([0.0, 1.0], dtype=np.float32)
    emb[1] = emb[2] = emb[3] = other
    linker.add(LinkBatch(emb, np.full(5, np.nan), np.zeros((5, 2)), frames))
    ids = linker.cluster_ids().tolist()
    assert ids[:4] == [0, 1, 1, 1]
    assert ids[4] == 4  # a was last seen 4 frames before e: expired


# --- persistence (the daemon's restarts) ------------------------------------------------


def sub(batch: LinkBatch, lo: int, hi: int) -> LinkBatch:
    return LinkBatch(
        batch.embeddings[lo:hi].copy(),
        batch.times[lo:hi],
        batch.centers[lo:hi],
        batch.frames[lo:hi],
    )


@pytest.mark.parametrize("gating", [None, Gating()])
def test_restored_linker_goes_on_exactly_like_one_that_never_stopped(
    tmp_path: Path, gating: Gating | None
) -> None:
    rng = np.random.default_rng(4)
    emb = clustered(rng, 600, 16, 40, 0.15)
    times = np.sort(rng.uniform(0, 2000, 600))
    centers = rng.uniform(0, 300, (600, 2))
    whole = batch_of(emb, times, centers)
    params = HnswParams(brute_force_below=0, k_start=4)
    before = CosineLinker(0.95, gating, params)
    merges: list[Merge] = []
    for lo in range(0, 400, 50):
        merges.extend(before.add(sub(whole, lo, lo + 50)).merges)
    index_file = tmp_path / "index.hnsw"
    covers = before.save(index_file)
    assert covers == (0 if gating is not None else 400)
    # The daemon stores each crop's id at commit plus the merges; restore from
    # the current ids, as store.current_clusters computes them.
    restored = CosineLinker(0.95, gating, params)
    used = restored.restore(stored(sub(whole, 0, 400), before.cluster_ids(), index_file, covers))
    assert used == (gating is None)
    for lo in range(400, 600, 50):
        restored.add(sub(whole, lo, lo + 50))
        before.add(sub(whole, lo, lo + 50))
    assert partition(restored.cluster_ids()) == partition(before.cluster_ids())
    assert np.array_equal(restored.cluster_ids(), before.cluster_ids())
    expected = cosine_oracle(emb, 0.95, times=times if gating else None,
                             centers=centers if gating else None, gating=gating)  # fmt: skip
    assert partition(restored.cluster_ids()) == partition(expected)


def test_a_saved_index_that_does_not_match_the_state_is_rebuilt(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    emb = clustered(rng, 300, 8, 20, 0.1)
    whole = batch_of(emb)
    params = HnswParams(brute_force_below=0)
    first = CosineLinker(0.95, None, params)
    first.add(sub(whole, 0, 200))
    index_file = tmp_path / "index.hnsw"
    first.save(index_file)
    restored = CosineLinker(0.95, None, params)
    # The state says 250 crops were covered: the file (200) is not used.
    assert not restored.restore(stored(sub(whole, 0, 250), np.arange(250), index_file, 250))
    index_file.write_bytes(b"garbage")
    again = CosineLinker(0.95, None, params)
    assert not again.restore(stored(sub(whole, 0, 200), first.cluster_ids(), index_file, 200))
    again.add(sub(whole, 200, 300))
    first.add(sub(whole, 200, 300))
    assert partition(again.cluster_ids()) == partition(first.cluster_ids())


@pytest.mark.parametrize("block", [1, 3, 7, 50, 1000])
@pytest.mark.parametrize("prefix", [False, True])
def test_blocked_product_gives_the_pairs_of_a_brute_force_product(block: int, prefix: bool) -> None:
    rng = np.random.default_rng(11)
    emb = clustered(rng, 60, 8, 5, 0.2)
    rows = rng.permutation(60)[:37].astype(np.int64)
    col_ids = np.arange(45, dtype=np.int64) if prefix else rng.permutation(60)[:29]
    cols: npt.NDArray[np.int64] | int = 45 if prefix else col_ids
    floor = 0.7
    found = [
        (int(a), int(b), float(s))
        for pairs in pairs_above(emb, rows, cols, floor, block=block)
        for a, b, s in zip(pairs.a, pairs.b, pairs.approx, strict=True)
    ]
    a_all, b_all = np.repeat(rows, len(col_ids)), np.tile(col_ids, len(rows))
    exact = pair_cosine(emb, a_all, b_all)
    # float32 products may differ from the float64 definition by < 1e-5 only.
    sure = {
        (int(a), int(b)) for a, b, s in zip(a_all, b_all, exact, strict=True) if s >= floor + 1e-5
    }
    maybe = {
        (int(a), int(b)) for a, b, s in zip(a_all, b_all, exact, strict=True) if s >= floor - 1e-5
    }
    pairs_found = [(a, b) for a, b, _ in found]
    assert len(pairs_found) == len(set(pairs_found))
    assert sure <= set(pairs_found) <= maybe
    assert len(sure) > 20
    # Row-major order whatever the block size: rows in the order given.
    position = {int(r): i for i, r in enumerate(rows)}
    assert [position[a] for a, _, _ in found] == sorted(position[a] for a, _, _ in found)
    for a, b, s in found:
        assert abs(s - float(pair_cosine(emb, np.array([a]), np.array([b]))[0])) < 1e-5


def test_track_restore_without_a_checkpoint_replays_every_micro_batch() -> None:
    rng = np.random.default_rng(12)
    n = 120
    emb = clustered(rng, n, 8, 6, 0.1)
    times = np.repeat(np.arange(n // 4, dtype=np.float64) * 10.0, 4)
    frames: list[str | None] = [f"f{i // 4}" for i in range(n)]
    whole = batch_of(emb, times, rng.uniform(0, 200, (n, 2)), frames)
    before = TrackLinker(0.8)
    numbers = np.repeat(np.arange(6), 20).astype(np.int64)
    for b in range(6):
        before.add(sub(whole, 20 * b, 20 * b + 20))
    restored = TrackLinker(0.8)
    with capture_logs() as logs:
        used = restored.restore(stored(whole, before.cluster_ids(), None, 0, numbers))
    assert not used
    assert not [e for e in logs if e["event"] == "replay_differs"]
    assert np.array_equal(restored.cluster_ids(), before.cluster_ids())


def test_track_restore_warns_when_the_replay_differs_from_the_stored_ids() -> None:
    rng = np.random.default_rng(13)
    emb = clustered(rng, 40, 8, 4, 0.1)
    whole = batch_of(emb, np.arange(40, dtype=np.float64), None, [f"f{i}" for i in range(40)])
    reference = TrackLinker(0.8)
    reference.add(whole)
    wrong = np.zeros(40, dtype=np.int64)  # as if everything were one cluster
    differ = int(np.count_nonzero(reference.cluster_ids() != wrong))
    assert differ > 0
    restored = TrackLinker(0.8)
    with capture_logs() as logs:
        restored.restore(stored(whole, wrong))
    warnings = [e for e in logs if e["event"] == "replay_differs"]
    assert len(warnings) == 1 and warnings[0]["crops"] == differ
    # The replay is kept: it is what the linker goes on from.
    assert np.array_equal(restored.cluster_ids(), reference.cluster_ids())


def test_restore_needs_a_fresh_linker_and_consistent_state() -> None:
    emb = clustered(np.random.default_rng(14), 10, 4, 2, 0.1)
    whole = batch_of(emb)
    for linker in (CosineLinker(0.9), TrackLinker(0.9)):
        linker.add(whole)
        with pytest.raises(RuntimeError):
            linker.restore(stored(whole, np.arange(10)))
    with pytest.raises(ValueError):
        stored(whole, np.arange(9))
    with pytest.raises(ValueError):
        CosineLinker(0.9).restore(stored(whole, np.arange(10) + 1))


@pytest.mark.parametrize("index", [False, True], ids=["exact", "hnsw"])
@pytest.mark.parametrize("gated", [False, True])
def test_cosine_with_traps_equals_the_oracle_of_each_trap(index: bool, gated: bool) -> None:
    """Three traps over the same look-alike crops, fed in pieces: the partition is
    the union of each trap's own all-pairs oracle (no pair crosses traps)."""
    rng = np.random.default_rng(7)
    n = 240
    emb = clustered(rng, n, 12, 8, 0.25)
    times = rng.uniform(0, 200, n)
    centers = rng.uniform(0, 400, (n, 2))
    traps = rng.integers(0, 3, n)
    frames = tuple(fr(f"f{int(t)}", f"trap{k}") for t, k in zip(times, traps, strict=True))
    gating = Gating() if gated else None
    linker = CosineLinker(0.8, gating, FORCE_INDEX if index else None)
    for lo in range(0, n, 50):
        hi = min(lo + 50, n)
        linker.add(LinkBatch(emb[lo:hi].copy(), times[lo:hi], centers[lo:hi], frames[lo:hi]))
    expected: set[frozenset[int]] = set()
    for k in range(3):
        members = np.flatnonzero(traps == k)
        ids = cosine_oracle(emb[members], 0.8, times[members], centers[members], gating)
        expected |= {frozenset(int(members[i]) for i in g) for g in partition(ids)}
    got = partition(linker.cluster_ids())
    assert got == expected
    assert any(len(g) > 1 for g in got), "a trivial partition would prove nothing"
