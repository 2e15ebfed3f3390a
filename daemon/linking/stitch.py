"""``track``'s tracklets and its second pass, which stitches them into clusters.

The first pass (:mod:`.track`) cuts an individual's crops into tracklets
wherever it jumps, blurs or is missed for a while. A tracklet is *closed* once
no crop can still extend it and every tracklet that might continue it has
started: ``window`` frames of its trap after its last crop. At that moment
the tracklet is compared, by the similarity of prototypes (normalised mean
embeddings), with the tracklets of its trap still open (:func:`partner`):
one that started soon after it ended near where it ended, one that ended
just before it started, or one that overlaps it in time on the same spot
without ever sharing a frame (the blurred half of one insect). The best that
clears the stitch threshold joins its cluster (:class:`Unions`).

Every decision is made at a frame of the trap, from that trap's earlier
frames only, so a live linker fed frames in time order decides exactly what
the batch command decides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..records import FrameId
from .base import FloatArray, Stitch

__all__ = ["Tracklet", "Unions", "partner"]


@dataclass(slots=True)
class Tracklet:
    """One first-pass track: its first and last crop, latest crops, sums.

    Ordinals count the frames of its trap; times are seconds (NaN unknown);
    centres pixels (NaN unknown). ``vsum`` is the float64 sum of its crops'
    embeddings (None until the first), ``csum``/``ccount`` the sum and count
    of its known centres.
    """

    first_seq: int
    first_ordinal: int = -1
    first_time: float = math.nan
    first_center: FloatArray = field(default_factory=lambda: np.full(2, np.nan))
    last_seq: int = -1
    last_time: float = math.nan
    last_ordinal: int = -1
    last_frame: FrameId | None = None
    last_center: FloatArray = field(default_factory=lambda: np.full(2, np.nan))
    recent: list[int] = field(default_factory=list)
    vsum: FloatArray | None = None
    csum: FloatArray = field(default_factory=lambda: np.zeros(2))
    ccount: int = 0

    def observe(
        self,
        seq: int,
        t: float,
        ordinal: int,
        frame: FrameId | None,
        center: FloatArray,
        vector: FloatArray,
        memory: int,
    ) -> None:
        """Add crop ``seq`` of frame ``ordinal`` (time ``t``, ``center``, its embedding)."""
        if self.first_ordinal < 0:
            self.first_ordinal, self.first_time, self.first_center = ordinal, t, center
        self.recent = [*self.recent[-(memory - 1) :], seq] if memory > 1 else [seq]
        self.last_seq = seq
        self.last_time = t
        self.last_ordinal = ordinal
        self.last_frame = frame
        self.last_center = center
        self.vsum = vector.astype(np.float64) if self.vsum is None else self.vsum + vector
        if not np.isnan(center).any():
            self.csum = self.csum + center
            self.ccount += 1

    def prototype(self) -> FloatArray | None:
        """The normalised mean embedding; None without crops or with a zero sum."""
        if self.vsum is None:
            return None
        norm = float(np.linalg.norm(self.vsum))
        return None if norm == 0.0 else self.vsum / norm

    def mean_center(self) -> FloatArray | None:
        """The mean of its known centres, None when none is known."""
        return self.csum / self.ccount if self.ccount else None


class Unions:
    """Union-find over tracklet numbers; a root carries its cluster's id (the
    smallest first crop) and, while any member is open, the frame ordinals of
    all its members (so no stitch ever puts two crops of one frame together).
    """

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.cid: list[int] = []
        self.frames: dict[int, set[int]] = {}
        self.open: dict[int, int] = {}

    def add(self, first_seq: int, *, is_open: bool) -> int:
        """A new tracklet (own cluster); returns its number."""
        k = len(self.parent)
        self.parent.append(k)
        self.cid.append(first_seq)
        if is_open:
            self.open[k] = 1
            self.frames[k] = set()
        return k

    def find(self, k: int) -> int:
        """The root of tracklet ``k``, halving the path on the way."""
        parent = self.parent
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    def saw(self, k: int, ordinal: int) -> None:
        """Tracklet ``k`` (open) has a crop in frame ``ordinal``."""
        self.frames[self.find(k)].add(ordinal)

    def close(self, k: int) -> None:
        """Tracklet ``k`` is closed; a root without open members forgets its frames."""
        root = self.find(k)
        self.open[root] -= 1
        if self.open[root] == 0:
            del self.open[root]
            del self.frames[root]

    def disjoint(self, a: int, b: int) -> bool:
        """Whether the clusters of open tracklets ``a`` and ``b`` share no frame."""
        return self.frames[self.find(a)].isdisjoint(self.frames[self.find(b)])

    def union(self, a: int, b: int) -> tuple[int, int]:
        """Join the clusters of open tracklets ``a`` and ``b``; returns the ids
        (gone, kept): the larger id goes."""
        ra, rb = self.find(a), self.find(b)
        keep, gone = (ra, rb) if self.cid[ra] < self.cid[rb] else (rb, ra)
        self.parent[gone] = keep
        self.open[keep] += self.open.pop(gone)
        self.frames[keep] |= self.frames.pop(gone)
        return self.cid[gone], self.cid[keep]

    def attach(self, k: int, root: int) -> None:
        """Put open tracklet ``k`` (just added) under ``root`` (a restart's
        cluster); the frames of the cluster are then given with :meth:`saw`."""
        self.parent[k] = root
        del self.open[k], self.frames[k]
        self.open[root] = self.open.get(root, 0) + 1
        self.frames.setdefault(root, set())

    def cluster_ids(self) -> list[int]:
        """Each tracklet's cluster id."""
        return [self.cid[self.find(k)] for k in range(len(self.parent))]


def partner(
    a: int,
    tracks: list[Tracklet],
    candidates: list[int],
    alive: set[int],
    unions: Unions,
    reach_px: float,
    params: Stitch,
) -> int | None:
    """The open tracklet to stitch closing tracklet ``a`` to, or None.

    ``candidates`` the open tracklets of its trap; ``alive`` those that may
    still take crops (a cluster never gets two of them, so it never takes two
    crops of one frame); ``reach_px`` the stitch distance limit in pixels.
    The best prototype similarity at or above ``params.threshold`` wins; ties
    go to the earlier candidate.
    """
    ta = tracks[a]
    proto = ta.prototype()
    if proto is None or ta.ccount == 0:
        return None
    root_a = unions.find(a)
    alive_a = sum(1 for k in alive if unions.find(k) == root_a)
    best, best_sim = None, params.threshold
    for b in candidates:
        tb = tracks[b]
        root_b = unions.find(b)
        if b == a or root_b == root_a or not _placed(ta, tb, reach_px, params):
            continue
        other = tb.prototype()
        if other is None or not unions.disjoint(a, b):
            continue
        if alive_a + sum(1 for k in alive if unions.find(k) == root_b) > 1:
            continue
        sim = float(proto @ other)
        if sim >= best_sim and (best is None or sim > best_sim):
            best, best_sim = b, sim
    return best


def _placed(a: Tracklet, b: Tracklet, reach_px: float, params: Stitch) -> bool:
    """Whether ``b`` continues ``a`` (or the other way round) in time and place,
    or sits on ``a``'s spot while ``a`` is there."""
    if b.ccount == 0:
        return False
    for early, late in ((a, b), (b, a)):
        gap = late.first_ordinal - early.last_ordinal
        if 1 <= gap <= params.gap_frames:
            in_time = not late.first_time - early.last_time > params.cap_s  # NaN: frames only
            return in_time and _near(early.last_center, late.first_center, reach_px)
    if b.first_ordinal <= a.last_ordinal and a.first_ordinal <= b.last_ordinal:
        ma, mb = a.mean_center(), b.mean_center()
        return ma is not None and mb is not None and _near(ma, mb, reach_px)
    return False


def _near(p: FloatArray, q: FloatArray, reach_px: float) -> bool:
    return bool(np.hypot(*(p - q)) <= reach_px)
