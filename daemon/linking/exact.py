"""Exact similarity: the one definition of pair cosine, and blocked products.

Every candidate pair, wherever it comes from (a float32 matrix product here or
hnswlib's ``1 - <a, b>``), is judged against the threshold by :func:`accept`,
which settles pairs close to the threshold with :func:`pair_cosine`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

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
