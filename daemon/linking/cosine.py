"""``cosine``: connected components of the thresholded (optionally gated) cosine graph.

Two crops of one trap (crops of different traps never link) link when their
cosine similarity is >= ``threshold`` and, when gating is on, the link has
spatio-temporal support (:class:`Gating`). Pairs are PROPOSED by a search
(:class:`~crop_clusterd.linking.neighbours.NeighbourSearch` without gating, an
exact product over the time window with it) and CONFIRMED here with the exact
similarity (:func:`~crop_clusterd.linking.exact.accept`), the trap rule and the
gating rule, then joined in a union-find.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .. import defaults
from ..records import Merge
from .base import (
    AddResult,
    FloatArray,
    Gating,
    HnswParams,
    IntArray,
    LinkBatch,
    Linker,
    StoredLinks,
)
from .exact import Pairs, accept, candidate_floor, pairs_above
from .neighbours import NeighbourSearch


class UnionFind:
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
        """Make room for elements ``[0, n)``; new ones are their own roots."""
        if n > len(self.parent):
            grown = np.empty(max(n, 2 * len(self.parent), 1024), dtype=np.int64)
            grown[: self.n] = self.parent[: self.n]
            self.parent = grown
        self.parent[self.n : n] = np.arange(self.n, n)
        self.n = n

    def find(self, x: int) -> int:
        """The root of ``x``, halving the path on the way."""
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = int(parent[x])
        return x

    def union_pairs(self, a: IntArray, b: IntArray) -> None:
        """Join ``a[i]`` and ``b[i]`` for every i, recording merges of published roots."""
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


class CosineLinker(Linker):
    """Connected components of the thresholded (and optionally gated) cosine graph."""

    def __init__(
        self,
        threshold: float = defaults.COSINE_THRESHOLD,
        gating: Gating | None = None,
        hnsw: HnswParams | None = None,
    ) -> None:
        super().__init__(threshold, gating)
        self.hnsw = hnsw or HnswParams()
        self._uf = UnionFind()
        self._search = NeighbourSearch(
            self._cols, threshold, self.hnsw, self._confirm, lambda: self._retired
        )
        # Sorted times of all timed crops, for the gating window.
        self._sorted_times: FloatArray = np.empty(0)
        self._sorted_seqs: IntArray = np.empty(0, dtype=np.int64)

    def add(self, batch: LinkBatch) -> AddResult:
        """Link a batch to everything seen so far (and to itself)."""
        if len(batch) == 0:
            return AddResult(range(self._cols.n, self._cols.n))
        seqs = self._cols.append(batch)
        self._uf.grow(self._cols.n)
        self._uf.merges = []
        self._uf.published = seqs.start
        if self.gating is None:
            self._search.propose(seqs)
        else:
            self._link_gated(seqs)
        return AddResult(seqs, tuple(self._uf.merges))

    def retire(self, seqs: IntArray) -> None:
        """See :meth:`Linker.retire`; a retired crop that stood in the index for
        bit-identical live copies hands that role to the first of them."""
        seqs = np.unique(np.asarray(seqs, dtype=np.int64))
        if len(seqs) and seqs[0] >= 0 and seqs[-1] < self._cols.n:
            self._search.retiring(seqs, np.union1d(self._retired, seqs))
        super().retire(seqs)

    def map_vectors(self, folder: Path) -> bool:
        """Ungated: keep the embeddings in a memory map in ``folder``, so the
        process holds one copy of each vector, the HNSW index's (issue 10).
        Gated linking keeps no index, so its columns stay in memory.

        Why a map and not the index's own copy (``hnswlib.Index.get_items``):
        dense groups, lost queries and the side index compare crops with every
        crop held, and ``get_items`` builds Python floats (about 40 us per
        384-d vector): 4 s per such batch at 100,000 crops, against a
        sequential read of the map. Its pages are file pages the kernel writes
        back and may drop under pressure, and the map grows without copying.
        """
        if self.gating is not None:
            return False
        self._cols.map_embeddings(folder)
        return True

    def cluster_ids(self) -> IntArray:
        """Cluster id (smallest member's sequence number) of every crop."""
        return self._uf.roots()

    def cluster_of(self, seqs: IntArray) -> IntArray:
        """Current cluster id of the given crops."""
        return np.array([self._uf.find(int(s)) for s in seqs], dtype=np.int64)

    # -- persistence (the daemon's state folder) -------------------------------------

    def save(self, path: Path) -> int:
        """Save the HNSW index atomically; return how many crops it covers (0: none kept).

        Gated linking and small collections keep no index. OSError on failure.
        """
        return self._search.save(path)

    def restore(self, stored: StoredLinks) -> bool:
        """Resume from stored state without linking anything again.

        Takes ``stored.cluster_ids`` as they are (each the smallest member's
        sequence number; ValueError otherwise). The HNSW index is loaded from
        ``stored.index_file`` when it covers exactly the first
        ``stored.index_covers`` crops, and the rest are added to it; without a
        usable file it is rebuilt. Returns whether the saved index was used.
        """
        if self._cols.n:
            raise RuntimeError("restore() needs a fresh linker")
        if len(stored) == 0:
            return False
        self._cols.append(stored.batch)
        self._uf.grow(self._cols.n)
        if np.any(stored.cluster_ids > np.arange(len(stored))):
            raise ValueError("a cluster id is larger than the sequence number of its member")
        self._uf.parent[: self._cols.n] = stored.cluster_ids
        if self.gating is not None:
            timed = np.flatnonzero(~np.isnan(self._cols.times[: self._cols.n]))
            order = np.argsort(self._cols.times[timed], kind="stable")
            self._sorted_seqs = timed[order].astype(np.int64)
            self._sorted_times = self._cols.times[self._sorted_seqs]
            return False
        return self._search.resume(stored.index_file, stored.index_covers)

    # -- confirming proposed pairs ----------------------------------------------------

    def _confirm(self, pairs: Pairs, gate: bool = False) -> None:
        """Union the candidate pairs whose exact similarity (and gating) allows it."""
        # Keep pairs found from either end: a pair inside a batch that HNSW misses
        # from one crop may still be found from the other.
        # Crops of two traps never link, however alike: a trap's clusters must not
        # depend on another trap's files. Retired crops never link again.
        cols = self._cols
        keep = (
            (pairs.a != pairs.b)
            & (cols.traps[pairs.a] == cols.traps[pairs.b])
            & self._live_pairs(pairs.a, pairs.b)
        )
        a, b, approx = pairs.a[keep], pairs.b[keep], pairs.approx[keep]
        if gate and self.gating is not None and len(a):
            dt = cols.times[a] - cols.times[b]
            dist = np.hypot(*(cols.centers[a] - cols.centers[b]).T)
            ok = self.gating.supports(dt, dist)
            a, b, approx = a[ok], b[ok], approx[ok]
        ok = accept(self._cols.embeddings, Pairs(a, b, approx), self.threshold)
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
        floor = candidate_floor(self.threshold)
        start = 0
        while start < len(timed):
            # A group of new crops close in time shares one candidate window.
            stop = min(start + 256, len(timed))
            stop = start + int(np.searchsorted(t_new[start:stop], t_new[start] + window, "right"))
            group = timed[start:stop]
            lo = np.searchsorted(self._sorted_times, t_new[start] - window, side="right")
            hi = np.searchsorted(self._sorted_times, t_new[stop - 1] + window, side="left")
            candidates = self._sorted_seqs[lo:hi]
            for pairs in pairs_above(cols.embeddings, group, candidates, floor, block=len(group)):
                self._confirm(pairs, gate=True)
            start = stop
