"""Exact similarity: the one definition of pair cosine, and blocked products.

Every candidate pair, wherever it comes from (a float32 matrix product here or
hnswlib's ``1 - <a, b>``), is judged against the threshold by :func:`accept`,
which settles pairs close to the threshold with :func:`pair_cosine`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from threadpoolctl import threadpool_limits

from .base import FloatArray, IntArray

# Candidate similarities come from float32 arithmetic (hnswlib's 1 - <a, b>, or a
# float32 matrix product), whose error for unit vectors is below 1e-5. Candidates
# are gathered from this margin below the threshold, and any pair within it of the
# threshold is settled with the exact float64 definition (pair_cosine).
FLOAT32_MARGIN = 1e-4


def pair_cosine(embeddings: npt.NDArray[np.float32], a: IntArray, b: IntArray) -> FloatArray:
    """Exact cosine of the pairs ``(a[i], b[i])`` of L2-normalised float32 rows.

    This is the definition the engine and its tests share: a float64 dot product
    of the stored float32 vectors. Returns one float64 per pair.
    """
    if len(a) == 0:
        return np.empty(0, dtype=np.float64)
    left = embeddings[a].astype(np.float64)
    right = embeddings[b].astype(np.float64)
    sims: FloatArray = np.einsum("ij,ij->i", left, right)
    return sims


def candidate_floor(threshold: float) -> float:
    """The lowest approximate similarity a pair may have and still link."""
    return threshold - FLOAT32_MARGIN


@dataclass(frozen=True, slots=True)
class Pairs:
    """Candidate pairs ``(a[i], b[i])`` (sequence numbers) and their approximate
    (float32-accurate) similarity ``approx[i]``; three arrays of one length."""

    a: IntArray
    b: IntArray
    approx: npt.NDArray[np.floating]


def hits(
    sims: npt.NDArray[np.floating],
    rows: IntArray,
    cols: IntArray,
    floor: float,
    *,
    upper: bool = False,
) -> Pairs:
    """The entries of a ``len(rows) x len(cols)`` similarity block at or above ``floor``.

    With ``upper`` only entries above the diagonal count (a block of a set
    against itself, each pair once). Pairs come in row-major order.
    """
    mask = sims >= floor
    if upper:
        mask = np.triu(mask, k=1)
    r, c = np.nonzero(mask)
    return Pairs(rows[r], cols[c], sims[r, c])


def pairs_above(
    embeddings: npt.NDArray[np.float32],
    rows: IntArray,
    cols: IntArray | int,
    floor: float,
    *,
    block: int,
) -> Iterator[Pairs]:
    """Every pair of a row of ``rows`` and a column with similarity >= ``floor``.

    ``cols`` is an array of sequence numbers or an int ``upto`` meaning crops
    ``[0, upto)`` (a view, not a copy: at a million crops a copy would be 1.5
    GB). Rows are taken ``block`` at a time, so at most ``block x len(cols)``
    float32 similarities exist at once; one :class:`Pairs` per block, in order.
    """
    if len(rows) == 0:
        return
    if isinstance(cols, np.ndarray):
        right = embeddings[cols]
        col_ids = cols
    else:
        right = embeddings[: int(cols)]
        col_ids = np.arange(int(cols), dtype=np.int64)
    step = max(1, block)
    for start in range(0, len(rows), step):
        part = rows[start : start + step]
        yield hits(embeddings[part] @ right.T, part, col_ids, floor)


def accept(
    embeddings: npt.NDArray[np.float32], pairs: Pairs, threshold: float
) -> npt.NDArray[np.bool_]:
    """Which candidate pairs really are at or above ``threshold`` (one bool per pair).

    An approximate similarity at least the float32 margin above the threshold
    is trusted; one within the margin is settled by :func:`pair_cosine`.
    """
    ok = pairs.approx >= threshold + FLOAT32_MARGIN
    unsure = np.nonzero(~ok & (pairs.approx >= threshold - FLOAT32_MARGIN))[0]
    ok[unsure] = pair_cosine(embeddings, pairs.a[unsure], pairs.b[unsure]) >= threshold
    return np.asarray(ok)


def earlier_pairs(
    embeddings: npt.NDArray[np.float32],
    start: int,
    stop: int,
    floor: float,
    *,
    side: int = 2048,
    workers: int = 1,
) -> Iterator[Pairs]:
    """Every pair ``(i, j)`` with ``start <= i < stop``, ``j < i`` and similarity >= ``floor``.

    The lower triangle only: a batch's pairs among themselves are computed
    once, not from both ends, which halves the products of an all-pairs
    search. The work is cut into ``side x side`` tiles (16 MiB of float32 at
    2048), each one BLAS ``sgemm`` into a buffer of its worker's; ``workers``
    threads take tiles, each with single-threaded BLAS, so the thresholding
    runs on every core too and no BLAS thread spins waiting for another.
    Yields one :class:`Pairs` per tile (``a`` the later crop), tiles in order.
    """
    tiles = [
        (r0, c0) for r0 in range(start, stop, side) for c0 in range(0, min(stop, r0 + side), side)
    ]
    local = threading.local()

    def run(tile: tuple[int, int]) -> Pairs:
        r0, c0 = tile
        r1, c1 = min(stop, r0 + side), min(stop, r0 + side, c0 + side)
        buffer = getattr(local, "buffer", None)
        if buffer is None:
            # One buffer per worker: a fresh array per tile costs its page faults.
            buffer = local.buffer = np.empty(side * side, dtype=np.float32)
        sims = buffer[: (r1 - r0) * (c1 - c0)].reshape(r1 - r0, c1 - c0)
        np.matmul(embeddings[r0:r1], embeddings[c0:c1].T, out=sims)
        return _tile_hits(sims, r0, c0, floor, diagonal=c1 > r0)

    if workers <= 1:
        yield from map(run, tiles)
        return
    # A bounded window of tiles in flight keeps memory flat however many there are.
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
        window = 4 * workers
        for at in range(0, len(tiles), window):
            yield from pool.map(run, tiles[at : at + window])


def _tile_hits(
    sims: npt.NDArray[np.float32], r0: int, c0: int, floor: float, diagonal: bool
) -> Pairs:
    """The entries of a tile at or above ``floor`` (with ``diagonal``, only those
    of column < row) as pairs of sequence numbers (the tile's corner is ``r0, c0``).

    A row maximum first: it costs a twentieth of ``np.nonzero`` over the whole
    tile, and at a high threshold most rows of a tile hold no hit.
    """
    hot = np.flatnonzero(sims.max(axis=1) >= floor)
    r, c = np.nonzero(sims[hot] >= floor)
    r = hot[r]
    if diagonal:
        keep = c + c0 < r + r0
        r, c = r[keep], c[keep]
    return Pairs((r + r0).astype(np.int64), (c + c0).astype(np.int64), sims[r, c])
