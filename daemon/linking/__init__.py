"""The clustering engine: assigns crops to clusters (individuals) incrementally.

Two methods share one interface, :class:`Linker`. Crops arrive one micro-batch
at a time through :meth:`Linker.add`; the batch command is the same engine fed
in one go, so the live daemon and the batch command cannot disagree.

``cosine`` (the old tool's rule, without its bugs; :mod:`.cosine`)
    Two crops link when their cosine similarity is >= ``threshold`` and, when
    gating is on, the link has spatio-temporal support::

        (center_dist < max_center_dist_px and |dt| < near_window_s) or |dt| < any_window_s

    Clusters are the connected components of that graph. The result is exactly
    the partition of a brute-force all-pairs oracle: nothing is chunked and no
    n x n matrix is built. Without gating, candidate neighbours come from an
    hnswlib inner-product index whose query widens k until the k-th neighbour
    falls below the threshold (:mod:`.neighbours`); with gating, candidates are
    every crop inside the gating time window, compared exactly. Every candidate
    is confirmed with the exact similarity (:func:`pair_cosine`, :mod:`.exact`),
    so approximation can only ever cost recall, which the widening query and
    the tests guard.

``track`` (one individual appears at most once per frame; :mod:`.track`)
    Frames are processed in time order; each frame's crops are matched
    one-to-one to the tracks still active (seen within ``track_idle_frames``
    frames of their trap and ``track_idle_cap_s`` seconds) by an optimal
    assignment; a match scores its similarity minus a move penalty minus a
    margin and is made only when that is positive. Pairs below the threshold
    or beyond the move limit (a fraction of the frame diagonal) are never
    matched; unmatched crops start new tracks. A second pass stitches
    tracklets (:mod:`.stitch`): a stitch is a merge. Two crops of one frame
    never share a cluster.

Cluster ids: every crop gets a sequence number in arrival order (the batch
command feeds files in sorted filename order). A cluster's id is the sequence
number of its earliest member, so ids only change when clusters merge, and then
the smaller id survives (:class:`~crop_clusterd.records.Merge`).
"""

from __future__ import annotations

from .. import defaults
from ..defaults import COSINE_THRESHOLD, METHODS, TRACK_THRESHOLDS, default_threshold
from .base import (
    AddResult,
    CropColumns,
    FloatArray,
    Gating,
    HnswParams,
    IntArray,
    LinkBatch,
    Linker,
    Motion,
    Stitch,
    StoredLinks,
)
from .cosine import CosineLinker
from .exact import FLOAT32_MARGIN, Pairs, accept, pair_cosine, pairs_above
from .track import TrackLinker

__all__ = [
    "COSINE_THRESHOLD",
    "FLOAT32_MARGIN",
    "METHODS",
    "TRACK_THRESHOLDS",
    "AddResult",
    "CosineLinker",
    "CropColumns",
    "FloatArray",
    "Gating",
    "HnswParams",
    "IntArray",
    "LinkBatch",
    "Linker",
    "Motion",
    "Pairs",
    "Stitch",
    "StoredLinks",
    "TrackLinker",
    "accept",
    "default_threshold",
    "make_linker",
    "pair_cosine",
    "pairs_above",
]


def make_linker(
    method: str,
    threshold: float,
    gating: Gating | None = None,
    *,
    idle_frames: int = defaults.TRACK_IDLE_FRAMES,
    idle_cap_s: float = defaults.TRACK_IDLE_CAP_S,
    memory: int = defaults.TRACK_MEMORY,
    margin: float = defaults.TRACK_MARGIN,
    motion: Motion | None = None,
    stitch: Stitch | None = Stitch(),  # noqa: B008 - frozen, shared safely
    hnsw: HnswParams | None = None,
) -> Linker:
    """Create the linker for a method name (one of :data:`METHODS`).

    ``gating`` and ``hnsw`` apply to ``cosine``; ``motion``, ``idle_frames``,
    ``idle_cap_s``, ``memory``, ``margin`` and ``stitch`` to ``track``.
    Raises :class:`ValueError` for an unknown method or an invalid setting.
    """
    if method == "cosine":
        return CosineLinker(threshold, gating, hnsw)
    if method == "track":
        return TrackLinker(
            threshold,
            motion,
            idle_frames=idle_frames,
            idle_cap_s=idle_cap_s,
            memory=memory,
            margin=margin,
            stitch=stitch,
        )
    raise ValueError(f"unknown clustering method {method!r}; choose one of {', '.join(METHODS)}")
