"""Candidate pairs of one large batch from buckets of similar crops (an inverted file).

Above the size where even tiled all-pairs products (:mod:`.allpairs`) cost too
much, a batch is split into buckets by spherical k-means, and each crop is
compared exactly with the crops of its own bucket and of the next ``probes - 1``
buckets whose centres are most similar to it (an inverted file, IVF, as in
faiss's ``IndexIVFFlat``, with an exact product per bucket). Every product is a
BLAS matrix product, spread over all cores; there is no graph to walk.

What makes it safe on embeddings with no structure to navigate by (issue 13's
near-threshold groups, whose members sit at cosine 0.9 of each other and at 0
of everything else):

* The centres are refined over the whole batch, not only the training sample:
  a group then pulls its bucket's centre towards itself, so its members agree
  on their bucket (see :data:`FULL_PASSES`).
* A pair is found from either end: from the crop whose bucket the other probes,
  or the other way round.

This is a search, not a proof: a pair neither end probes is missed. The
defaults (:data:`~crop_clusterd.defaults.BUCKET_CROPS`,
:data:`~crop_clusterd.defaults.BUCKET_PROBES`) were chosen from the misses
measured against the exact pairs (``scripts/check_oracle.py``), and a batch
small enough for the exact engine never comes here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt
from threadpoolctl import threadpool_limits

from .. import defaults
from .base import IntArray
from .exact import Pairs

F32 = npt.NDArray[np.float32]
T = TypeVar("T")
R = TypeVar("R")

# k-means: the sample seeds the centres cheaply, the passes over every row make
# them. Misses of exact pairs at 200,000 near-threshold crops (403,994 pairs;
# 200 crops per bucket, 16 probes) after 1, 2 and 3 full passes: 84, 16, 2 (the
# 2 split no cluster); with centres from a sample alone, hundreds.
SAMPLE_PER_BUCKET = 10
SAMPLE_PASSES = 4
FULL_PASSES = 3
# Rows per assignment block: 2,048 rows' similarities to 10,000 centres are 80 MB.
_ROWS = 2048


@dataclass(frozen=True, slots=True)
class Buckets:
    """The buckets of rows ``[0, n)``.

    ``home`` (n,) is each row's bucket; ``probed`` (n x (probes - 1)) the other
    buckets it is compared with; ``members`` the rows sorted by bucket, and the
    rows of bucket ``j`` are ``members[starts[j]:starts[j + 1]]``.
    """

    home: IntArray
    probed: IntArray
    members: IntArray
    starts: IntArray

    @property
    def count(self) -> int:
        return len(self.starts) - 1

    def rows_of(self, bucket: int) -> IntArray:
        rows: IntArray = self.members[self.starts[bucket] : self.starts[bucket + 1]]
        return rows


def bucket_count(n: int, crops_per_bucket: int = defaults.BUCKET_CROPS) -> int:
    """How many buckets ``n`` crops get: about ``crops_per_bucket`` each."""
    return max(1, round(n / crops_per_bucket))


def plan_buckets(
    embeddings: F32,
    stop: int,
    *,
    crops_per_bucket: int = defaults.BUCKET_CROPS,
    probes: int = defaults.BUCKET_PROBES,
    seed: int = 0,
    workers: int = 1,
) -> Buckets:
    """The buckets of the unit float32 rows ``[0, stop)`` (``stop >= 1``): about
    ``crops_per_bucket`` rows each, each row probing ``probes`` buckets in all.
    Runs on ``workers`` threads with single-threaded BLAS each."""
    with _pool(workers) as pool:
        lists = min(bucket_count(stop, crops_per_bucket), stop)
        centres = train_centres(embeddings, stop, lists, seed, pool)
        return assign(embeddings, stop, centres, min(probes, lists), pool)


def bucket_pairs(
    embeddings: F32,
    buckets: Buckets,
    start: int,
    floor: float,
    *,
    skip: IntArray | None = None,
    workers: int = 1,
) -> Iterator[Pairs]:
    """Candidate pairs ``(a, b)`` with ``a != b``, at least one of them ``>= start``
    and float32 similarity >= ``floor``: every pair of two rows of one bucket,
    and of a row with each bucket it probes. A pair may come twice (from both
    ends). Rows of the buckets in ``skip`` (bucket numbers) take no part: the
    caller settles them otherwise.
    """
    with _pool(workers) as pool:
        yield from _probe(embeddings, buckets, start, floor, pool, skip)


def train_centres(
    embeddings: F32, stop: int, lists: int, seed: int, pool: ThreadPoolExecutor
) -> F32:
    """``lists`` unit centres (lists x d float32) for rows ``[0, stop)``.

    Spherical k-means, seeded on a sample of :data:`SAMPLE_PER_BUCKET` rows per
    centre (:data:`SAMPLE_PASSES` passes), then :data:`FULL_PASSES` passes
    over every row: only those pull each centre to the groups that really fall
    in it. An empty bucket is re-seeded with a random row.
    """
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(stop, size=min(stop, SAMPLE_PER_BUCKET * lists), replace=False))
    rows = embeddings[sample]
    centres = rows[rng.choice(len(rows), size=lists, replace=False)].copy()
    for _ in range(SAMPLE_PASSES):
        centres = _kmeans_pass(rows, centres, pool, rng)
    for _ in range(FULL_PASSES):
        centres = _kmeans_pass(embeddings[:stop], centres, pool, rng)
    return centres


def assign(
    embeddings: F32, stop: int, centres: F32, probes: int, pool: ThreadPoolExecutor
) -> Buckets:
    """Each row's home (its most similar centre) and the ``probes - 1`` next ones."""

    def top(block: slice) -> IntArray:
        return top_k(_product(embeddings[block], centres), probes).astype(np.int32)

    ranked = np.concatenate(_map(pool, top, _blocks(stop)))
    home = ranked[:, 0].astype(np.int64)
    members = np.argsort(home, kind="stable")
    starts = np.searchsorted(home[members], np.arange(len(centres) + 1))
    return Buckets(home, ranked[:, 1:], members, starts)


def top_k(sims: F32, k: int, group: int = 8) -> IntArray:
    """The columns of each row's ``k`` largest entries (rows x k), largest first.

    A row's ``k`` largest entries lie in the ``k`` column groups with the
    largest maxima: a group ranked below ``k`` others lies below ``k`` distinct
    larger entries. So a partition of the group maxima and of the ``k x group``
    entries they point to replaces a partition of the whole row, at a third of
    its cost. Group ``j`` is the columns ``j, j + g, j + 2g, ...`` (``g`` groups):
    a maximum over strided rows runs at memory speed, one over adjacent columns
    at a twentieth of it.
    """
    rows, cols = sims.shape
    groups = cols // group
    if groups < 2 * k:
        best: IntArray = np.argpartition(sims, -k, axis=1)[:, -k:]
    else:
        maxima = sims[:, : groups * group].reshape(rows, group, groups).max(axis=1)
        chosen = np.argpartition(maxima, -k, axis=1)[:, -k:]
        candidates = (chosen[:, :, None] + groups * np.arange(group)).reshape(rows, k * group)
        if groups * group < cols:  # the columns left over are always candidates
            rest = np.arange(groups * group, cols)
            candidates = np.hstack([candidates, np.broadcast_to(rest, (rows, len(rest)))])
        values = np.take_along_axis(sims, candidates, axis=1)
        best = np.take_along_axis(candidates, np.argpartition(values, -k, axis=1)[:, -k:], axis=1)
    rank = np.argsort(-np.take_along_axis(sims, best, axis=1), axis=1)
    ordered: IntArray = np.take_along_axis(best, rank, axis=1)
    return ordered


def dense_buckets(
    embeddings: F32,
    buckets: Buckets,
    floor: float,
    *,
    largest: int,
    share: float = 0.5,
    workers: int = 1,
) -> IntArray:
    """The buckets that hold a dense group (sorted): more than ``largest`` rows,
    or at least 16 rows of which at least ``share`` of the pairs reach ``floor``.

    k-means spreads a stuck insect's thousands of near-duplicates over many
    buckets, each then all links: probing them would propose every crop's
    pairs with all of its probed buckets, where a few links would do.
    """
    sizes = np.diff(buckets.starts)
    candidates = np.flatnonzero((sizes >= 16) & (sizes <= largest)).tolist()

    def tight(bucket: int) -> bool:
        rows = embeddings[buckets.rows_of(bucket)]
        linked = np.count_nonzero(_product(rows, rows) >= floor) - len(rows)
        return bool(linked >= share * len(rows) * (len(rows) - 1))

    with _pool(workers) as pool:
        flags = _map(pool, tight, candidates)
    found = [b for b, flag in zip(candidates, flags, strict=True) if flag]
    dense: IntArray = np.union1d(np.flatnonzero(sizes > largest), np.array(found, dtype=np.int64))
    return dense


def _probe(
    embeddings: F32,
    buckets: Buckets,
    start: int,
    floor: float,
    pool: ThreadPoolExecutor,
    skip: IntArray | None,
) -> Iterator[Pairs]:
    """The pairs inside each bucket and between it and the rows that probe it."""
    guests = buckets.probed.ravel().astype(np.int64)
    guest_rows = np.repeat(np.arange(len(buckets.home), dtype=np.int64), buckets.probed.shape[1])
    skipped = np.zeros(buckets.count, dtype=bool)
    if skip is not None:
        skipped[skip] = True
        # A skipped bucket's rows visit nobody either.
        keep = ~skipped[buckets.home[guest_rows]]
        guests, guest_rows = guests[keep], guest_rows[keep]
    by_bucket = np.argsort(guests, kind="stable")
    guest_starts = np.searchsorted(guests[by_bucket], np.arange(buckets.count + 1))
    guest_rows = guest_rows[by_bucket]

    def one(bucket: int) -> Pairs:
        members = buckets.rows_of(bucket)
        visitors = guest_rows[guest_starts[bucket] : guest_starts[bucket + 1]]
        if start > 0 and members[-1] < start:
            # Pairs of two earlier crops were linked with them.
            visitors = visitors[visitors >= start]
        left = np.concatenate([members, visitors])
        sims = _product(embeddings[left], embeddings[members])
        # A row maximum first: most visitors hold no hit (as in allpairs._tile_hits).
        hot = np.flatnonzero(sims.max(axis=1) >= floor)
        r, c = np.nonzero(sims[hot] >= floor)
        r = hot[r]
        # Members with members once each (the later one first); visitors with all.
        keep = (r >= len(members)) | (c < r)
        if start > 0:
            keep &= np.maximum(left[r], members[c]) >= start
        r, c = r[keep], c[keep]
        return Pairs(left[r], members[c], sims[r, c])

    order = np.flatnonzero(~skipped & (np.diff(buckets.starts) > 0)).tolist()
    # All at once, so the workers go on while the caller confirms; a bucket's
    # hits are few (dense buckets are skipped), so waiting results stay small.
    yield from pool.map(one, order)


@contextmanager
def _pool(workers: int) -> Iterator[ThreadPoolExecutor]:
    """A thread pool whose threads run single-threaded BLAS: the products are
    split by rows, so thresholding runs in parallel too."""
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(max(1, workers)) as pool:
        yield pool


_local = threading.local()


def _product(rows: F32, cols: F32) -> F32:
    """``rows @ cols.T`` into this thread's buffer (valid until its next call):
    a fresh array per block costs its page faults, as much as the product."""
    size = len(rows) * len(cols)
    buffer = getattr(_local, "buffer", None)
    if buffer is None or len(buffer) < size:
        buffer = _local.buffer = np.empty(size, dtype=np.float32)
    out: F32 = buffer[:size].reshape(len(rows), len(cols))
    np.matmul(rows, cols.T, out=out)
    return out


def _kmeans_pass(
    rows: F32, centres: F32, pool: ThreadPoolExecutor, rng: np.random.Generator
) -> F32:
    """One spherical k-means pass: the normalised mean of the rows nearest each
    centre (a centre nearest to none gets a random row).

    Blocks of rows are labelled on every core; their sums are added up here in
    block order, so the centres, and with them the clusters, are the same
    whatever the number of workers and however the threads ran.
    """
    lists = len(centres)

    def block(rows_at: slice) -> tuple[IntArray, F32, IntArray]:
        part = rows[rows_at]
        labels = np.argmax(_product(part, centres), axis=1)
        order = np.argsort(labels, kind="stable")
        ordered = labels[order]
        firsts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        counts = np.diff(np.r_[firsts, len(ordered)])
        return ordered[firsts], np.add.reduceat(part[order], firsts, axis=0), counts

    sums = np.zeros_like(centres)
    counts = np.zeros(lists, np.int64)
    for labels, part_sums, part_counts in pool.map(block, _blocks(len(rows))):
        sums[labels] += part_sums
        counts[labels] += part_counts
    empty = np.flatnonzero(counts == 0)
    sums[empty] = rows[rng.choice(len(rows), size=len(empty), replace=False)]
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    norms[norms == 0] = 1.0  # rows that cancel out: a zero centre wins no row
    new: F32 = sums / norms
    return new


def _blocks(n: int) -> list[slice]:
    return [slice(s, min(n, s + _ROWS)) for s in range(0, n, _ROWS)]


def _map(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: list[T]) -> list[R]:
    return list(pool.map(fn, items))
