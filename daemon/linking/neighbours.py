"""Candidate pairs from an hnswlib inner-product index (the ungated cosine search).

:class:`NeighbourSearch` only PROPOSES pairs: every pair whose approximate
similarity may reach the threshold goes to a ``confirm`` sink as
:class:`~crop_clusterd.linking.exact.Pairs`, and the linker decides. It knows
nothing of clusters.

How a batch is searched (all of it exists to lose no pair above the threshold):

* Below ``brute_force_below`` crops there is no index: exact blocked products;
  also for a batch at least as large as what came before, up to the size where
  a cost model fitted to measurements says the index gets cheaper
  (:func:`exact_cheaper`).
* A large batch is put in a locality order (sorted by nearest sampled anchor),
  and pairs that share one of their three nearest anchors are proposed from
  exact products first.
* The whole batch is indexed before any of it is queried, so a pair inside it
  is searched from both ends.
* Each query widens k until the k-th neighbour falls below the threshold, up
  to ``dense_k``. A crop still full at ``dense_k`` sits in a dense group (a
  stuck insect: thousands of near-duplicates), where widening would make every
  member ask for all of them. Such crops are settled instead by a cover: a few
  leaders, each with the dense crops within half the threshold angle of it,
  linked to its leader, and everything a member can reach (by the triangle
  inequality, within the threshold angle plus that radius of the leader) is
  compared exactly with the members. Connected components need enough pairs,
  not every pair: a dense group costs about its size, not its size squared.
* Bit-identical crops enter the index once (:mod:`.dedup`): a copy is linked
  to its representative and neither indexed nor queried.
* A query that finds neither its own crop nor its most similar anchor-group
  member got lost; lost queries are retried at a larger ef and then settled
  exactly, or, when there are many, through a side index of them.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import hnswlib
import numpy as np

from .. import defaults
from ..log import get_logger
from .allpairs import earlier_pairs, principal_head
from .base import CropColumns, HnswParams, IntArray
from .buckets import bucket_count, bucket_pairs, dense_buckets, plan_buckets
from .dedup import Duplicates
from .exact import FLOAT32_MARGIN, Pairs, candidate_floor, hits, pairs_above

log = get_logger(__name__)

Confirm = Callable[[Pairs], None]
Retired = Callable[[], IntArray]

# A query that cannot find its own crop even at this ef is settled exactly.
_MAX_EF = 4096
# A bucket of more than this many crops holds a dense group (see bucket_batch).
DENSE_BUCKET = 4096


class NeighbourSearch:
    """Proposes every pair of a new batch (with itself and with all earlier crops)
    whose similarity may reach ``threshold``.

    ``cols`` is the linker's own column store (read, never written here); each
    candidate batch goes to ``confirm`` as soon as it is found, in a fixed order.
    """

    def __init__(
        self,
        cols: CropColumns,
        threshold: float,
        params: HnswParams,
        confirm: Confirm,
        retired: Retired | None = None,
    ) -> None:
        self.cols = cols
        self.params = params
        self.threshold = threshold
        self.floor = candidate_floor(threshold)
        self.confirm = confirm
        self.index: hnswlib.Index | None = None
        self.retired: Retired = retired or (lambda: np.empty(0, dtype=np.int64))
        # Set while an index is kept: bit-identical crops are indexed once.
        self.dups = Duplicates()
        # For the batch being linked: each crop's most similar crop of its own
        # group (-1 = unknown), a second landmark for telling a lost search.
        self._nearest_known: IntArray = np.empty(0, dtype=np.int64)
        # Crops whose query stopped widening at dense_k, for _settle_dense.
        self._dense: list[IntArray] = []

    def propose(self, seqs: range) -> None:
        """Propose the pairs of the crops ``seqs`` (already in ``cols``)."""
        params = self.params
        bulk = self._bulk_search(seqs) if self.index is None else None
        if bulk == "exact":
            self.exact_batch(seqs)
            return
        if bulk == "buckets":
            self.bucket_batch(seqs)
            return
        if self.index is None:
            # Crossing the brute-force limit: index what came before, then go on.
            # Room for this batch plus some growth; later growth doubles.
            self.index = self._new_index(self._capacity())
            self.dups.reset()
            if seqs.start > 0:
                # In locality order, as a batch indexed by propose() is: after an
                # exact bulk batch, later queries walk the graph faster for it.
                self._add_unique(np.arange(0, seqs.start, dtype=np.int64), False, ordered=True)
        t0 = time.perf_counter()
        self._nearest_known = np.full(self.cols.n, -1, dtype=np.int64)
        order = self._locality_order(self._unique(np.arange(seqs.start, seqs.stop), link=True))
        # Index the whole batch before querying any of it: a pair inside the batch
        # is then searched from both ends, and HNSW must miss it twice to lose it.
        t1 = time.perf_counter()
        for start in range(0, len(order), params.chunk):
            self._index_add(order[start : start + params.chunk])
        t2 = time.perf_counter()
        lost = [
            self._knn(self.index, order[start : start + params.chunk], params.ef_search)
            for start in range(0, len(order), params.chunk)
        ]
        t3 = time.perf_counter()
        n_lost = self._settle_lost(np.concatenate([np.empty(0, dtype=np.int64), *lost]))
        t4 = time.perf_counter()
        n_dense = self._settle_dense()
        self._nearest_known = np.empty(0, dtype=np.int64)
        log.debug(
            "hnsw_linked",
            crops=len(order),
            lost=n_lost,
            dense=n_dense,
            order_s=round(t1 - t0, 2),
            index_s=round(t2 - t1, 2),
            query_s=round(t3 - t2, 2),
            lost_s=round(t4 - t3, 2),
            dense_s=round(time.perf_counter() - t4, 2),
        )

    def _bulk_search(self, seqs: range) -> str | None:
        """How to search ``seqs`` without an index: "exact", "buckets", or None
        (build an index).

        Below ``brute_force_below`` crops always exact (0: never without an
        index). A batch at least as large as what came before (the batch
        command's single batch) by exact products or buckets, whichever the
        cost model prices cheaper (:func:`exact_cheaper`); a smaller one gets an
        index, because the index serves every later batch too.
        """
        params = self.params
        below = params.brute_force_below
        if self.cols.n < below:
            return "exact"
        if below <= 0 or len(seqs) < seqs.start:
            return None
        if params.force_buckets:
            return "buckets"
        cheaper = exact_cheaper(
            len(seqs), seqs.start, self.cols.dim, params.bucket_crops, params.bucket_probes
        )
        return "exact" if cheaper else "buckets"

    def exact_batch(self, seqs: range) -> None:
        """Exact search of the crops ``seqs`` against every crop before them
        and each other (each pair once), tiled over all cores."""
        stop = seqs.stop
        workers = 1 if len(seqs) * stop < 2**24 else self.params.threads or _cpu_count()
        emb = self.cols.embeddings
        # The bound pays for its rotation only over many pairs.
        head = principal_head(emb, stop, self.floor) if len(seqs) * stop >= 2**26 else None
        for pairs in earlier_pairs(emb, seqs.start, stop, self.floor, head=head, workers=workers):
            self.confirm(pairs)

    def bucket_batch(self, seqs: range) -> None:
        """Search the crops ``seqs`` against every crop before them and each
        other through k-means buckets (:mod:`.buckets`), on all cores.

        The crops of a bucket that holds a dense group (a stuck insect's
        near-duplicates, see :func:`~.buckets.dense_buckets`) are settled by
        the leader cover of :meth:`_settle_dense` instead: probing would cost
        their number squared (all in one bucket) or propose each crop's pairs
        with every crop of its probed buckets (spread over many).
        """
        params = self.params
        workers = params.threads or _cpu_count()
        emb = self.cols.embeddings
        t0 = time.perf_counter()
        plan = plan_buckets(
            emb,
            seqs.stop,
            crops_per_bucket=params.bucket_crops,
            probes=params.bucket_probes,
            seed=params.seed,
            workers=workers,
        )
        t1 = time.perf_counter()
        dense = dense_buckets(emb, plan, self.floor, largest=DENSE_BUCKET, workers=workers)
        for pairs in bucket_pairs(emb, plan, seqs.start, self.floor, skip=dense, workers=workers):
            self.confirm(pairs)
        t2 = time.perf_counter()
        self._dense = [plan.rows_of(int(bucket)) for bucket in dense]
        n_dense = self._settle_dense()
        log.debug(
            "buckets_linked",
            crops=len(seqs),
            buckets=plan.count,
            dense=n_dense,
            plan_s=round(t1 - t0, 2),
            pairs_s=round(t2 - t1, 2),
            dense_s=round(time.perf_counter() - t2, 2),
        )

    def exact(self, rows: IntArray, upto: int) -> None:
        """Exact search of ``rows`` against crops ``[0, upto)`` in bounded blocks."""
        block = max(1, 2**24 // max(upto, 1))
        for pairs in pairs_above(self.cols.embeddings, rows, upto, self.floor, block=block):
            self.confirm(pairs)

    # -- persistence --------------------------------------------------------------

    def resume(self, index_file: Path | None, index_covers: int) -> bool:
        """Index the crops already in ``cols`` after a restart, proposing nothing.

        The index is loaded from ``index_file`` when it covers exactly the first
        ``index_covers`` crops, and the rest are added to it; without a usable
        file it is rebuilt. Below ``brute_force_below`` crops no index is kept.
        Returns whether the saved index was used. The index holds each group of
        bit-identical crops once, so a loaded one must hold exactly the
        representatives of the first ``index_covers`` crops.
        """
        if self.cols.n < self.params.brute_force_below:
            return False
        used = False
        if index_file is not None and index_covers > 0 and index_file.exists():
            used = self._load(index_file, index_covers)
        if not used:
            self.index = self._new_index(self._capacity())
            self.dups.reset()
            index_covers = 0
        self._add_unique(np.arange(index_covers, self.cols.n, dtype=np.int64), link=False)
        return used

    def retiring(self, seqs: IntArray, retired: IntArray) -> None:
        """Before ``seqs`` are retired (``retired``: the set after, sorted): the
        first live copy of a retired representative is indexed in its place."""
        if self.index is not None:
            promoted = self.dups.promote(self.cols.embeddings, seqs, self.cols.n, retired)
            if len(promoted):
                self._index_add(promoted)

    def _unique(self, rows: IntArray, link: bool) -> IntArray:
        """The representatives among new ``rows``; each copy is linked to its
        representative (with ``link``) through the confirm sink."""
        copies, reps = self.dups.assign(self.cols.embeddings, rows, self.threshold, self.retired())
        if link and len(copies):
            self.confirm(Pairs(copies, reps, np.ones(len(copies))))
        if len(copies) == 0:
            return rows
        unique: IntArray = rows[self.dups.rep_of[rows] == rows]
        return unique

    def _add_unique(self, rows: IntArray, link: bool, ordered: bool = False) -> None:
        rows = self._unique(rows, link)
        if ordered:
            rows = self._locality_order(rows, pairs=False)
        for start in range(0, len(rows), self.params.chunk):
            self._index_add(rows[start : start + self.params.chunk])

    def save(self, path: Path) -> int:
        """Save the index atomically (fsync, rename, fsync the folder); return
        how many of the first crops it covers, holding each or a bit-identical copy
        of it (0: no index, nothing written). OSError on failure.

        Building with several threads is not deterministic, so the daemon keeps
        the index it built rather than rebuilding a different one at each start.
        """
        if self.index is None:
            return 0
        tmp = path.with_name(f".{path.name}.tmp")
        self.index.save_index(str(tmp))
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
        return self.cols.n

    def _load(self, path: Path, covers: int) -> bool:
        index = hnswlib.Index(space="ip", dim=self.cols.dim)
        try:
            index.load_index(str(path), max_elements=self._capacity())
        except (RuntimeError, OSError, ValueError) as exc:
            log.warning("index_unusable", file=str(path), reason=str(exc))
            return False
        reason = self._load_mismatch(index, covers)
        if reason:
            log.warning("index_unusable", file=str(path), reason=reason)
            self.dups.reset()
            return False
        # ef and the thread count are not saved with the index.
        index.set_ef(self.params.ef_search)
        index.set_num_threads(self.params.threads or _cpu_count())
        self.index = index
        return True

    def _load_mismatch(self, index: hnswlib.Index, covers: int) -> str:
        """Why a loaded index does not hold the representatives of the first
        ``covers`` crops ('' when it does; the duplicate map is then rebuilt)."""
        if index.dim != self.cols.dim or covers > self.cols.n:
            return f"dimension {index.dim} or {covers} crops do not match the state"
        labels = np.asarray(index.get_ids_list(), dtype=np.int64)
        if len(labels) != index.get_current_count() or np.any(labels >= covers):
            return f"holds {index.get_current_count()} crops, state says {covers}"
        self.dups.reset()
        try:
            self.dups.assign(
                self.cols.embeddings,
                np.arange(covers, dtype=np.int64),
                self.threshold,
                self.retired(),
                indexed=frozenset(labels.tolist()),
            )
        except ValueError as exc:
            return str(exc)
        return ""

    # -- the index ------------------------------------------------------------------

    def _capacity(self) -> int:
        return max(self.cols.n + self.cols.n // 8, 10_000)

    def _new_index(self, capacity: int) -> hnswlib.Index:
        index = hnswlib.Index(space="ip", dim=self.cols.dim)
        index.init_index(
            max_elements=capacity,
            M=self.params.m,
            ef_construction=self.params.ef_construction,
            random_seed=self.params.seed,
        )
        index.set_num_threads(self.params.threads or _cpu_count())
        return index

    def _index_add(self, ids: IntArray) -> None:
        assert self.index is not None
        needed = self.index.get_current_count() + len(ids)
        if needed > self.index.get_max_elements():
            # Grow ahead of need: hnswlib raises once max_elements is reached.
            self.index.resize_index(max(needed, 2 * self.index.get_max_elements()))
        self.index.add_items(self.cols.embeddings[ids], ids)

    # -- anchors: locality order and exact in-group pairs -----------------------------

    def _locality_order(self, ids: IntArray, pairs: bool = True) -> IntArray:
        """The order to index and query a batch in.

        HNSW on a large index is bound by memory latency, so neighbouring crops
        are handled one after another: sorted by their nearest of 1,024 sampled
        crops. A random 5% goes first, so the graph gets its long-range links
        from an unordered skeleton (sorted insertion alone loses recall).
        Measured at 200,000 crops: build 1.6x and queries 2.3x faster, recall
        unchanged. With ``pairs`` the anchors also give the exact in-group
        pairs (:meth:`_pairs_within_groups`); without, only the order.
        """
        ids = ids.astype(np.int64, copy=False)
        n = len(ids)
        if n < 4 * self.params.chunk:
            return ids
        rng = np.random.default_rng(self.params.seed)
        emb = self.cols.embeddings
        anchors = emb[ids[rng.choice(n, size=min(1024, n), replace=False)]]
        # Each crop's three nearest anchors, nearest first.
        top = np.empty((n, 3), dtype=np.int64)
        for start in range(0, n, 16_384):
            block = emb[ids[start : start + 16_384]] @ anchors.T
            best = np.argpartition(block, -3, axis=1)[:, -3:]
            rank = np.argsort(-np.take_along_axis(block, best, axis=1), axis=1)
            top[start : start + len(block)] = np.take_along_axis(best, rank, axis=1)
        nearest = top[:, 0]
        if pairs:
            self._pairs_within_groups(ids, nearest, top[:, 1:])
        first = rng.choice(n, size=n // 20, replace=False)
        rest = np.ones(n, dtype=bool)
        rest[first] = False
        later = np.nonzero(rest)[0]
        later = later[np.argsort(nearest[later], kind="stable")]
        order: IntArray = ids[np.concatenate([first, later])]
        return order

    def _pairs_within_groups(self, ids: IntArray, group: IntArray, runners_up: IntArray) -> None:
        """Exact pairs among crops that share their nearest anchor, and between
        crops whose nearest anchor is the other's second or third nearest
        (``runners_up``, one row per crop).

        Most pairs above the threshold are of those kinds, and matrix products
        find them exactly and cheaply, so HNSW only has to supply the rest (at a
        million crops its misses are pairs that straddle two groups). Groups
        too large for a cheap product are left to HNSW alone. Each crop's most
        similar group member is kept for :meth:`_knn`.
        """
        emb = self.cols.embeddings
        by_group = np.argsort(group, kind="stable")
        bounds = np.flatnonzero(np.diff(group[by_group])) + 1
        guest_of = runners_up.T.ravel()  # column-major: every crop's 2nd, then every 3rd
        guest_ids = np.tile(ids, runners_up.shape[1])
        by_guest = np.argsort(guest_of, kind="stable")
        guest_starts = np.searchsorted(guest_of[by_guest], np.arange(group.max() + 2))
        for at in np.split(by_group, bounds):
            members = ids[at]
            if len(members) < 2 or len(members) > 16_384:
                continue
            sims = emb[members] @ emb[members].T
            self.confirm(hits(sims, members, members, self.floor, upper=True))
            np.fill_diagonal(sims, -np.inf)
            self._nearest_known[members] = members[np.argmax(sims, axis=1)]
            g = int(group[at[0]])
            guests = guest_ids[by_guest[guest_starts[g] : guest_starts[g + 1]]]
            if 0 < len(guests) <= 16_384:
                for pairs in pairs_above(emb, guests, members, self.floor, block=len(guests)):
                    self.confirm(pairs)

    # -- queries --------------------------------------------------------------------

    def _knn(self, index: hnswlib.Index, rows: IntArray, ef: int, members: bool = True) -> IntArray:
        """Query ``index`` for each row, widening k until every neighbour above
        the threshold is inside the returned set; return the rows that got lost.

        With ``members``, a row still full at ``dense_k`` stops widening: its
        hits so far are proposed and the row goes to ``_dense`` for
        :meth:`_settle_dense`.

        With ``members`` every queried crop is itself in the index, so a search
        that returns neither the crop itself nor its most similar crop known
        from the exact in-group pass got lost on the way (or the crop has no
        incoming links, which is common at a million crops and is why the
        second landmark exists): such rows are returned unproposed.
        """
        count = index.get_current_count()
        k = min(self.params.k_start, count)
        pending = rows
        lost_rows: list[IntArray] = []
        while len(pending):
            index.set_ef(max(ef, k))
            try:
                labels, distances = index.knn_query(self.cols.embeddings[pending], k=k)
            except RuntimeError:
                # hnswlib could not gather k results (a sparse graph region):
                # settle these rows exactly rather than risk a missed link.
                lost_rows.append(pending)
                break
            labels = labels.astype(np.int64)
            sims = 1.0 - distances
            full = (sims[:, -1] >= self.floor) & (k < count)
            if members:
                landmarks = np.full(len(pending), -1, dtype=np.int64)
                if len(self._nearest_known):
                    landmarks = self._nearest_known[pending]
                reached = (labels == pending[:, None]) | (labels == landmarks[:, None])
                lost = ~full & ~reached.any(axis=1)
            else:
                lost = np.zeros_like(full)
            dense = full & (k >= self.params.dense_k) if members else np.zeros_like(full)
            done = (~full & ~lost) | dense
            hit_rows, hit_cols = np.nonzero((sims >= self.floor) & done[:, None])
            self.confirm(
                Pairs(pending[hit_rows], labels[hit_rows, hit_cols], sims[hit_rows, hit_cols])
            )
            lost_rows.append(pending[lost])
            self._dense.append(pending[dense])
            pending = pending[full & ~dense]
            k = min(4 * k, count)
        return np.concatenate(lost_rows) if lost_rows else np.empty(0, dtype=np.int64)

    def _settle_lost(self, lost: IntArray) -> int:
        """Propose the pairs of the crops whose own search got lost; return how
        many there were.

        A few are asked again with a larger ef and then settled exactly. Many
        (thousands at a million crops, mostly nodes HNSW left without incoming
        links, which no ef finds) get an index of their own that every other
        crop queries, plus an exact search among themselves: each of their
        pairs is again searched from both ends, for a fraction of the cost of
        an exact search against everything.
        """
        assert self.index is not None
        count = self.cols.n
        n_lost = len(lost)
        if n_lost >= self.params.side_index_from:
            self._via_side_index(np.unique(lost), count)
            return n_lost
        ef = self.params.ef_search
        while len(lost) and ef < _MAX_EF:
            ef = min(4 * ef, _MAX_EF)
            lost = self._knn(self.index, lost, ef)
        if len(lost):
            self.exact(lost, count)
        return n_lost

    # -- dense groups ---------------------------------------------------------------

    def _settle_dense(self) -> int:
        """Propose every pair of the crops in ``_dense`` that a full search would;
        return how many crops there were.

        A greedy cover splits them into leaders with members (see
        :meth:`_cover`); each member is proposed with its leader, so a
        leader's members end up in one cluster. Whatever a member links to is
        within ``reach`` of the leader (angles add up), so every crop there
        that is not a member is compared exactly with all members.
        """
        if not self._dense:
            return 0
        dense = np.unique(np.concatenate(self._dense))
        self._dense = []
        if len(dense) == 0:
            return 0
        member_cos, reach_cos = self._cover_radii()
        emb = self.cols.embeddings
        count = self.cols.n
        cover = self._cover(dense, member_cos)
        step = max(1, 2**24 // count)
        for start in range(0, len(cover), step):
            part = cover[start : start + step]
            leaders = np.array([leader for leader, _ in part], dtype=np.int64)
            sims = emb[leaders] @ emb[:count].T
            for row, (leader, members) in enumerate(part):
                self.confirm(Pairs(members, np.full(len(members), leader), sims[row, members]))
                near = np.flatnonzero(sims[row] >= reach_cos).astype(np.int64)
                self._link_to_members(np.setdiff1d(near, members), members)
        return len(dense)

    def _cover_radii(self) -> tuple[float, float]:
        """(member_cos, reach_cos): a member's least similarity to its leader,
        and the least similarity to the leader of anything a member can link to.

        Members lie within half the threshold angle, and at least
        ``FLOAT32_MARGIN`` above the threshold, so their pair with the leader is
        accepted without a float64 check. Both bounds allow for float32 error.
        """
        link_angle = math.acos(max(-1.0, min(1.0, self.floor)))
        member_cos = max(math.cos(link_angle / 2), self.threshold + FLOAT32_MARGIN)
        member_angle = math.acos(max(-1.0, min(1.0, member_cos - FLOAT32_MARGIN)))
        reach_cos = math.cos(min(math.pi, link_angle + member_angle)) - FLOAT32_MARGIN
        return member_cos, reach_cos

    def _cover(self, rows: IntArray, member_cos: float) -> list[tuple[int, IntArray]]:
        """Greedy cover of ``rows``: the first uncovered row leads every uncovered
        row at least ``member_cos`` similar to it. Returns (leader, members) pairs;
        each leader is among its members, each row in exactly one."""
        emb = self.cols.embeddings
        left = rows
        cover: list[tuple[int, IntArray]] = []
        while len(left):
            leader = int(left[0])
            close = emb[left] @ emb[leader] >= member_cos
            close[0] = True  # float32 may put a crop a hair below itself
            cover.append((leader, left[close]))
            left = left[~close]
        return cover

    def _link_to_members(self, outsiders: IntArray, members: IntArray) -> None:
        """Propose the pairs of ``outsiders`` with ``members`` (one cluster already)
        that can link: one sure pair per outsider is enough, and where none is
        sure, every pair within the float32 margin goes to the exact check."""
        if len(outsiders) == 0:
            return
        emb = self.cols.embeddings
        sure_from = self.threshold + FLOAT32_MARGIN
        step = max(1, 2**24 // len(members))
        for start in range(0, len(outsiders), step):
            part = outsiders[start : start + step]
            sims = emb[part] @ emb[members].T
            best = np.argmax(sims, axis=1)
            best_sim = sims[np.arange(len(part)), best]
            sure = best_sim >= sure_from
            self.confirm(Pairs(part[sure], members[best[sure]], best_sim[sure]))
            unsure = ~sure
            self.confirm(hits(sims[unsure], part[unsure], members, self.floor))

    def _via_side_index(self, lost: IntArray, count: int) -> None:
        """Exact pairs among ``lost``; every other indexed crop queries an index of them."""
        emb = self.cols.embeddings
        for pairs in pairs_above(emb, lost, lost, self.floor, block=1024):
            self.confirm(pairs)
        side = hnswlib.Index(space="ip", dim=self.cols.dim)
        side.init_index(
            max_elements=len(lost),
            M=self.params.m,
            ef_construction=self.params.ef_construction,
            random_seed=self.params.seed,
        )
        side.set_num_threads(self.params.threads or _cpu_count())
        side.add_items(emb[lost], lost)
        others = self.dups.indexed_mask(count)
        others[lost] = False
        rows = np.nonzero(others)[0].astype(np.int64)
        for start in range(0, len(rows), self.params.chunk):
            part = rows[start : start + self.params.chunk]
            failed = self._knn(side, part, self.params.side_ef, members=False)
            for pairs in pairs_above(emb, failed, lost, self.floor, block=len(failed)):
                self.confirm(pairs)


def bulk_costs(
    new: int, held: int, dim: int, crops_per_bucket: int, probes: int
) -> tuple[float, float]:
    """Estimated CPU seconds of exact products and of buckets for ``new`` crops
    against ``held`` earlier ones and each other, by the model fitted in
    :mod:`crop_clusterd.defaults`: exact ``EXACT_S_PER_PAIR_DIM`` per pair and
    dimension; buckets ``BUCKET_S_PER_CENTRE_DIM`` per crop, bucket and
    dimension (k-means and assignment) plus ``BUCKET_S_PER_PROBE_DIM`` per crop,
    probed crop and dimension."""
    n = new + held
    pairs = new * held + new * (new - 1) / 2
    exact_s = defaults.EXACT_S_PER_PAIR_DIM * pairs * dim
    lists = bucket_count(n, crops_per_bucket)
    buckets_s = dim * (
        defaults.BUCKET_S_PER_CENTRE_DIM * n * lists
        + defaults.BUCKET_S_PER_PROBE_DIM * n * min(probes, lists) * (n / lists)
    )
    return exact_s, buckets_s


def exact_cheaper(
    new: int,
    held: int,
    dim: int,
    crops_per_bucket: int = defaults.BUCKET_CROPS,
    probes: int = defaults.BUCKET_PROBES,
) -> bool:
    """Whether to search by exact products rather than buckets: while exact costs
    at most ``EXACT_PREMIUM`` times the buckets' estimate (:func:`bulk_costs`),
    because exact products cannot miss a pair and buckets can."""
    exact_s, buckets_s = bulk_costs(new, held, dim, crops_per_bucket, probes)
    return exact_s <= defaults.EXACT_PREMIUM * buckets_s


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
