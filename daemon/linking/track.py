"""``track``: one individual appears at most once per frame.

Frames are processed in time order; each frame's crops are matched one-to-one
to the tracks of its trap still active (seen within ``idle_frames`` frames of
that trap and ``idle_cap_s`` seconds) by an optimal assignment. A match scores
its similarity to the track's most recent crops minus the move penalty minus
``margin`` and is made only when that is positive, i.e. better than starting a
new track; pairs below the threshold or beyond the move limit (a fraction of
the frame diagonal, :class:`~crop_clusterd.linking.base.Motion`) are never
matched. Unmatched crops start new tracks. Two crops of one frame never share
a cluster.

A second pass (:mod:`.stitch`) joins tracklets once their window has passed:
a stitch is a merge, reported in :attr:`AddResult.merges`.

The frame diagonal is the frame's own (``image_width``, ``image_height`` of
its metadata); without one it is estimated as the diagonal of the smallest
frame from the origin that holds every box centre seen in the trap so far, at
least :data:`~crop_clusterd.defaults.TRACK_MIN_DIAGONAL_PX`.

A frame is flat-bug's (name, identifier and trap folder: :class:`FrameId`), and
each trap is tracked on its own: a frame's crops are matched only to tracks of
its trap, and the frame counts for ``idle_frames`` only in its trap, so a
trap's clusters do not depend on another trap's files.

A restart resumes from a checkpoint (:mod:`.trackstate`, written by
:meth:`TrackLinker.save`) and replays only the micro-batches committed after
it; without a usable one it replays them all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from .. import defaults
from ..atomic import remove_stale_temp_files
from ..log import get_logger
from ..records import FrameId, Merge, TrapId
from .base import AddResult, IntArray, LinkBatch, Linker, Motion, Stitch, StoredLinks
from .exact import pair_cosine
from .stitch import Tracklet, Unions, partner
from .trackstate import CheckpointError, TrackCheckpoint, checkpoint_path, digest

log = get_logger(__name__)


class TrackLinker(Linker):
    """Frame-by-frame one-to-one matching of crops to active tracks, then stitching.

    ``motion`` (used when crops have box positions) limits and scores how far
    a track may move; ``idle_frames`` (frames of the track's trap) and
    ``idle_cap_s`` (seconds, when both times are known) are how long a track
    stays active; ``margin`` is what a match must score above (see the
    module); ``memory`` (>= 1) is how many of a track's latest crops a new
    crop is compared with; ``stitch`` the second pass (None: off).
    ValueError for a memory below 1 or a negative idle limit.
    """

    def __init__(
        self,
        threshold: float,
        motion: Motion | None = None,
        *,
        idle_frames: int = defaults.TRACK_IDLE_FRAMES,
        idle_cap_s: float = defaults.TRACK_IDLE_CAP_S,
        memory: int = defaults.TRACK_MEMORY,
        margin: float = defaults.TRACK_MARGIN,
        stitch: Stitch | None = Stitch(),  # noqa: B008 - frozen, shared safely
    ) -> None:
        super().__init__(threshold, None)
        if memory < 1:
            raise ValueError(f"memory must be at least 1, got {memory}")
        if idle_frames < 0 or idle_cap_s < 0:
            raise ValueError("idle_frames and idle_cap_s must be >= 0")
        self.motion = motion
        self.idle_frames = idle_frames
        self.idle_cap_s = idle_cap_s
        self.memory = memory
        self.margin = margin
        self.stitch = stitch
        # A tracklet closes (is stitched or not, then forgotten) this many
        # frames after its last crop: past its idle limit and stitch window.
        self.window = max(idle_frames, stitch.gap_frames if stitch else 0)
        self._track_of: IntArray = np.empty(0, dtype=np.int64)
        self._tracks: list[Tracklet] = []
        self._unions = Unions()
        # Per trap code (CropColumns.traps): open tracklets in creation order,
        # frames matched so far, and the box-centre extent (diagonal estimate).
        self._open: dict[int, list[int]] = {}
        self._frame_ordinal: dict[int, int] = {}
        self._extent: dict[int, np.ndarray[Any, np.dtype[np.float64]]] = {}
        self._merges: list[Merge] = []
        self._published = 0
        self._stale_cleared = False  # temp files of a killed save, cleared once

    def add(self, batch: LinkBatch) -> AddResult:
        """Match the batch's frames, in time order; report the stitches as merges."""
        seqs = self._cols.append(batch)
        if len(self._track_of) < self._cols.n:
            grown = np.full(max(self._cols.n, 2 * len(self._track_of), 1024), -1, dtype=np.int64)
            grown[: len(self._track_of)] = self._track_of
            self._track_of = grown
        self._merges = []
        self._published = seqs.start
        for frame_seqs in self._frames_in_order(seqs):
            self._match_frame(frame_seqs)
        return AddResult(seqs, tuple(self._merges))

    def cluster_ids(self) -> IntArray:
        """Cluster id (smallest member's sequence number) of every crop."""
        cid = np.array(self._unions.cluster_ids(), dtype=np.int64)
        return cid[self._track_of[: self._cols.n]] if len(cid) else np.empty(0, dtype=np.int64)

    def cluster_of(self, seqs: IntArray) -> IntArray:
        """Current cluster id of the given crops."""
        u = self._unions
        return np.array([u.cid[u.find(int(self._track_of[int(s)]))] for s in seqs], np.int64)

    # -- persistence (the daemon's state folder) -------------------------------------

    def save(self, path: Path) -> int:
        """Write a checkpoint (see :mod:`.trackstate`) beside ``path``, atomically.

        The file is :func:`checkpoint_path` of ``path``; its size depends on the
        open tracklets, not on the crops before them. Returns how many crops it
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
        cluster ids, the latest crops of its open tracklets). Only the
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
        motion, stitch = self.motion, self.stitch
        return {
            "threshold": self.threshold,
            "idle_frames": self.idle_frames,
            "idle_cap_s": self.idle_cap_s,
            "memory": self.memory,
            "margin": self.margin,
            "motion": None if motion is None else [motion.max_move, motion.penalty],
            "stitch": None
            if stitch is None
            else [stitch.threshold, stitch.gap_frames, stitch.max_move, stitch.cap_s],
        }

    def _checkpoint(self) -> TrackCheckpoint:
        """The state after every crop held, as a checkpoint records it."""
        cols = self._cols
        entries = [(trap, k) for trap, open_ in self._open.items() for k in open_]
        tracks = [self._tracks[k] for _, k in entries]
        recent = np.full((len(tracks), self.memory), -1, dtype=np.int64)
        for row, track in enumerate(tracks):
            recent[row, : len(track.recent)] = track.recent
        seqs = np.unique(recent[recent >= 0])
        codes = cols.trap_codes()
        ordinals = np.zeros(len(codes), dtype=np.int64)
        for code, ordinal in self._frame_ordinal.items():
            ordinals[code] = ordinal
        u = self._unions
        roots = dict.fromkeys(u.find(k) for _, k in entries)
        frames = [(u.cid[r], o) for r in roots for o in sorted(u.frames[r])]
        vsum = np.zeros((len(tracks), cols.dim))
        for row, track in enumerate(tracks):
            if track.vsum is not None:
                vsum[row] = track.vsum
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
            first_ordinal=np.array([t.first_ordinal for t in tracks], dtype=np.int64),
            first_time=np.array([t.first_time for t in tracks], dtype=np.float64),
            last_seq=np.array([t.last_seq for t in tracks], dtype=np.int64),
            last_ordinal=np.array([t.last_ordinal for t in tracks], dtype=np.int64),
            last_time=np.array([t.last_time for t in tracks], dtype=np.float64),
            recent=recent,
            vsum=vsum,
            csum=np.array([t.csum for t in tracks], dtype=np.float64).reshape(-1, 2),
            ccount=np.array([t.ccount for t in tracks], dtype=np.int64),
            frames_cluster=np.array([c for c, _ in frames], dtype=np.int64),
            frames_ordinal=np.array([o for _, o in frames], dtype=np.int64),
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
        c, m = checkpoint, checkpoint.covers
        self._cols.append(stored.batch.rows(np.arange(m)))
        Linker.retire(self, c.retired)
        # Closed tracklets are numbered by cluster here, one each; the numbers
        # are internal. Open tracklets come after them, under their cluster.
        ids = stored.ids_at(m)
        firsts, track_of = np.unique(ids, return_inverse=True)
        self._track_of = np.full(max(m, 1024), -1, dtype=np.int64)
        self._track_of[:m] = track_of
        self._tracks = [Tracklet(first_seq=int(f)) for f in firsts.tolist()]
        for f in firsts.tolist():
            self._unions.add(int(f), is_open=False)
        self._frame_ordinal = dict(enumerate(c.ordinals.tolist()))
        cols = self._cols
        for row, first in enumerate(c.active_first.tolist()):
            k = self._unions.add(first, is_open=True)
            cluster = int(np.searchsorted(firsts, ids[first]))
            self._unions.attach(k, cluster)
            last = int(c.last_seq[row])
            self._tracks.append(
                Tracklet(
                    first_seq=first,
                    first_ordinal=int(c.first_ordinal[row]),
                    first_time=float(c.first_time[row]),
                    first_center=cols.centers[first].copy(),
                    last_seq=last,
                    last_time=float(c.last_time[row]),
                    last_ordinal=int(c.last_ordinal[row]),
                    last_frame=cols.frames[last],
                    last_center=cols.centers[last].copy(),
                    recent=[int(s) for s in c.recent[row] if s >= 0],
                    vsum=c.vsum[row].copy(),
                    csum=c.csum[row].copy(),
                    ccount=int(c.ccount[row]),
                )
            )
            self._open.setdefault(int(c.active_trap[row]), []).append(k)
        for cid, ordinal in zip(c.frames_cluster.tolist(), c.frames_ordinal.tolist(), strict=True):
            self._unions.frames[int(np.searchsorted(firsts, cid))].add(ordinal)
        for code in range(len(c.traps)):
            self._extent_of(code, cols.centers[:m][cols.traps[:m] == code])

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

    def _extent_of(self, trap: int, centers: np.ndarray[Any, np.dtype[np.float64]]) -> float:
        """Grow the trap's box-centre extent by ``centers``; its estimated diagonal (px)."""
        extent = self._extent.get(trap, np.zeros(2))
        known = centers[~np.isnan(centers).any(axis=1)]
        if len(known):
            extent = np.maximum(extent, known.max(axis=0))
            self._extent[trap] = extent
        return max(defaults.TRACK_MIN_DIAGONAL_PX, float(np.hypot(*extent)))

    def _diagonal(self, trap: int, crops: IntArray) -> float:
        """The frame's diagonal in pixels: its own, else the trap's estimate."""
        estimate = self._extent_of(trap, self._cols.centers[crops])
        sizes = self._cols.sizes[crops]
        sizes = sizes[~np.isnan(sizes).any(axis=1) & (sizes > 0).all(axis=1)]
        return float(np.hypot(*sizes[0])) if len(sizes) else estimate

    def _alive(self, track: Tracklet, t: float, ordinal: int) -> bool:
        if ordinal - track.last_ordinal > self.idle_frames:
            return False
        return not abs(t - track.last_time) > self.idle_cap_s  # NaN: frames alone

    def _match_frame(self, crops: IntArray) -> None:
        cols = self._cols
        first = int(crops[0])
        frame = cols.frames[first]
        trap = int(cols.traps[first])
        t = float(cols.times[first])
        ordinal = self._frame_ordinal.get(trap, 0)
        self._frame_ordinal[trap] = ordinal + 1
        diagonal = self._diagonal(trap, crops)
        open_ = self._open.setdefault(trap, [])
        alive = [k for k in open_ if self._alive(self._tracks[k], t, ordinal)]
        self._close(open_, ordinal, set(alive), diagonal)
        candidates = [k for k in alive if frame is None or self._tracks[k].last_frame != frame]
        matched: dict[int, int] = {}
        if candidates:
            matched = self._assign(crops, candidates, diagonal)
        for row, seq in enumerate(crops.tolist()):
            k = matched.get(row)
            if k is None:
                k = self._unions.add(seq, is_open=True)
                self._tracks.append(Tracklet(first_seq=seq))
                open_.append(k)
            vector = cols.embeddings[seq].astype(np.float64)
            # A copy: a view would keep every grown-out centres column alive.
            center = cols.centers[seq].copy()
            self._tracks[k].observe(seq, t, ordinal, frame, center, vector, self.memory)
            self._unions.saw(k, ordinal)
            self._track_of[seq] = k

    def _close(self, open_: list[int], ordinal: int, alive: set[int], diagonal: float) -> None:
        """Close the trap's tracklets whose window has passed, stitching each first."""
        due = [k for k in open_ if ordinal - self._tracks[k].last_ordinal > self.window]
        if not due:
            return
        closed: set[int] = set()
        for k in due:
            if self.stitch is not None:
                remaining = [j for j in open_ if j not in closed]
                reach = self.stitch.max_move * diagonal
                b = partner(k, self._tracks, remaining, alive, self._unions, reach, self.stitch)
                if b is not None:
                    gone, kept = self._unions.union(k, b)
                    if gone < self._published:
                        self._merges.append(Merge(from_cluster=gone, into_cluster=kept))
            self._unions.close(k)
            # A closed tracklet is never compared again: drop its sum (dim floats).
            self._tracks[k].vsum = None
            closed.add(k)
        open_[:] = [k for k in open_ if k not in closed]

    def _assign(self, crops: IntArray, candidates: list[int], diagonal: float) -> dict[int, int]:
        cols = self._cols
        tracks = [self._tracks[k] for k in candidates]
        last = np.array([tr.last_seq for tr in tracks], dtype=np.int64)
        rows = np.repeat(crops, len(last))
        others = np.tile(last, len(crops))
        depth = max(len(tr.recent) for tr in tracks)
        recent = np.array(
            [[*tr.recent, *[tr.recent[-1]] * (depth - len(tr.recent))] for tr in tracks],
            dtype=np.int64,
        )
        # Similarity to a track: the best over its most recent crops, so one
        # blurred frame does not break it.
        sims = np.max(
            [
                pair_cosine(cols.embeddings, rows, np.tile(recent[:, j], len(crops)))
                for j in range(depth)
            ],
            axis=0,
        ).reshape(len(crops), len(last))
        allowed = sims >= self.threshold
        weights = sims - self.margin
        if self.motion is not None:
            dist = np.hypot(*(cols.centers[rows] - cols.centers[others]).T).reshape(sims.shape)
            reach = dist / (self.motion.max_move * diagonal)
            with np.errstate(invalid="ignore"):
                allowed &= ~(reach >= 1.0)  # NaN (unknown position) stays allowed
            weights -= self.motion.penalty * np.nan_to_num(np.minimum(reach, 1.0), nan=1.0)
        # A match must beat starting a new track (weight 0): the "stay new"
        # columns make this a maximum-weight matching, not a forced assignment.
        allowed &= weights > 0.0
        if not allowed.any():
            return {}
        forbidden = -1e9
        weights = np.where(allowed, weights, forbidden)
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
    ids = stored.ids_at(m)  # later stitches may have merged these since
    if c.ids_digest != digest(ids):
        return "its cluster ids differ from the stored ones"
    if c.traps != _trap_order(stored.batch.frames[:m]) or len(c.ordinals) != len(c.traps):
        return "its traps differ from the stored crops' traps"
    recent = c.recent[c.recent >= 0]
    seqs = (c.active_first, c.last_seq, recent, c.recent_seqs, c.retired, c.frames_cluster)
    if any(len(s) and (s.min() < 0 or s.max() >= m) for s in seqs) or (
        len(c.active_trap) and (c.active_trap.min() < 0 or c.active_trap.max() >= len(c.traps))
    ):
        return "it names crops or traps it does not cover"
    # A tracklet's crops are in its first crop's cluster (stitches join clusters).
    cluster = ids[c.active_first]
    members = np.where(c.recent >= 0, ids[np.maximum(c.recent, 0)], cluster[:, None])
    if np.any(members != cluster[:, None]) or not np.all(np.isin(c.frames_cluster, cluster)):
        return "its tracks differ from the stored clusters"
    if not np.array_equal(c.first_time, stored.batch.times[c.active_first], equal_nan=True):
        return "its tracklets' first crops differ from the stored ones"
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
