"""The clustering engine: assigns crops to clusters (individuals) incrementally.

Two methods share one interface, :class:`Linker`. Crops arrive one micro-batch
at a time through :meth:`Linker.add`; the batch command is the same engine fed
in one go, so the live daemon and the batch command cannot disagree.

``cosine`` (the old tool's rule, without its bugs)
    Two crops link when their cosine similarity is >= ``threshold`` and, when
    gating is on, the link has spatio-temporal support::

        (center_dist < max_center_dist_px and |dt| < near_window_s) or |dt| < any_window_s

    Clusters are the connected components of that graph. The result is exactly
    the partition of a brute-force all-pairs oracle: nothing is chunked and no
    n x n matrix is built. Without gating, candidate neighbours come from an
    hnswlib inner-product index whose query widens k until the k-th neighbour
    falls below the threshold; with gating, candidates are every crop inside
    the gating time window, compared exactly. Every candidate is confirmed
    with the exact similarity (:func:`pair_cosine`), so approximation can only
    ever cost recall, which the widening query and the tests guard.

``track`` (one individual appears at most once per frame)
    Frames are processed in time order; each frame's crops are matched
    one-to-one to the clusters still active (seen within ``track_gap_s``, or
    ``track_gap_frames`` frames for crops without a time) by an optimal
    assignment that maximises the summed similarity to each cluster's most
    recent crop. Pairs below the threshold (or without gating support) are
    never matched; unmatched crops start new clusters. Two crops of one frame
    never share a cluster.

Cluster ids: every crop gets a sequence number in arrival order (the batch
command feeds files in sorted filename order). A cluster's id is the sequence
number of its earliest member, so ids only change when clusters merge, and then
the smaller id survives (:class:`~crop_clusterd.records.Merge`).
"""

from __future__ import annotations

import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import hnswlib
import numpy as np
import numpy.typing as npt
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .log import get_logger
from .records import Embedded, Merge

log = get_logger(__name__)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# The old tool's threshold; the cosine default everywhere.
COSINE_DEFAULT_THRESHOLD = 0.9

# Track thresholds chosen on the simulator's ground truth (scripts/bench_methods.py,
# see README "Benchmarks"). efficientnet-lite0: 0.65 had the best ARI averaged over
# seeds 0 and 1 (340 frames, ~5,200 crops each) with metadata and the default Motion.
# dino and hierarchical were NOT benchmarked: placeholders until someone measures them.
TRACK_DEFAULT_THRESHOLDS: dict[str, float] = {
    "efficientnet-lite0": 0.65,
    "dino": 0.6,
    "hierarchical": 0.8,
}

METHODS = ("cosine", "track")

# Candidate similarities come from float32 arithmetic (hnswlib's 1 - <a, b>, or a
# float32 matrix product), whose error for unit vectors is below 1e-5. Candidates
# are gathered from this margin below the threshold, and any pair within it of the
# threshold is settled with the exact float64 definition (pair_cosine).
_FLOAT32_MARGIN = 1e-4

# A query that cannot find its own crop even at this ef is settled exactly.
_MAX_EF = 4096


def default_threshold(method: str, embedder: str) -> float:
    """Return the default threshold for a linking method and an embedder name."""
    if method == "track":
        return TRACK_DEFAULT_THRESHOLDS.get(embedder, COSINE_DEFAULT_THRESHOLD)
    return COSINE_DEFAULT_THRESHOLD


def pair_cosine(embeddings: npt.NDArray[np.float32], a: IntArray, b: IntArray) -> FloatArray:
    """Exact cosine of the pairs ``(a[i], b[i])`` of L2-normalised float32 rows.

    This is the definition the engine and its tests share: a float64 dot product
    of the stored float32 vectors.
    """
    if len(a) == 0:
        return np.empty(0, dtype=np.float64)
    left = embeddings[a].astype(np.float64)
    right = embeddings[b].astype(np.float64)
    sims: FloatArray = np.einsum("ij,ij->i", left, right)
    return sims


@dataclass(frozen=True, slots=True)
class Gating:
    """Spatio-temporal support a link needs (the old tool's rule and defaults)."""

    max_center_dist_px: float = 100.0
    near_window_s: float = 300.0
    any_window_s: float = 30.0

    @property
    def window_s(self) -> float:
        """No link is possible between crops further apart in time than this."""
        return max(self.near_window_s, self.any_window_s)

    def supports(
        self,
        dt: FloatArray,
        dist: FloatArray,
    ) -> npt.NDArray[np.bool_]:
        """Whether pairs with time gaps ``dt`` and centre distances ``dist`` may link.

        NaN (unknown) compares false: a crop without a time never links, one
        without a box links on time alone.
        """
        dt = np.abs(dt)
        with np.errstate(invalid="ignore"):
            near = (dt < self.near_window_s) & (dist < self.max_center_dist_px)
            return np.asarray((dt < self.any_window_s) | near)


@dataclass(frozen=True, slots=True)
class Motion:
    """How far an individual moves between its crops, for ``track``.

    A crop may continue a cluster only within ``max_move_px`` of the cluster's
    last box centre, and the assignment prefers near clusters: a match scores
    its similarity minus ``penalty * min(distance / max_move_px, 1)``. A crop
    or cluster without a known position may match at the full penalty.
    """

    max_move_px: float = 300.0
    penalty: float = 0.3


@dataclass(frozen=True, slots=True)
class HnswParams:
    """Index and query settings for the ungated cosine search.

    Measured on clustered 384-d data (scripts/check_oracle.py): M=32 misses ten
    times fewer neighbours above the threshold than M=16 at the same ef, for
    about 20% more build time.
    """

    m: int = 32
    ef_construction: int = 100
    # Query candidate list size. A large batch is indexed whole before any of it
    # is queried, so a pair inside it is searched from both ends, and pairs that
    # share one of their three nearest anchors are linked exactly beforehand.
    # With both, ef=64 and ef=128 matched the all-pairs oracle exactly at 200,000
    # crops (without the anchor pairs they lost a few dozen links there); 128
    # keeps a margin for a million (scripts/check_oracle.py).
    ef_search: int = 128
    k_start: int = 16
    # Below this many crops an exact search is faster than keeping an index.
    brute_force_below: int = 4096
    threads: int = 0  # 0 = all cores
    chunk: int = 20_000
    seed: int = 100
    # From this many lost queries in one batch on, they are settled through a
    # side index (see CosineLinker._settle_lost) instead of retries and exact
    # search; below it, retrying is cheaper.
    side_index_from: int = 1024
    side_ef: int = 32


@dataclass(frozen=True)
class LinkBatch:
    """Columns of one micro-batch as the engine needs them.

    ``embeddings`` float32 n x d, L2-normalised; ``times`` seconds (NaN unknown);
    ``centers`` n x 2 pixels (NaN unknown); ``frames`` the flat-bug frame of
    each crop (None when the name is not a flat-bug name).
    """

    embeddings: npt.NDArray[np.float32]
    times: FloatArray
    centers: FloatArray
    frames: tuple[str | None, ...]

    def __post_init__(self) -> None:
        n = len(self.embeddings)
        if self.embeddings.ndim != 2 or self.embeddings.dtype != np.float32:
            raise ValueError("embeddings must be a float32 n x d array")
        if self.times.shape != (n,) or self.centers.shape != (n, 2) or len(self.frames) != n:
            raise ValueError("times, centers and frames must have one entry per embedding")

    def __len__(self) -> int:
        return len(self.embeddings)

    @classmethod
    def from_embeddings(cls, embeddings: npt.NDArray[np.float32]) -> LinkBatch:
        """A batch with no time, position or frame (e.g. from an embeddings pickle)."""
        n = len(embeddings)
        return cls(
            embeddings=embeddings,
            times=np.full(n, np.nan),
            centers=np.full((n, 2), np.nan),
            frames=(None,) * n,
        )

    @classmethod
    def from_embedded(cls, items: Sequence[Embedded]) -> LinkBatch:
        """Build the columns from embedded crops."""
        n = len(items)
        if n == 0:
            raise ValueError("empty batch")
        embeddings = np.stack([item.vector for item in items]).astype(np.float32, copy=False)
        times = np.array(
            [np.nan if item.crop.time is None else item.crop.time for item in items],
            dtype=np.float64,
        )
        centers = np.array(
            [
                item.crop.center if item.crop.center is not None else (np.nan, np.nan)
                for item in items
            ],
            dtype=np.float64,
        ).reshape(n, 2)
        return cls(embeddings, times, centers, tuple(item.crop.frame for item in items))


@dataclass(frozen=True, slots=True)
class AddResult:
    """What one :meth:`Linker.add` did: the new crops' sequence numbers and merges."""

    seqs: range
    merges: tuple[Merge, ...] = ()


class _Columns:
    """Growable per-crop columns; the first large batch is adopted without a copy.

    Adopting matters for the batch path: one million 384-d embeddings are 1.5 GB
    and the memory budget is three times that, index included.
    """

    def __init__(self) -> None:
        self.n = 0
        self.dim = 0
        self.embeddings: npt.NDArray[np.float32] = np.empty((0, 0), dtype=np.float32)
        self.times: FloatArray = np.empty(0)
        self.centers: FloatArray = np.empty((0, 2))
        self.frames: list[str | None] = []

    def append(self, batch: LinkBatch) -> range:
        n_new = len(batch)
        start = self.n
        if self.n == 0 and batch.embeddings.flags.c_contiguous:
            self.dim = batch.embeddings.shape[1]
            self.embeddings = batch.embeddings
            self.times = batch.times.copy()
            self.centers = batch.centers.copy()
        else:
            if batch.embeddings.shape[1] != self.dim:
                raise ValueError(
                    f"embedding dimension {batch.embeddings.shape[1]} does not match "
                    f"the {self.dim} of the crops already clustered"
                )
            self._reserve(self.n + n_new)
            self.embeddings[start : start + n_new] = batch.embeddings
            self.times[start : start + n_new] = batch.times
            self.centers[start : start + n_new] = batch.centers
        self.frames.extend(batch.frames)
        self.n += n_new
        return range(start, self.n)

    def _reserve(self, needed: int) -> None:
        capacity = len(self.embeddings)
        if needed <= capacity:
            return
        new_capacity = max(needed, 2 * capacity, 1024)
        for name in ("embeddings", "times", "centers"):
            old = getattr(self, name)
            grown = np.empty((new_capacity, *old.shape[1:]), dtype=old.dtype)
            grown[: self.n] = old[: self.n]
            setattr(self, name, grown)

    @property
    def live_embeddings(self) -> npt.NDArray[np.float32]:
        return self.embeddings[: self.n]


class _UnionFind:
    """Union-find whose root is always the smallest member (= the cluster id).

    Joining two clusters that both existed before the current batch (roots below
    ``published``) is recorded in ``merges``: readers of earlier snapshots knew
    both ids. Following the recorded merges in order leads every old id to its
    current one.
    """

    def __init__(self) -> None:
        self.parent: IntArray = np.empty(0, dtype=np.int64)
        self.n = 0
        self.published = 0
        self.merges: list[Merge] = []

    def grow(self, n: int) -> None:
        if n > len(self.parent):
            grown = np.empty(max(n, 2 * len(self.parent), 1024), dtype=np.int64)
            grown[: self.n] = self.parent[: self.n]
            self.parent = grown
        self.parent[self.n : n] = np.arange(self.n, n)
        self.n = n

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = int(parent[x])
        return x

    def union_pairs(self, a: IntArray, b: IntArray) -> None:
        if len(a) > 256:
            a, b = _spanning_pairs(a, b)
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            rx, ry = self.find(x), self.find(y)
            if rx == ry:
                continue
            keep, gone = (rx, ry) if rx < ry else (ry, rx)
            self.parent[gone] = keep
            if gone < self.published:
                self.merges.append(Merge(from_cluster=gone, into_cluster=keep))

    def roots(self) -> IntArray:
        """Every element's root, by vectorised pointer jumping."""
        parent = self.parent[: self.n].copy()
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                return parent
            parent = grand


def _spanning_pairs(a: IntArray, b: IntArray) -> tuple[IntArray, IntArray]:
    """Replace an edge list by a star per connected component: the same
    components from at most one union per distinct node, done in C."""
    nodes, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    m = len(a)
    graph = coo_matrix(
        (np.ones(m, dtype=np.int8), (inverse[:m], inverse[m:])), shape=(len(nodes), len(nodes))
    )
    _, component = connected_components(graph, directed=False)
    # The smallest node of each component (nodes are sorted) is its hub.
    first = np.full(component.max() + 1, len(nodes), dtype=np.int64)
    np.minimum.at(first, component, np.arange(len(nodes)))
    spokes = np.nonzero(first[component] != np.arange(len(nodes)))[0]
    return nodes[spokes], nodes[first[component[spokes]]]


class Linker(ABC):
    """Incremental clustering: feed batches with :meth:`add`, read :meth:`cluster_ids`."""

    def __init__(self, threshold: float, gating: Gating | None = None) -> None:
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be within [-1, 1], got {threshold}")
        self.threshold = threshold
        self.gating = gating
        self._cols = _Columns()

    def __len__(self) -> int:
        return self._cols.n

    @abstractmethod
    def add(self, batch: LinkBatch) -> AddResult:
        """Assign a batch; its crops get the next sequence numbers in order."""

    @abstractmethod
    def cluster_ids(self) -> IntArray:
        """Cluster id of every crop so far, indexed by sequence number."""

    @abstractmethod
    def cluster_of(self, seqs: IntArray) -> IntArray:
        """Current cluster id of the given crops (cheap for a micro-batch)."""

    @property
    def embeddings(self) -> npt.NDArray[np.float32]:
        """The stored embeddings, indexed by sequence number (read-only view)."""
        view = self._cols.live_embeddings.view()
        view.flags.writeable = False
        return view


class CosineLinker(Linker):
    """Connected components of the thresholded (and optionally gated) cosine graph."""

    def __init__(
        self,
        threshold: float = COSINE_DEFAULT_THRESHOLD,
        gating: Gating | None = None,
        hnsw: HnswParams | None = None,
    ) -> None:
        super().__init__(threshold, gating)
        self.hnsw = hnsw or HnswParams()
        self._uf = _UnionFind()
        self._index: hnswlib.Index | None = None
        # Sorted times of all timed crops, for the gating window.
        self._sorted_times: FloatArray = np.empty(0)
        self._sorted_seqs: IntArray = np.empty(0, dtype=np.int64)
        # For the batch being linked: each crop's most similar crop of its own
        # group (-1 = unknown), a second landmark for telling a lost search.
        self._nearest_known: IntArray = np.empty(0, dtype=np.int64)

    def add(self, batch: LinkBatch) -> AddResult:
        """Link a batch to everything seen so far (and to itself)."""
        if len(batch) == 0:
            return AddResult(range(self._cols.n, self._cols.n))
        seqs = self._cols.append(batch)
        self._uf.grow(self._cols.n)
        self._uf.merges = []
        self._uf.published = seqs.start
        if self.gating is None:
            self._link_ungated(seqs)
        else:
            self._link_gated(seqs)
        return AddResult(seqs, tuple(self._uf.merges))

    def cluster_ids(self) -> IntArray:
        """Cluster id (smallest member's sequence number) of every crop."""
        return self._uf.roots()

    def cluster_of(self, seqs: IntArray) -> IntArray:
        """Current cluster id of the given crops."""
        return np.array([self._uf.find(int(s)) for s in seqs], dtype=np.int64)

    # -- persistence (the daemon's state folder) -------------------------------------

    def restore(
        self,
        batch: LinkBatch,
        cluster_ids: IntArray,
        index_file: Path | None = None,
        index_covers: int = 0,
    ) -> bool:
        """Resume from stored state without linking anything again.

        ``batch`` holds every stored crop in sequence order and ``cluster_ids``
        their current ids (smallest member's sequence number). The HNSW index is
        loaded from ``index_file`` when it covers exactly the first
        ``index_covers`` crops, and the rest are added to it; without a usable
        file it is rebuilt. Returns whether the saved index was used.
        """
        if self._cols.n:
            raise RuntimeError("restore() needs a fresh linker")
        if len(cluster_ids) != len(batch):
            raise ValueError("one cluster id per stored crop is needed")
        if len(batch) == 0:
            return False
        seqs = self._cols.append(batch)
        self._uf.grow(self._cols.n)
        if np.any(cluster_ids > np.arange(len(batch))):
            raise ValueError("a cluster id is larger than the sequence number of its member")
        self._uf.parent[: self._cols.n] = cluster_ids
        if self.gating is not None:
            timed = np.flatnonzero(~np.isnan(self._cols.times[: self._cols.n]))
            order = np.argsort(self._cols.times[timed], kind="stable")
            self._sorted_seqs = timed[order].astype(np.int64)
            self._sorted_times = self._cols.times[self._sorted_seqs]
            return False
        if self._cols.n < self.hnsw.brute_force_below:
            return False
        used = False
        if index_file is not None and index_covers > 0 and index_file.exists():
            used = self._load_index(index_file, index_covers)
        if not used:
            self._index = self._new_index(max(self._cols.n + self._cols.n // 8, 10_000))
            index_covers = 0
        assert self._index is not None
        rest = np.arange(index_covers, seqs.stop, dtype=np.int64)
        for start in range(0, len(rest), self.hnsw.chunk):
            self._index_add(rest[start : start + self.hnsw.chunk])
        return used

    def _load_index(self, path: Path, covers: int) -> bool:
        index = hnswlib.Index(space="ip", dim=self._cols.dim)
        try:
            index.load_index(str(path), max_elements=max(self._cols.n + self._cols.n // 8, 10_000))
        except (RuntimeError, OSError, ValueError) as exc:
            log.warning("index_unusable", file=str(path), reason=str(exc))
            return False
        if index.get_current_count() != covers or index.dim != self._cols.dim:
            log.warning(
                "index_unusable",
                file=str(path),
                reason=f"holds {index.get_current_count()} crops, state says {covers}",
            )
            return False
        # ef and the thread count are not saved with the index.
        index.set_ef(self.hnsw.ef_search)
        index.set_num_threads(self.hnsw.threads or _cpu_count())
        self._index = index
        return True

    def save_index(self, path: Path) -> int:
        """Save the HNSW index atomically; return how many crops it covers (0: none kept).

        Building with several threads is not deterministic, so the daemon keeps
        the index it built rather than rebuilding a different one at each start.
        """
        if self._index is None:
            return 0
        tmp = path.with_name(f".{path.name}.tmp")
        self._index.save_index(str(tmp))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return int(self._index.get_current_count())

    # -- ungated: hnswlib candidates ----------------------------------------------

    def _link_ungated(self, seqs: range) -> None:
        params = self.hnsw
        if self._index is None and self._cols.n < params.brute_force_below:
            self._link_exact(np.arange(seqs.start, seqs.stop), self._cols.n)
            return
        if self._index is None:
            # Crossing the brute-force limit: index what came before, then go on.
            # Room for this batch plus some growth; later growth doubles.
            self._index = self._new_index(max(self._cols.n + self._cols.n // 8, 10_000))
            if seqs.start > 0:
                self._index_add(np.arange(0, seqs.start))
        t0 = time.perf_counter()
        self._nearest_known = np.full(self._cols.n, -1, dtype=np.int64)
        order = self._locality_order(seqs)
        # Index the whole batch before querying any of it: a pair inside the batch
        # is then searched from both ends, and HNSW must miss it twice to lose it.
        t1 = time.perf_counter()
        for start in range(0, len(order), params.chunk):
            self._index_add(order[start : start + params.chunk])
        t2 = time.perf_counter()
        lost = [
            self._link_knn(self._index, order[start : start + params.chunk], params.ef_search)
            for start in range(0, len(order), params.chunk)
        ]
        t3 = time.perf_counter()
        n_lost = self._settle_lost(np.concatenate(lost))
        self._nearest_known = np.empty(0, dtype=np.int64)
        log.debug(
            "hnsw_linked",
            crops=len(order),
            lost=n_lost,
            order_s=round(t1 - t0, 2),
            index_s=round(t2 - t1, 2),
            query_s=round(t3 - t2, 2),
            lost_s=round(time.perf_counter() - t3, 2),
        )

    def _locality_order(self, seqs: range) -> IntArray:
        """The order to index and query a batch in.

        HNSW on a large index is bound by memory latency, so neighbouring crops
        are handled one after another: sorted by their nearest of 1,024 sampled
        crops. A random 5% goes first, so the graph gets its long-range links
        from an unordered skeleton (sorted insertion alone loses recall).
        Measured at 200,000 crops: build 1.6x and queries 2.3x faster, recall
        unchanged.
        """
        ids = np.arange(seqs.start, seqs.stop, dtype=np.int64)
        n = len(ids)
        if n < 4 * self.hnsw.chunk:
            return ids
        rng = np.random.default_rng(self.hnsw.seed)
        emb = self._cols.embeddings
        anchors = emb[ids[rng.choice(n, size=min(1024, n), replace=False)]]
        # Each crop's three nearest anchors, nearest first.
        top = np.empty((n, 3), dtype=np.int64)
        for start in range(0, n, 16_384):
            block = emb[ids[start : start + 16_384]] @ anchors.T
            best = np.argpartition(block, -3, axis=1)[:, -3:]
            rank = np.argsort(-np.take_along_axis(block, best, axis=1), axis=1)
            top[start : start + len(block)] = np.take_along_axis(best, rank, axis=1)
        nearest = top[:, 0]
        self._link_within_groups(ids, nearest, top[:, 1:])
        first = rng.choice(n, size=n // 20, replace=False)
        rest = np.ones(n, dtype=bool)
        rest[first] = False
        later = np.nonzero(rest)[0]
        later = later[np.argsort(nearest[later], kind="stable")]
        order: IntArray = ids[np.concatenate([first, later])]
        return order

    def _link_within_groups(self, ids: IntArray, group: IntArray, runners_up: IntArray) -> None:
        """Exact links among crops that share their nearest anchor, and between
        crops whose nearest anchor is the other's second or third nearest
        (``runners_up``, one row per crop).

        Most pairs above the threshold are of those kinds, and matrix products
        find them exactly and cheaply, so HNSW only has to supply the rest (at a
        million crops its misses are pairs that straddle two groups). Groups
        too large for a cheap product are left to HNSW alone. Each crop's most
        similar group member is kept for :meth:`_link_knn`.
        """
        emb = self._cols.embeddings
        floor = self.threshold - _FLOAT32_MARGIN
        by_group = np.argsort(group, kind="stable")
        bounds = np.flatnonzero(np.diff(group[by_group])) + 1
        guest_of = runners_up.T.ravel()  # column-major: every crop's 2nd, then every 3rd
        guest_ids = np.tile(ids, runners_up.shape[1])
        by_guest = np.argsort(guest_of, kind="stable")
        guest_starts = np.searchsorted(guest_of[by_guest], np.arange(group.max() + 2))
        for members in np.split(ids[by_group], bounds):
            if len(members) < 2 or len(members) > 16_384:
                continue
            sims = emb[members] @ emb[members].T
            rows, cols = np.nonzero(np.triu(sims >= floor, k=1))
            self._confirm(members[rows], members[cols], sims[rows, cols])
            np.fill_diagonal(sims, -np.inf)
            self._nearest_known[members] = members[np.argmax(sims, axis=1)]
            g = int(group[members[0] - ids[0]])
            guests = guest_ids[by_guest[guest_starts[g] : guest_starts[g + 1]]]
            if 0 < len(guests) <= 16_384:
                sims = emb[guests] @ emb[members].T
                rows, cols = np.nonzero(sims >= floor)
                self._confirm(guests[rows], members[cols], sims[rows, cols])

    def _new_index(self, capacity: int) -> hnswlib.Index:
        index = hnswlib.Index(space="ip", dim=self._cols.dim)
        index.init_index(
            max_elements=capacity,
            M=self.hnsw.m,
            ef_construction=self.hnsw.ef_construction,
            random_seed=self.hnsw.seed,
        )
        index.set_num_threads(self.hnsw.threads or _cpu_count())
        return index

    def _index_add(self, ids: IntArray) -> None:
        assert self._index is not None
        needed = self._index.get_current_count() + len(ids)
        if needed > self._index.get_max_elements():
            # Grow ahead of need: hnswlib raises once max_elements is reached.
            self._index.resize_index(max(needed, 2 * self._index.get_max_elements()))
        self._index.add_items(self._cols.embeddings[ids], ids)

    def _link_knn(
        self, index: hnswlib.Index, rows: IntArray, ef: int, members: bool = True
    ) -> IntArray:
        """Query ``index`` for each row, widening k until every neighbour above
        the threshold is inside the returned set; return the rows that got lost.

        With ``members`` every queried crop is itself in the index, so a search
        that returns neither the crop itself nor its most similar crop known
        from the exact in-group pass got lost on the way (or the crop has no
        incoming links, which is common at a million crops and is why the
        second landmark exists): such rows are returned unlinked.
        """
        count = index.get_current_count()
        floor = self.threshold - _FLOAT32_MARGIN
        k = min(self.hnsw.k_start, count)
        pending = rows
        lost_rows: list[IntArray] = []
        while len(pending):
            index.set_ef(max(ef, k))
            try:
                labels, distances = index.knn_query(self._cols.embeddings[pending], k=k)
            except RuntimeError:
                # hnswlib could not gather k results (a sparse graph region):
                # settle these rows exactly rather than risk a missed link.
                lost_rows.append(pending)
                break
            labels = labels.astype(np.int64)
            sims = 1.0 - distances
            full = (sims[:, -1] >= floor) & (k < count)
            if members:
                landmarks = np.full(len(pending), -1, dtype=np.int64)
                if len(self._nearest_known):
                    landmarks = self._nearest_known[pending]
                reached = (labels == pending[:, None]) | (labels == landmarks[:, None])
                lost = ~full & ~reached.any(axis=1)
            else:
                lost = np.zeros_like(full)
            done = ~full & ~lost
            hit_rows, hit_cols = np.nonzero((sims >= floor) & done[:, None])
            self._confirm(pending[hit_rows], labels[hit_rows, hit_cols], sims[hit_rows, hit_cols])
            lost_rows.append(pending[lost])
            pending = pending[full]
            k = min(4 * k, count)
        return np.concatenate(lost_rows) if lost_rows else np.empty(0, dtype=np.int64)

    def _settle_lost(self, lost: IntArray) -> int:
        """Link the crops whose own search got lost; return how many there were.

        A few are asked again with a larger ef and then settled exactly. Many
        (thousands at a million crops, mostly nodes HNSW left without incoming
        links, which no ef finds) get an index of their own that every other
        crop queries, plus an exact search among themselves: each of their
        pairs is again searched from both ends, for a fraction of the cost of
        an exact search against everything.
        """
        assert self._index is not None
        count = self._index.get_current_count()
        n_lost = len(lost)
        if n_lost >= self.hnsw.side_index_from:
            self._link_via_side_index(np.unique(lost), count)
            return n_lost
        ef = self.hnsw.ef_search
        while len(lost) and ef < _MAX_EF:
            ef = min(4 * ef, _MAX_EF)
            lost = self._link_knn(self._index, lost, ef)
        if len(lost):
            self._link_exact(lost, count)
        return n_lost

    def _link_via_side_index(self, lost: IntArray, count: int) -> None:
        """Exact links among ``lost``; every other indexed crop queries an index of them."""
        emb = self._cols.embeddings
        floor = self.threshold - _FLOAT32_MARGIN
        for start in range(0, len(lost), 1024):
            part = lost[start : start + 1024]
            sims = emb[part] @ emb[lost].T
            rows, cols = np.nonzero(sims >= floor)
            self._confirm(part[rows], lost[cols], sims[rows, cols])
        side = hnswlib.Index(space="ip", dim=self._cols.dim)
        side.init_index(
            max_elements=len(lost),
            M=self.hnsw.m,
            ef_construction=self.hnsw.ef_construction,
            random_seed=self.hnsw.seed,
        )
        side.set_num_threads(self.hnsw.threads or _cpu_count())
        side.add_items(emb[lost], lost)
        others = np.ones(count, dtype=bool)
        others[lost] = False
        rows = np.nonzero(others)[0].astype(np.int64)
        for start in range(0, len(rows), self.hnsw.chunk):
            part = rows[start : start + self.hnsw.chunk]
            failed = self._link_knn(side, part, self.hnsw.side_ef, members=False)
            if len(failed):
                sims = emb[failed] @ emb[lost].T
                hit_rows, hit_cols = np.nonzero(sims >= floor)
                self._confirm(failed[hit_rows], lost[hit_cols], sims[hit_rows, hit_cols])

    def _link_exact(self, rows: IntArray, upto: int) -> None:
        """Exact search of ``rows`` against crops ``[0, upto)`` in bounded blocks."""
        emb = self._cols.embeddings
        floor = self.threshold - _FLOAT32_MARGIN
        block = max(1, 2**24 // max(upto, 1))
        for start in range(0, len(rows), block):
            part = rows[start : start + block]
            sims = emb[part] @ emb[:upto].T
            hit_rows, hit_cols = np.nonzero(sims >= floor)
            self._confirm(part[hit_rows], hit_cols.astype(np.int64), sims[hit_rows, hit_cols])

    def _confirm(
        self, a: IntArray, b: IntArray, approx: npt.NDArray[np.floating], gate: bool = False
    ) -> None:
        """Union the candidate pairs whose exact similarity (and gating) allows it."""
        # Keep pairs found from either end: a pair inside a batch that HNSW misses
        # from one crop may still be found from the other.
        keep = a != b
        a, b, approx = a[keep], b[keep], approx[keep]
        if gate and self.gating is not None and len(a):
            cols = self._cols
            dt = cols.times[a] - cols.times[b]
            dist = np.hypot(*(cols.centers[a] - cols.centers[b]).T)
            ok = self.gating.supports(dt, dist)
            a, b, approx = a[ok], b[ok], approx[ok]
        ok = approx >= self.threshold + _FLOAT32_MARGIN
        unsure = np.nonzero(~ok & (approx >= self.threshold - _FLOAT32_MARGIN))[0]
        ok[unsure] = pair_cosine(self._cols.embeddings, a[unsure], b[unsure]) >= self.threshold
        self._uf.union_pairs(a[ok], b[ok])

    # -- gated: exact search inside the time window ---------------------------------

    def _link_gated(self, seqs: range) -> None:
        assert self.gating is not None
        cols = self._cols
        new = np.arange(seqs.start, seqs.stop, dtype=np.int64)
        new_times = cols.times[new]
        timed = new[~np.isnan(new_times)]
        # Insert first, so pairs inside the batch are found too.
        order = np.argsort(cols.times[timed], kind="stable")
        timed = timed[order]
        t_new = cols.times[timed]
        pos = np.searchsorted(self._sorted_times, t_new, side="right")
        self._sorted_times = np.insert(self._sorted_times, pos, t_new)
        self._sorted_seqs = np.insert(self._sorted_seqs, pos, timed)
        window = self.gating.window_s
        emb = cols.embeddings
        floor = self.threshold - _FLOAT32_MARGIN
        start = 0
        while start < len(timed):
            # A group of new crops close in time shares one candidate window.
            stop = min(start + 256, len(timed))
            stop = start + int(np.searchsorted(t_new[start:stop], t_new[start] + window, "right"))
            group = timed[start:stop]
            lo = np.searchsorted(self._sorted_times, t_new[start] - window, side="right")
            hi = np.searchsorted(self._sorted_times, t_new[stop - 1] + window, side="left")
            candidates = self._sorted_seqs[lo:hi]
            sims = emb[group] @ emb[candidates].T
            hit_rows, hit_cols = np.nonzero(sims >= floor)
            self._confirm(
                group[hit_rows], candidates[hit_cols], sims[hit_rows, hit_cols], gate=True
            )
            start = stop


class TrackLinker(Linker):
    """Frame-by-frame one-to-one matching of crops to active clusters.

    ``motion`` (used when crops have box positions) limits and scores how far a
    cluster may move; ``memory`` is how many of a cluster's latest crops a new
    crop is compared with.
    """

    def __init__(
        self,
        threshold: float,
        motion: Motion | None = None,
        gap_s: float = 300.0,
        gap_frames: int = 150,
        memory: int = 3,
    ) -> None:
        super().__init__(threshold, None)
        if memory < 1:
            raise ValueError(f"memory must be at least 1, got {memory}")
        self.motion = motion
        self.gap_s = gap_s
        self.gap_frames = gap_frames
        self.memory = memory
        self._track_of: IntArray = np.empty(0, dtype=np.int64)
        self._tracks: list[_Track] = []
        self._active: list[int] = []  # track numbers that may still match
        self._frame_ordinal = 0

    def add(self, batch: LinkBatch) -> AddResult:
        """Match the batch's frames, in time order, to the active clusters."""
        seqs = self._cols.append(batch)
        if len(self._track_of) < self._cols.n:
            grown = np.full(max(self._cols.n, 2 * len(self._track_of), 1024), -1, dtype=np.int64)
            grown[: len(self._track_of)] = self._track_of
            self._track_of = grown
        for frame_seqs in self._frames_in_order(seqs):
            self._match_frame(frame_seqs)
        return AddResult(seqs)

    def cluster_ids(self) -> IntArray:
        """Cluster id (smallest member's sequence number) of every crop."""
        tracks = self._track_of[: self._cols.n]
        first = np.array([t.first_seq for t in self._tracks], dtype=np.int64)
        return first[tracks] if len(first) else np.empty(0, dtype=np.int64)

    def cluster_of(self, seqs: IntArray) -> IntArray:
        """Cluster id of the given crops (track clusters never merge)."""
        return np.array(
            [self._tracks[int(self._track_of[int(s)])].first_seq for s in seqs], dtype=np.int64
        )

    def _frames_in_order(self, seqs: range) -> list[IntArray]:
        """Group a batch by frame; timed frames by (time, name), then untimed by name.

        A crop with no flat-bug frame is a frame of its own.
        """
        cols = self._cols
        groups: dict[str, list[int]] = {}
        for seq in seqs:
            frame = cols.frames[seq]
            groups.setdefault(frame if frame is not None else f"\0{seq}", []).append(seq)

        def key(item: tuple[str, list[int]]) -> tuple[int, float, str]:
            name, members = item
            t = cols.times[members[0]]
            return (1, 0.0, name) if math.isnan(t) else (0, float(t), name)

        return [np.array(m, dtype=np.int64) for _, m in sorted(groups.items(), key=key)]

    def _match_frame(self, crops: IntArray) -> None:
        cols = self._cols
        frame = cols.frames[int(crops[0])]
        t = float(cols.times[int(crops[0])])
        ordinal = self._frame_ordinal
        self._frame_ordinal += 1
        self._active = [k for k in self._active if self._tracks[k].alive(t, ordinal, self)]
        candidates = [
            k for k in self._active if frame is None or self._tracks[k].last_frame != frame
        ]
        matched: dict[int, int] = {}
        if candidates:
            matched = self._assign(crops, candidates, t)
        for row, seq in enumerate(crops.tolist()):
            k = matched.get(row)
            if k is None:
                k = len(self._tracks)
                self._tracks.append(_Track(first_seq=seq))
                self._active.append(k)
            self._tracks[k].first_seq = min(self._tracks[k].first_seq, seq)
            self._tracks[k].observe(seq, t, ordinal, frame, cols.centers[seq], self.memory)
            self._track_of[seq] = k

    def _assign(self, crops: IntArray, candidates: list[int], t: float) -> dict[int, int]:
        cols = self._cols
        last = np.array([self._tracks[k].last_seq for k in candidates], dtype=np.int64)
        rows = np.repeat(crops, len(last))
        others = np.tile(last, len(crops))
        depth = max(len(self._tracks[k].recent) for k in candidates)
        recent = np.array(
            [[*tr.recent, *[tr.recent[-1]] * (depth - len(tr.recent))]
             for tr in (self._tracks[k] for k in candidates)],
            dtype=np.int64,
        )  # fmt: skip
        # Similarity to a cluster: the best over its most recent crops, so one
        # blurred frame does not break a track.
        sims = np.max(
            [
                pair_cosine(cols.embeddings, rows, np.tile(recent[:, j], len(crops)))
                for j in range(depth)
            ],
            axis=0,
        ).reshape(len(crops), len(last))
        allowed = sims >= self.threshold
        weights = sims.copy()
        if self.motion is not None:
            dist = np.hypot(*(cols.centers[rows] - cols.centers[others]).T).reshape(sims.shape)
            reach = dist / self.motion.max_move_px
            with np.errstate(invalid="ignore"):
                allowed &= ~(reach >= 1.0)  # NaN (unknown position) stays allowed
            weights -= self.motion.penalty * np.nan_to_num(np.minimum(reach, 1.0), nan=1.0)
        if not allowed.any():
            return {}
        # Weights are shifted to be positive and one "stay new" column per crop
        # with weight 0 is added: a maximum-weight matching over allowed pairs
        # rather than a forced assignment.
        forbidden = -1e9
        weights = np.where(allowed, weights + 1.0, forbidden)
        stay_new = np.full((len(crops), len(crops)), forbidden)
        np.fill_diagonal(stay_new, 0.0)
        row_ind, col_ind = linear_sum_assignment(np.hstack([weights, stay_new]), maximize=True)
        return {
            int(r): candidates[int(c)]
            for r, c in zip(row_ind, col_ind, strict=True)
            if c < len(candidates) and allowed[r, c]
        }


@dataclass(slots=True)
class _Track:
    first_seq: int
    last_seq: int = -1
    last_time: float = math.nan
    last_ordinal: int = -1
    last_frame: str | None = None
    last_center: FloatArray = field(default_factory=lambda: np.full(2, np.nan))
    recent: list[int] = field(default_factory=list)

    def observe(
        self, seq: int, t: float, ordinal: int, frame: str | None, center: FloatArray, memory: int
    ) -> None:
        self.recent = [*self.recent[-(memory - 1) :], seq] if memory > 1 else [seq]
        self.last_seq = seq
        self.last_time = t
        self.last_ordinal = ordinal
        self.last_frame = frame
        self.last_center = center

    def alive(self, t: float, ordinal: int, linker: TrackLinker) -> bool:
        if math.isnan(t) or math.isnan(self.last_time):
            return ordinal - self.last_ordinal <= linker.gap_frames
        return abs(t - self.last_time) <= linker.gap_s


def make_linker(
    method: str,
    threshold: float,
    gating: Gating | None = None,
    *,
    gap_s: float = 300.0,
    gap_frames: int = 150,
    memory: int = 3,
    motion: Motion | None = None,
    hnsw: HnswParams | None = None,
) -> Linker:
    """Create the linker for a method name (``cosine`` or ``track``).

    ``gating`` applies to ``cosine``; ``motion``, ``gap_s``, ``gap_frames`` and
    ``memory`` to ``track``.
    """
    if method == "cosine":
        return CosineLinker(threshold, gating, hnsw)
    if method == "track":
        return TrackLinker(threshold, motion, gap_s=gap_s, gap_frames=gap_frames, memory=memory)
    raise ValueError(f"unknown clustering method {method!r}; choose one of {', '.join(METHODS)}")


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
