"""Bit-identical crops: only the first of them goes into the HNSW index.

Thousands of identical vectors (a dead insect stuck on the trap screen) only
link to each other in an HNSW graph and trap searches that enter them
(hnswlib issue #263). So :class:`Duplicates` maps every crop whose vector is
byte-for-byte equal to an earlier indexed crop (its *representative*) onto
that crop: the duplicate is linked to it and neither indexed nor queried.
Its pairs are exactly its representative's, so the partition is unchanged.

A vector whose float64 dot with itself is below the threshold (zero rows, a
threshold of 1 with rounding) would not link to its copy, so it is never
treated as a duplicate. A retired representative no longer links: a new copy
then becomes a representative of its own, and :meth:`Duplicates.promote`
makes the first live copy of a retired representative one.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .base import IntArray

_BLOCK = 16_384


def row_hashes(emb: npt.NDArray[np.float32], rows: IntArray) -> list[int]:
    """A hash of the bytes of each row (equal bytes, equal hash; this process only)."""
    out: list[int] = []
    for start in range(0, len(rows), _BLOCK):
        out.extend(hash(row.tobytes()) for row in emb[rows[start : start + _BLOCK]])
    return out


def self_similarity(emb: npt.NDArray[np.float32], rows: IntArray) -> npt.NDArray[np.float64]:
    """Each row's float64 dot with itself (its cosine with a bit-identical copy)."""
    out = np.empty(len(rows))
    for start in range(0, len(rows), _BLOCK):
        part = emb[rows[start : start + _BLOCK]].astype(np.float64)
        out[start : start + len(part)] = np.einsum("ij,ij->i", part, part)
    return out


class Duplicates:
    """Each crop's representative (itself when it is indexed), for the index path."""

    def __init__(self) -> None:
        self.rep_of: IntArray = np.empty(0, dtype=np.int64)
        self._first: dict[int, int] = {}

    def reset(self) -> None:
        self.rep_of = np.empty(0, dtype=np.int64)
        self._first = {}

    def _grow(self, n: int) -> None:
        if n > len(self.rep_of):
            grown = np.full(max(n, 2 * len(self.rep_of), 1024), -1, dtype=np.int64)
            grown[: len(self.rep_of)] = self.rep_of
            self.rep_of = grown

    def assign(
        self,
        emb: npt.NDArray[np.float32],
        rows: IntArray,
        threshold: float,
        retired: IntArray,
        indexed: frozenset[int] | None = None,
    ) -> tuple[IntArray, IntArray]:
        """Give ``rows`` (ascending, new) representatives; return (duplicates,
        their representatives). The other rows are representatives (to index).

        With ``indexed`` (a saved index's labels) a row is a representative
        exactly when it is in ``indexed``; ValueError when a row outside it
        has no equal representative before it.
        """
        if len(rows) == 0:
            empty = np.empty(0, dtype=np.int64)
            return empty, empty
        self._grow(int(rows[-1]) + 1)
        eligible = self_similarity(emb, rows) >= threshold
        hashes = row_hashes(emb, rows)
        gone = set(retired.tolist())
        dups: list[int] = []
        reps: list[int] = []
        first = self._first
        for row, h, ok in zip(rows.tolist(), hashes, eligible.tolist(), strict=True):
            rep = first.get(h) if ok else None
            if rep is not None and (rep in gone or not _same(emb, row, rep)):
                rep = None
            if indexed is not None and row in indexed:
                rep = None
            elif indexed is not None and rep is None:
                raise ValueError(f"crop {row} is neither indexed nor a copy of an indexed crop")
            if rep is None:
                self.rep_of[row] = row
                if ok and (h not in first or first[h] in gone or _same(emb, row, first[h])):
                    first[h] = row
            else:
                self.rep_of[row] = rep
                dups.append(row)
                reps.append(rep)
        return np.array(dups, dtype=np.int64), np.array(reps, dtype=np.int64)

    def indexed_mask(self, n: int) -> npt.NDArray[np.bool_]:
        """Which of crops ``[0, n)`` are in the index."""
        return np.asarray(self.rep_of[:n] == np.arange(n))

    def promote(
        self, emb: npt.NDArray[np.float32], seqs: IntArray, n: int, retired: IntArray
    ) -> IntArray:
        """Before ``seqs`` are retired (``retired``: the set after): for each
        representative among them with live copies, the first live copy becomes
        the representative of the others. Returns the crops to index."""
        promoted: list[int] = []
        rep_of = self.rep_of[:n]
        for seq in seqs.tolist():
            if seq >= n or rep_of[seq] != seq:
                continue
            copies = np.flatnonzero(rep_of == seq)
            copies = copies[(copies != seq) & ~np.isin(copies, retired)]
            if len(copies) == 0:
                continue
            new = int(copies[0])
            rep_of[copies] = new
            self._first[row_hashes(emb, np.array([new]))[0]] = new
            promoted.append(new)
        return np.array(promoted, dtype=np.int64)


def _same(emb: npt.NDArray[np.float32], a: int, b: int) -> bool:
    return bool(np.array_equal(emb[a].view(np.uint32), emb[b].view(np.uint32)))
