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

A restart resumes from a checkpoint (:mod:`.trackstate`, written by
:meth:`TrackLinker.save`) and replays only the micro-batches committed after
it; without a usable one it replays them all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from .. import defaults
from ..atomic import remove_stale_temp_files
from ..log import get_logger
from ..records import FrameId, TrapId
from .base import AddResult, FloatArray, IntArray, LinkBatch, Linker, Motion, StoredLinks
from .exact import pair_cosine
from .trackstate import CheckpointError, TrackCheckpoint, checkpoint_path, digest

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
        self._stale_cleared = False  # temp files of a killed save, cleared once

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
        """Write a checkpoint (see :mod:`.trackstate`) beside ``path``, atomically.

        The file is :func:`checkpoint_path` of ``path``; its size depends on the
        active tracks, not on the crops before them. Returns how many crops it
        covers (all held; 0 and nothing written when none). OSError on failure.
        """
        if self._cols.n == 0:
            return 0
        target = checkpoint_path(path)
        if not self._stale_cleared:
            remove_stale_temp_files(target)
            self._stale_cleared = True
        self._checkpoint().write(target)
        return self._cols.n

    def restore(self, stored: StoredLinks) -> bool:
        """Bring a fresh linker to the stored state; return whether a checkpoint was used.

        The checkpoint beside ``stored.index_file`` is used when it was written
        with these settings, covers a prefix of the stored crops that ends
        between two micro-batches, and agrees with them (the covered crops'
        cluster ids, the latest crops of its active tracks). Only the
        micro-batches after it are then replayed. Otherwise (no file, another
        settings or state, a damaged file: logged as ``track_checkpoint_unused``
        with the reason) every stored micro-batch is replayed, which reproduces
        the state exactly. Either way the result is checked against
        ``stored.cluster_ids``: when they differ (e.g. the settings changed) a
        ``replay_differs`` warning is logged and the replay is kept.
        """
        if self._cols.n:
            raise RuntimeError("restore() needs a fresh linker")
        if len(stored) == 0:
            return False
        checkpoint = self._usable_checkpoint(stored)
        start = 0
        if checkpoint is not None:
            self._resume(checkpoint, stored)
            start = checkpoint.covers
        for part in stored.micro_batches(start):
            self.add(part)
        replayed = self.cluster_ids()
        if not np.array_equal(replayed, stored.cluster_ids):
            differ = int(np.count_nonzero(replayed != stored.cluster_ids))
            log.warning("replay_differs", crops=differ, hint="stored ids are kept in the CSV")
        return checkpoint is not None

    def _settings(self) -> dict[str, Any]:
        motion = self.motion
        return {
            "threshold": self.threshold,
            "gap_s": self.gap_s,
            "gap_frames": self.gap_frames,
            "memory": self.memory,
            "motion": None if motion is None else [motion.max_move_px, motion.penalty],
        }

    def _checkpoint(self) -> TrackCheckpoint:
        """The state after every crop held, as a checkpoint records it."""
        cols = self._cols
        entries = [(trap, k) for trap, active in self._active.items() for k in active]
        tracks = [self._tracks[k] for _, k in entries]
        recent = np.full((len(tracks), self.memory), -1, dtype=np.int64)
        for row, track in enumerate(tracks):
            recent[row, : len(track.recent)] = track.recent
        seqs = np.unique(recent[recent >= 0])
        codes = cols.trap_codes()
        ordinals = np.zeros(len(codes), dtype=np.int64)
        for code, ordinal in self._frame_ordinal.items():
            ordinals[code] = ordinal
        return TrackCheckpoint(
            settings=self._settings(),
            covers=cols.n,
            dim=cols.dim,
            traps=codes,
            ids_digest=digest(self.cluster_ids()),
            vectors_digest=digest(cols.embeddings[seqs]),
            ordinals=ordinals,
            active_trap=np.array([trap for trap, _ in entries], dtype=np.int64),
            active_first=np.array([t.first_seq for t in tracks], dtype=np.int64),
            last_seq=np.array([t.last_seq for t in tracks], dtype=np.int64),
            last_ordinal=np.array([t.last_ordinal for t in tracks], dtype=np.int64),
            last_time=np.array([t.last_time for t in tracks], dtype=np.float64),
            recent=recent,
            retired=self._retired.copy(),
            recent_seqs=seqs,
            recent_times=cols.times[seqs].copy(),
            recent_centers=cols.centers[seqs].copy(),
        )

    def _usable_checkpoint(self, stored: StoredLinks) -> TrackCheckpoint | None:
        """The checkpoint beside ``stored.index_file`` when it fits the stored crops."""
        if stored.index_file is None:
            return None
        path = checkpoint_path(stored.index_file)
        try:
            checkpoint = TrackCheckpoint.read(path)
        except FileNotFoundError:
            log.info("track_checkpoint_unused", file=str(path), reason="no checkpoint yet")
            return None
        except CheckpointError as exc:
            log.warning("track_checkpoint_unused", file=str(path), reason=str(exc))
            return None
        reason = _mismatch(checkpoint, stored, self._settings())
        if reason is not None:
            log.warning("track_checkpoint_unused", file=str(path), reason=reason)
            return None
        return checkpoint

    def _resume(self, checkpoint: TrackCheckpoint, stored: StoredLinks) -> None:
        """Take the checkpoint's state over the first ``covers`` stored crops,
        which :func:`_mismatch` found to agree with it."""
        m = checkpoint.covers
        batch = stored.batch
        self._cols.append(
            LinkBatch(batch.embeddings[:m], batch.times[:m], batch.centers[:m], batch.frames[:m])
        )
        Linker.retire(self, checkpoint.retired)
        # Tracks are numbered by cluster id here; the numbers are internal, and
        # the matching order lives in each trap's active list, which is kept.
        firsts, track_of = np.unique(stored.cluster_ids[:m], return_inverse=True)
        self._track_of = np.full(max(m, 1024), -1, dtype=np.int64)
        self._track_of[:m] = track_of
        self._tracks = [_Track(first_seq=int(f)) for f in firsts.tolist()]
        self._frame_ordinal = dict(enumerate(checkpoint.ordinals.tolist()))
        ks = np.searchsorted(firsts, checkpoint.active_first)
        for row, k in enumerate(ks.tolist()):
            track = self._tracks[k]
            track.recent = [int(s) for s in checkpoint.recent[row] if s >= 0]
            track.last_seq = int(checkpoint.last_seq[row])
            track.last_time = float(checkpoint.last_time[row])
            track.last_ordinal = int(checkpoint.last_ordinal[row])
            track.last_frame = self._cols.frames[track.last_seq]
            track.last_center = self._cols.centers[track.last_seq]
            self._active.setdefault(int(checkpoint.active_trap[row]), []).append(k)

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


def _trap_order(frames: Sequence[FrameId | None]) -> tuple[TrapId | None, ...]:
    """The traps of ``frames`` in the code order :class:`CropColumns` gives them."""
    codes: dict[TrapId | None, None] = {None: None}
    for frame in frames:
        codes.setdefault(None if frame is None else frame.trap)
    return tuple(codes)


def _mismatch(
    checkpoint: TrackCheckpoint, stored: StoredLinks, settings: dict[str, Any]
) -> str | None:
    """Why the checkpoint cannot stand for the first ``covers`` stored crops; None when it can."""
    c, m, n = checkpoint, checkpoint.covers, len(stored)
    if c.settings != settings:
        return f"written with other settings ({c.settings}, now {settings})"
    if not 0 < m <= n:
        return f"covers {m} crops, the state holds {n}"
    if m < n and stored.batch_numbers[m] == stored.batch_numbers[m - 1]:
        return f"ends inside a micro-batch (crop {m})"
    if c.dim != stored.batch.embeddings.shape[1]:
        return f"dimension {c.dim}, the state's is {stored.batch.embeddings.shape[1]}"
    ids = stored.cluster_ids
    if c.ids_digest != digest(ids[:m]):
        return "its cluster ids differ from the stored ones"
    if c.traps != _trap_order(stored.batch.frames[:m]) or len(c.ordinals) != len(c.traps):
        return "its traps differ from the stored crops' traps"
    recent = c.recent[c.recent >= 0]
    seqs = (c.active_first, c.last_seq, recent, c.recent_seqs, c.retired)
    if any(len(s) and (s.min() < 0 or s.max() >= m) for s in seqs) or (
        len(c.active_trap) and (c.active_trap.min() < 0 or c.active_trap.max() >= len(c.traps))
    ):
        return "it names crops or traps it does not cover"
    members = np.where(c.recent >= 0, ids[np.maximum(c.recent, 0)], c.active_first[:, None])
    if np.any(ids[c.active_first] != c.active_first) or np.any(members != c.active_first[:, None]):
        return "its tracks differ from the stored clusters"
    # Each row: the latest crops oldest first, padding only at the end, the
    # last of them the track's last crop; each one's vector is in the file.
    filled = (c.recent >= 0).sum(axis=1)
    last = c.recent[np.arange(len(filled)), np.maximum(filled, 1) - 1]
    if (
        np.any(filled == 0)
        or not np.array_equal(c.recent >= 0, np.arange(c.recent.shape[1]) < filled[:, None])
        or not np.array_equal(last, c.last_seq)
        or not np.all(np.isin(recent, c.recent_seqs))
    ):
        return "its latest crops are incomplete"
    batch, rows = stored.batch, c.recent_seqs
    vectors = batch.embeddings[rows]
    vectors[np.isin(rows, c.retired)] = 0.0  # as the linker held them
    if not (
        c.vectors_digest == digest(vectors)
        and np.array_equal(c.recent_times, batch.times[rows], equal_nan=True)
        and np.array_equal(c.recent_centers, batch.centers[rows], equal_nan=True)
    ):
        return "its latest crops differ from the stored ones"
    return None


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
