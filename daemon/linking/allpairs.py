"""Exact all-pairs search in tiles: the batch engine below the index crossover.

Every pair of a batch (with itself and with the crops before it) is visited,
so nothing can be missed, and the cost is kept down three ways:

* Lower triangle only: a pair is computed once, not from both ends.
* Tiles over every core: ``side x side`` BLAS products, one worker thread per
  core with single-threaded BLAS each, so thresholding runs in parallel too.
* A bound before the full product (:class:`Head`): in the basis of the rows'
  principal directions, ``x . y <= head(x) . head(y) + |tail(x)| |tail(y)|``
  (Cauchy-Schwarz on the trailing components) ``<= head(x) . head(y) +
  (|tail(x)|^2 + |tail(y)|^2) / 2``. The last form is one product of rows
  ``[head(x), |tail(x)|^2 / 2, 1]`` and ``[head(y), 1, |tail(y)|^2 / 2]``,
  so the tile product runs on ``k + 2`` columns instead of all of them, and
  only the rows and pairs whose bound reaches the threshold get the full
  float32 product. The bound is exact, not a sample: a pair it drops cannot
  reach the threshold.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from threadpoolctl import threadpool_limits

from .exact import Pairs

F32 = npt.NDArray[np.float32]
# A pair is dropped only when its bound is this far below the floor. Like
# exact.FLOAT32_MARGIN (float32 products of unit vectors err by under 1e-5), ten
# times wider: the bound stacks two float32 products (the rotation, then the
# head), and the test checks the bound against every product to 1e-5.
BOUND_MARGIN = 1e-3
# What one surviving pair costs (a gather of two rows and their float32 product),
# in units of one dimension of the tile product per pair; measured on the
# project machines (scripts/bench_peers.py, see defaults.EXACT_S_PER_PAIR_DIM).
SURVIVOR_DIMS = 6000.0
# What bounding one pair of a hot row costs (an add, a compare, a nonzero), alike.
HOT_ROW_DIMS = 300.0


@dataclass(frozen=True, slots=True)
class Head:
    """Rows ``[0, n)`` for the bound: ``left`` is ``[head, |tail|^2 / 2, 1]`` and
    ``right`` ``[head, 1, |tail|^2 / 2]`` (n x (k + 2) float32 each), ``head``
    the ``k`` leading principal components of a row and ``tail`` the rest."""

    left: F32
    right: F32


def principal_head(embeddings: F32, stop: int, floor: float, seed: int = 0) -> Head | None:
    """The head of rows ``[0, stop)`` that makes a tile cheapest, or None when
    the full product is cheapest (the bound would keep too many pairs).

    The basis is the eigenvectors of a sample's second moment, so the leading
    components carry the most energy and the tails are as short as they get;
    ``k`` is chosen by the estimated cost on a sample (see :data:`SURVIVOR_DIMS`).
    """
    dim = embeddings.shape[1]
    if stop < 2 or dim < 64:
        return None
    rng = np.random.default_rng(seed)
    picked = rng.permutation(stop)[:8192]
    fit, held_out = embeddings[np.sort(picked[::2])], embeddings[np.sort(picked[1::2])]
    moment = fit.T.astype(np.float64) @ fit.astype(np.float64)
    with threadpool_limits(1, user_api="blas"):
        # Threaded LAPACK spends more time synchronising than computing at this size.
        _, vectors = np.linalg.eigh(moment)
    basis = np.ascontiguousarray(vectors[:, ::-1], dtype=np.float32)
    # Costed on other rows than the basis was fitted to: on its own sample a
    # basis shows shorter tails than the rest of the rows will have.
    k = _cheapest_k(held_out @ basis, floor)
    return None if k >= dim else head_of(embeddings, stop, basis[:, :k], basis[:, k:])


def head_of(embeddings: F32, stop: int, lead: F32, rest: F32) -> Head:
    """The :class:`Head` of rows ``[0, stop)`` for an orthonormal basis split in
    its leading columns ``lead`` (d x k) and the rest ``rest`` (d x (d - k))."""
    k = lead.shape[1]
    left = np.empty((stop, k + 2), dtype=np.float32)
    right = np.empty((stop, k + 2), dtype=np.float32)
    for start in range(0, stop, 16_384):
        rows = slice(start, min(stop, start + 16_384))
        block = embeddings[rows]
        tail = block @ rest
        half_tail = np.einsum("ij,ij->i", tail, tail) / 2
        left[rows, :k] = right[rows, :k] = block @ lead
        left[rows, k], left[rows, k + 1] = half_tail, 1.0
        right[rows, k], right[rows, k + 1] = 1.0, half_tail
    return Head(left, right)


def _cheapest_k(turned: F32, floor: float) -> int:
    """The head width with the least estimated cost per pair on a sample of
    rotated rows (the full width when no head beats it): the product's columns,
    plus :data:`HOT_ROW_DIMS` per pair of a row whose bound reaches ``floor``
    somewhere in 2,048 columns, plus :data:`SURVIVOR_DIMS` per pair it keeps.
    The sample's rows with themselves always survive: a small overcount."""
    dim = int(turned.shape[1])
    probe, cols = turned[:1024], turned[1024:3072]
    best, best_cost = dim, float(dim)
    for k in range(max(32, dim // 12), dim // 2 + 1, max(16, dim // 24)):
        half = np.einsum("ij,ij->i", turned[:, k:], turned[:, k:]) / 2
        bound = probe[:, :k] @ cols[:, :k].T + half[:1024, None] + half[None, 1024:3072]
        keep = bound >= floor - BOUND_MARGIN
        hot = np.count_nonzero(keep.any(axis=1)) / len(probe)
        cost = k + 2 + HOT_ROW_DIMS * hot + SURVIVOR_DIMS * np.count_nonzero(keep) / keep.size
        if cost < best_cost:
            best, best_cost = k, cost
    return best


def earlier_pairs(
    embeddings: F32,
    start: int,
    stop: int,
    floor: float,
    *,
    head: Head | None = None,
    side: int = 2048,
    workers: int = 1,
) -> Iterator[Pairs]:
    """Every pair ``(i, j)`` with ``start <= i < stop``, ``j < i`` and similarity >= ``floor``.

    ``head`` (of rows ``[0, stop)`` at least) turns on the bound; each pair's
    ``approx`` is then its full float32 product all the same. Tiles are
    ``side x side`` (16 MiB of float32 at 2048), one per task on ``workers``
    threads. Yields one :class:`Pairs` per tile (``a`` the later crop), in order.
    """
    tiles = [
        (r0, c0) for r0 in range(start, stop, side) for c0 in range(0, min(stop, r0 + side), side)
    ]
    local = threading.local()
    left = embeddings if head is None else head.left
    right = embeddings if head is None else head.right

    def run(tile: tuple[int, int]) -> Pairs:
        r0, c0 = tile
        r1, c1 = min(stop, r0 + side), min(stop, r0 + side, c0 + side)
        buffer = getattr(local, "buffer", None)
        if buffer is None:
            # One buffer per worker: a fresh array per tile costs its page faults.
            buffer = local.buffer = np.empty(side * side, dtype=np.float32)
        sims = buffer[: (r1 - r0) * (c1 - c0)].reshape(r1 - r0, c1 - c0)
        np.matmul(left[r0:r1], right[c0:c1].T, out=sims)
        if head is None:
            return _tile_hits(sims, r0, c0, floor)
        return _bounded_hits(embeddings, sims, (r0, c0), floor)

    yield from _in_parallel(run, tiles, workers)


def _in_parallel(
    run: Callable[[tuple[int, int]], Pairs], tiles: list[tuple[int, int]], workers: int
) -> Iterator[Pairs]:
    if workers <= 1:
        yield from map(run, tiles)
        return
    # A bounded window of tiles in flight keeps memory flat however many there are.
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
        window = 4 * workers
        for at in range(0, len(tiles), window):
            yield from pool.map(run, tiles[at : at + window])


def _tile_hits(sims: F32, r0: int, c0: int, floor: float) -> Pairs:
    """The entries of a tile (corner ``r0, c0``) at or above ``floor`` with
    column < row, as pairs of sequence numbers.

    A row maximum first: it costs a twentieth of ``np.nonzero`` over the whole
    tile, and at a high threshold most rows of a tile hold no hit.
    """
    hot = np.flatnonzero(sims.max(axis=1) >= floor)
    r, c = np.nonzero(sims[hot] >= floor)
    r = hot[r]
    if c0 + sims.shape[1] > r0:  # the tile touches the diagonal
        keep = c + c0 < r + r0
        r, c = r[keep], c[keep]
    return Pairs((r + r0).astype(np.int64), (c + c0).astype(np.int64), sims[r, c])


def _bounded_hits(embeddings: F32, bounds: F32, corner: tuple[int, int], floor: float) -> Pairs:
    """As :func:`_tile_hits` for a tile of bounds: the pairs whose bound
    reaches ``floor`` get the full float32 product, those reaching it are kept."""
    r0, c0 = corner
    need = floor - BOUND_MARGIN
    hot = np.flatnonzero(bounds.max(axis=1) >= need)
    r, c = np.nonzero(bounds[hot] >= need)
    a, b = hot[r] + r0, c + c0
    if c0 + bounds.shape[1] > r0:
        keep = b < a
        a, b = a[keep], b[keep]
    full = np.einsum("ij,ij->i", embeddings[a], embeddings[b])
    ok = full >= floor
    return Pairs(a[ok].astype(np.int64), b[ok].astype(np.int64), full[ok])
