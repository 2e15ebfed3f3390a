"""``track``: one individual appears at most once per frame.

Frames are processed in time order; each frame's crops are matched one-to-one
to the clusters still active (seen within ``gap_s``, or ``gap_frames`` frames
for crops without a time) by an optimal assignment that maximises the summed
similarity to each cluster's most recent crops. Pairs below the threshold (or
out of :class:`~crop_clusterd.linking.base.Motion` reach) are never matched;
unmatched crops start new clusters. Two crops of one frame never share a
cluster, and clusters never merge.

A frame is flat-bug's (name, identifier and trap folder: :class:`FrameId`), and
each trap is tracked on its own: a frame's crops are matched only to tracks of
its trap, and the frame counts for ``gap_frames`` only in its trap, so a trap's
clusters do not depend on another trap's files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

from .. import defaults
from ..log import get_logger
from ..records import FrameId
from .base import AddResult, FloatArray, IntArray, LinkBatch, Linker, Motion, StoredLinks
from .exact import pair_cosine

log = get_logger(__name__)


class TrackLinker(Linker):
    """Frame-by-frame one-to-one matching of crops to active clusters.

    ``motion`` (used when crops have box positions) limits and scores how far a
    cluster may move; ``gap_s`` (seconds) and ``gap_frames`` are how long a
    cluster stays active; ``memory`` (>= 1, ValueError otherwise) is how many of
    a cluster's latest crops a new crop is compared with.
    """

    def __init__(
        self,
        threshold: float,
        motion: Motion | None = None,
        gap_s: float = defaults.TRACK_GAP_S,
        gap_frames: int = defaults.TRACK_GAP_FRAMES,
        memory: int = defaults.TRACK_MEMORY,
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
        # Per trap code (CropColumns.traps): track numbers that may still match,
        # and how many frames of that trap were matched so far.
        self._active: dict[int, list[int]] = {}
        self._frame_ordinal: dict[int, int] = {}

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

    # -- persistence (the daemon's state folder) -------------------------------------

    def save(self, path: Path) -> int:
        """Nothing to save: a restart replays the stored micro-batches. Returns 0."""
        return 0

    def restore(self, stored: StoredLinks) -> bool:
        """Replay the stored micro-batches in order, which reproduces the state exactly.

        The replayed ids are checked against ``stored.cluster_ids``; when they
        differ (e.g. the settings changed) a ``replay_differs`` warning is
        logged and the replay is kept. Uses no saved file: returns False.
        """
        if self._cols.n:
            raise RuntimeError("restore() needs a fresh linker")
        if len(stored) == 0:
            return False
        for part in stored.micro_batches():
            self.add(part)
        replayed = self.cluster_ids()
        if not np.array_equal(replayed, stored.cluster_ids):
            differ = int(np.count_nonzero(replayed != stored.cluster_ids))
            log.warning("replay_differs", crops=differ, hint="stored ids are kept in the CSV")
        return False

    # -- matching -----------------------------------------------------------------------

    def _frames_in_order(self, seqs: range) -> list[IntArray]:
        """Group a batch by frame; timed frames by (time, frame), then untimed by frame.

        A crop with no flat-bug frame is a frame of its own. The order restricted
        to one trap does not depend on other traps' frames.
        """
        cols = self._cols
        groups: dict[FrameId | int, list[int]] = {}
        for seq in seqs:
            frame = cols.frames[seq]
            groups.setdefault(frame if frame is not None else seq, []).append(seq)

        def key(item: tuple[FrameId | int, list[int]]) -> tuple[int, float, str, str, str, int]:
            frame, members = item
            t = float(cols.times[members[0]])
            timed = (1, 0.0) if math.isnan(t) else (0, t)
            if isinstance(frame, int):
                return (*timed, "", "", "", frame)
            return (*timed, frame.name, frame.trap.place, frame.trap.identifier, 0)

        return [np.array(m, dtype=np.int64) for _, m in sorted(groups.items(), key=key)]

    def _match_frame(self, crops: IntArray) -> None:
        cols = self._cols
        first = int(crops[0])
        frame = cols.frames[first]
        trap = int(cols.traps[first])
        t = float(cols.times[first])
        ordinal = self._frame_ordinal.get(trap, 0)
        self._frame_ordinal[trap] = ordinal + 1
        active = [k for k in self._active.get(trap, []) if self._tracks[k].alive(t, ordinal, self)]
        self._active[trap] = active
        candidates = [k for k in active if frame is None or self._tracks[k].last_frame != frame]
        matched: dict[int, int] = {}
        if candidates:
            matched = self._assign(crops, candidates, t)
        for row, seq in enumerate(crops.tolist()):
            k = matched.get(row)
            if k is None:
                k = len(self._tracks)
                self._tracks.append(_Track(first_seq=seq))
                active.append(k)
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
    last_frame: FrameId | None = None
    last_center: FloatArray = field(default_factory=lambda: np.full(2, np.nan))
    recent: list[int] = field(default_factory=list)

    def observe(
        self,
        seq: int,
        t: float,
        ordinal: int,
        frame: FrameId | None,
        center: FloatArray,
        memory: int,
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
