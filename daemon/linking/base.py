"""The records and the interface every linking method shares.

:class:`Linker` is the interface: crops arrive one micro-batch at a time as a
:class:`LinkBatch`, each :meth:`Linker.add` returns an :class:`AddResult`, and
:meth:`Linker.save` / :meth:`Linker.restore` carry a linker across a restart
through a :class:`StoredLinks` record. The parameter records (:class:`Gating`,
:class:`Motion`, :class:`HnswParams`) take their defaults from
:mod:`crop_clusterd.defaults`.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

from .. import defaults
from ..records import Embedded, FrameId, Merge, TrapId

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class Gating:
    """Spatio-temporal support a link needs (the old tool's rule and defaults).

    Distances in pixels, windows in seconds.
    """

    max_center_dist_px: float = defaults.MAX_CENTER_DIST_PX
    near_window_s: float = defaults.NEAR_WINDOW_S
    any_window_s: float = defaults.ANY_WINDOW_S

    @property
    def window_s(self) -> float:
        """No link is possible between crops further apart in time than this."""
        return max(self.near_window_s, self.any_window_s)

    def supports(
        self,
        dt: FloatArray,
        dist: FloatArray,
    ) -> npt.NDArray[np.bool_]:
        """Whether pairs with time gaps ``dt`` and centre distances ``dist`` may link.

        ``dt`` and ``dist`` have one entry per pair; the result too. NaN
        (unknown) compares false: a crop without a time never links, one
        without a box links on time alone.
        """
        dt = np.abs(dt)
        with np.errstate(invalid="ignore"):
            near = (dt < self.near_window_s) & (dist < self.max_center_dist_px)
            return np.asarray((dt < self.any_window_s) | near)


@dataclass(frozen=True, slots=True)
class Motion:
    """How far an individual moves between its crops, for ``track``.

    ``max_move`` is a fraction of the frame's diagonal (frames range from
    1,000 to 4,000+ px wide, so a limit in pixels fits none of them): a crop
    may continue a cluster only within ``max_move * diagonal`` of the
    cluster's last box centre, and a match scores its similarity minus
    ``penalty * min(distance / (max_move * diagonal), 1)``. A crop or cluster
    without a known position may match at the full penalty. ValueError when
    ``max_move`` is not in (0, 1] or ``penalty`` is negative.
    """

    max_move: float = defaults.TRACK_MAX_MOVE
    penalty: float = defaults.TRACK_MOVE_PENALTY

    def __post_init__(self) -> None:
        if not 0.0 < self.max_move <= 1.0:
            raise ValueError(f"max_move is a fraction of the frame diagonal, got {self.max_move}")
        if self.penalty < 0.0:
            raise ValueError(f"move penalty must be >= 0, got {self.penalty}")


@dataclass(frozen=True, slots=True)
class Stitch:
    """When ``track`` joins two tracklets of one trap (its second pass).

    Two tracklets are joined when the cosine similarity of their prototypes
    (the normalised mean of their crops' embeddings) is at least ``threshold``
    (stricter than a single crop's) and either one starts at most
    ``gap_frames`` frames of the trap (and ``cap_s`` seconds) after the other
    ended, within ``max_move`` (fraction of the frame diagonal) of where it
    ended, or the two overlap in time, never share a frame and their mean
    positions are within ``max_move`` of each other (the blurred half of one
    insect). Tracklets without a known position are never stitched.
    ValueError for a threshold outside [-1, 1], a negative gap or cap, or a
    ``max_move`` outside (0, 1].
    """

    threshold: float = defaults.STITCH_THRESHOLD
    gap_frames: int = defaults.STITCH_GAP_FRAMES
    max_move: float = defaults.STITCH_MAX_MOVE
    cap_s: float = defaults.STITCH_CAP_S

    def __post_init__(self) -> None:
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"stitch threshold must be within [-1, 1], got {self.threshold}")
        if self.gap_frames < 0 or self.cap_s < 0:
            raise ValueError("stitch gap_frames and cap_s must be >= 0")
        if not 0.0 < self.max_move <= 1.0:
            raise ValueError(f"stitch max_move is a fraction of the diagonal, got {self.max_move}")


@dataclass(frozen=True, slots=True)
class HnswParams:
    """Index and query settings for the ungated cosine search.

    ``m``, ``ef_construction`` and ``ef_search``: see
    :mod:`crop_clusterd.defaults` for the measurements behind them.
    """

    m: int = defaults.HNSW_M
    ef_construction: int = defaults.HNSW_EF_CONSTRUCTION
    # Query candidate list size. A large batch is indexed whole before any of it
    # is queried, so a pair inside it is searched from both ends, and pairs that
    # share one of their three nearest anchors are linked exactly beforehand.
    # With both, ef=64 and ef=128 matched the all-pairs oracle exactly at 200,000
    # crops (without the anchor pairs they lost a few dozen links there); 128
    # keeps a margin for a million (scripts/check_oracle.py).
    ef_search: int = defaults.HNSW_EF_SEARCH
    k_start: int = 16
    # A query whose k-th neighbour is still above the threshold at this k stops
    # widening: its crop sits in a dense group (a stuck insect), which is settled
    # by exact products around a few leaders instead (crop_clusterd.linking.neighbours).
    dense_k: int = 64
    # Below this many crops an exact search is faster than keeping an index.
    brute_force_below: int = 4096
    threads: int = 0  # 0 = all cores
    chunk: int = 20_000
    seed: int = 100
    # From this many lost queries in one batch on, they are settled through a
    # side index (see crop_clusterd.linking.neighbours) instead of retries and exact
    # search; below it, retrying is cheaper.
    side_index_from: int = 1024
    side_ef: int = 32
    # A large first batch (the batch command's) past the exact crossover is
    # searched through k-means buckets instead of an index (linking/buckets.py).
    bucket_crops: int = defaults.BUCKET_CROPS
    bucket_probes: int = defaults.BUCKET_PROBES
    # Search such a batch through buckets at any size past brute_force_below
    # (for tests and scripts/check_oracle.py --force-buckets).
    force_buckets: bool = False


@dataclass(frozen=True)
class LinkBatch:
    """Columns of one micro-batch as the engine needs them.

    ``embeddings`` float32 n x d, L2-normalised; ``times`` seconds (NaN unknown);
    ``centers`` n x 2 pixels (NaN unknown); ``frames`` the flat-bug frame of
    each crop (None when the name is not a flat-bug name; all such crops count
    as one trap of their own, see :attr:`CropColumns.traps`); ``sizes`` n x 2
    the frame's width and height in pixels (NaN unknown; None: all unknown).
    Raises :class:`ValueError` when the shapes disagree.
    """

    embeddings: npt.NDArray[np.float32]
    times: FloatArray
    centers: FloatArray
    frames: tuple[FrameId | None, ...]
    sizes: FloatArray | None = None

    def __post_init__(self) -> None:
        n = len(self.embeddings)
        if self.embeddings.ndim != 2 or self.embeddings.dtype != np.float32:
            raise ValueError("embeddings must be a float32 n x d array")
        if self.times.shape != (n,) or self.centers.shape != (n, 2) or len(self.frames) != n:
            raise ValueError("times, centers and frames must have one entry per embedding")
        if self.sizes is None:
            object.__setattr__(self, "sizes", np.full((n, 2), np.nan))
        elif np.shape(self.sizes) != (n, 2):
            raise ValueError("sizes must have one (width, height) per embedding")

    @property
    def frame_sizes(self) -> FloatArray:
        """``sizes``, never None (n x 2 pixels, NaN unknown)."""
        assert self.sizes is not None  # filled in by __post_init__
        return self.sizes

    def __len__(self) -> int:
        return len(self.embeddings)

    def rows(self, rows: IntArray) -> LinkBatch:
        """The batch of the given rows, in that order."""
        return LinkBatch(
            self.embeddings[rows],
            self.times[rows],
            self.centers[rows],
            tuple(self.frames[i] for i in rows),
            self.frame_sizes[rows],
        )

    @classmethod
    def from_embeddings(cls, embeddings: npt.NDArray[np.float32]) -> LinkBatch:
        """A batch with no time, position or frame (e.g. from an embeddings pickle)."""
        n = len(embeddings)
        return cls(
            embeddings=embeddings,
            times=np.full(n, np.nan),
            centers=np.full((n, 2), np.nan),
            frames=(None,) * n,
        )

    @classmethod
    def from_embedded(cls, items: Sequence[Embedded]) -> LinkBatch:
        """Build the columns from embedded crops; raises ValueError when empty."""
        n = len(items)
        if n == 0:
            raise ValueError("empty batch")
        embeddings = np.stack([item.vector for item in items]).astype(np.float32, copy=False)
        times = np.array(
            [np.nan if item.crop.time is None else item.crop.time for item in items],
            dtype=np.float64,
        )
        centers = np.array(
            [
                item.crop.center if item.crop.center is not None else (np.nan, np.nan)
                for item in items
            ],
            dtype=np.float64,
        ).reshape(n, 2)
        sizes = np.array(
            [item.crop.frame_size or (np.nan, np.nan) for item in items], dtype=np.float64
        ).reshape(n, 2)
        return cls(embeddings, times, centers, tuple(item.crop.frame for item in items), sizes)


@dataclass(frozen=True, slots=True)
class AddResult:
    """What one :meth:`Linker.add` did: the new crops' sequence numbers and merges."""

    seqs: range
    merges: tuple[Merge, ...] = ()


@dataclass(frozen=True)
class StoredLinks:
    """A linker's state as the daemon's state folder holds it.

    ``batch`` every stored crop in sequence order (n crops); ``cluster_ids``
    their current cluster ids (n, the smallest member's sequence number);
    ``batch_numbers`` the micro-batch each crop was committed in (n,
    non-decreasing); ``index_file`` the saved HNSW index, if any, and
    ``index_covers`` how many of the first crops it holds (0: none).
    ``commit_ids`` (n, the id each crop got at its commit) and ``merges``
    (batch number, merge) in commit order are the history :meth:`ids_at`
    reads; without them the ids are taken to have never changed. Raises
    :class:`ValueError` when the columns disagree in length.
    """

    batch: LinkBatch
    cluster_ids: IntArray
    batch_numbers: IntArray
    index_file: Path | None = None
    index_covers: int = 0
    commit_ids: IntArray | None = None
    merges: tuple[tuple[int, Merge], ...] = ()

    def __post_init__(self) -> None:
        if len(self.cluster_ids) != len(self.batch):
            raise ValueError("one cluster id per stored crop is needed")
        if len(self.batch_numbers) != len(self.batch):
            raise ValueError("one batch number per stored crop is needed")
        if self.commit_ids is not None and len(self.commit_ids) != len(self.batch):
            raise ValueError("one commit id per stored crop is needed")

    def ids_at(self, m: int) -> IntArray:
        """The first ``m`` crops' cluster ids as they were right after their last
        micro-batch was committed (a checkpoint written then recorded these)."""
        if self.commit_ids is None or m == 0:
            return self.cluster_ids[:m]
        last = self.batch_numbers[m - 1]
        parent = self.commit_ids[:m].astype(np.int64, copy=True)
        for batch, merge in self.merges:
            if batch > last:
                break
            if merge.from_cluster < m:
                parent[merge.from_cluster] = merge.into_cluster
        # As store.current_clusters: each merge re-pointed a root; follow the pointers.
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                return parent
            parent = grand

    def __len__(self) -> int:
        return len(self.batch)

    def micro_batches(self, start: int = 0) -> Iterator[LinkBatch]:
        """The stored crops from sequence number ``start`` on, split into their
        micro-batches, in commit order (each a copy, made as it is reached)."""
        if start >= len(self):
            return
        bounds = np.flatnonzero(np.diff(self.batch_numbers[start:])) + 1
        for part in np.split(np.arange(start, len(self)), bounds):
            yield self.batch.rows(part)


class CropColumns:
    """Growable per-crop columns; the first large batch is adopted without a copy.

    Adopting matters for the batch path: one million 384-d embeddings are 1.5 GB
    and the memory budget is three times that, index included.

    After :meth:`map_embeddings` the embeddings column lives in a memory map
    of an unnamed file instead (the other columns stay in memory). Growing a
    map copies nothing and its untouched reserve is a sparse hole, so a map
    doubles; an in-memory column grows by a quarter, because while it is copied
    the old and the new array both exist.
    """

    def __init__(self) -> None:
        self.n = 0
        self.dim = 0
        self.embeddings: npt.NDArray[np.float32] = np.empty((0, 0), dtype=np.float32)
        self.times: FloatArray = np.empty(0)
        self.centers: FloatArray = np.empty((0, 2))
        self.sizes: FloatArray = np.empty((0, 2))
        self.frames: list[FrameId | None] = []
        # Trap of each crop as a small int (0: crops without a flat-bug frame),
        # so the linkers can refuse cross-trap pairs with one vectorised compare.
        self.traps: IntArray = np.empty(0, dtype=np.int64)
        self._trap_codes: dict[TrapId | None, int] = {None: 0}
        self._file: BinaryIO | None = None

    def map_embeddings(self, folder: Path) -> None:
        """Keep the embeddings in a memory map of an unnamed file in ``folder``
        (gone with the process, crash included); rows already held move there.

        The folder should be on a disk: on a tmpfs the map is memory again.
        Raises :class:`OSError` when the file cannot be created.
        """
        if self._file is not None:
            return
        # Open for the columns' lifetime: closed (and so freed) with them.
        self._file = tempfile.TemporaryFile(dir=folder, prefix=".vectors-")  # noqa: SIM115
        if self.dim:
            held = self.live_embeddings
            self.embeddings = self._map(max(self.n, 1024))
            self.embeddings[: self.n] = held

    def _map(self, capacity: int) -> npt.NDArray[np.float32]:
        """The file mapped as ``capacity`` rows (extended sparse, never shrunk)."""
        assert self._file is not None
        size = max(capacity * self.dim * 4, 1)
        fd = self._file.fileno()
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        # The old map stays valid for views still held elsewhere; it is unmapped
        # when the last of them goes.
        buffer = mmap.mmap(fd, size)
        rows = np.frombuffer(buffer, dtype=np.float32, count=capacity * self.dim)
        return rows.reshape(capacity, self.dim)

    def append(self, batch: LinkBatch) -> range:
        """Store a batch; return its sequence numbers. ValueError on a new dimension."""
        n_new = len(batch)
        start = self.n
        if self.n == 0 and self._file is None and batch.embeddings.flags.c_contiguous:
            self.dim = batch.embeddings.shape[1]
            self.embeddings = batch.embeddings
            self.times = batch.times.copy()
            self.centers = batch.centers.copy()
            self.sizes = batch.frame_sizes.copy()
            self.traps = np.empty(n_new, dtype=np.int64)
        else:
            if self.n == 0:
                self.dim = batch.embeddings.shape[1]
            if batch.embeddings.shape[1] != self.dim:
                raise ValueError(
                    f"embedding dimension {batch.embeddings.shape[1]} does not match "
                    f"the {self.dim} of the crops already clustered"
                )
            self._reserve(self.n + n_new)
            self.embeddings[start : start + n_new] = batch.embeddings
            self.times[start : start + n_new] = batch.times
            self.centers[start : start + n_new] = batch.centers
            self.sizes[start : start + n_new] = batch.frame_sizes
        self.frames.extend(batch.frames)
        codes = self._trap_codes
        for i, frame in enumerate(batch.frames):
            trap = None if frame is None else frame.trap
            self.traps[start + i] = codes.setdefault(trap, len(codes))
        self.n += n_new
        return range(start, self.n)

    def _reserve(self, needed: int) -> None:
        capacity = len(self.times)
        if needed <= capacity and len(self.embeddings) >= needed:
            return
        grow = 2 * capacity if self._file is not None else capacity + capacity // 4
        new_capacity = max(needed, grow, 1024)
        names = ["times", "centers", "sizes", "traps"]
        if self._file is not None:
            self.embeddings = self._map(new_capacity)
        else:
            names.append("embeddings")
        for name in names:
            old = getattr(self, name)
            grown = np.empty((new_capacity, *old.shape[1:]), dtype=old.dtype)
            grown[: self.n] = old[: self.n]
            setattr(self, name, grown)

    def trap_codes(self) -> tuple[TrapId | None, ...]:
        """The trap of each trap code, in code order (code 0: no flat-bug frame)."""
        return tuple(self._trap_codes)

    @property
    def live_embeddings(self) -> npt.NDArray[np.float32]:
        """The first ``n`` rows (n x d float32), a view."""
        return self.embeddings[: self.n]


class Linker(ABC):
    """Incremental clustering: feed batches with :meth:`add`, read :meth:`cluster_ids`.

    ``threshold`` is a cosine similarity in [-1, 1] (ValueError otherwise).
    """

    def __init__(self, threshold: float, gating: Gating | None = None) -> None:
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be within [-1, 1], got {threshold}")
        self.threshold = threshold
        self.gating = gating
        self._cols = CropColumns()
        self._retired: IntArray = np.empty(0, dtype=np.int64)  # sorted

    def __len__(self) -> int:
        return self._cols.n

    def map_vectors(self, folder: Path) -> bool:
        """Let a linker whose index holds every vector keep its own embeddings
        in a memory-mapped file in ``folder`` instead of memory; return whether
        it does. The default keeps them in memory: without an index the
        columns are the only copy. Raises :class:`OSError` when the file cannot
        be created.
        """
        del folder
        return False

    def retire(self, seqs: IntArray) -> None:
        """Stop the crops ``seqs`` (sequence numbers) from linking anything again.

        For a crop whose file was rewritten: its embedding row becomes zeros
        (cosine 0 to everything, so no rule accepts it) and pairs that touch it
        are refused even where an index still holds the old vector. Links made
        before stay (no linker can take a union back); ids never change.
        Raises `IndexError` for a sequence number not yet added.
        """
        seqs = np.unique(np.asarray(seqs, dtype=np.int64))
        if len(seqs) == 0:
            return
        if seqs[0] < 0 or seqs[-1] >= self._cols.n:
            raise IndexError(f"cannot retire crops {seqs.tolist()}: {self._cols.n} crops held")
        self._cols.embeddings[seqs] = 0.0
        self._retired = np.union1d(self._retired, seqs)

    def _live_pairs(self, a: IntArray, b: IntArray) -> npt.NDArray[np.bool_]:
        """Which pairs ``(a[i], b[i])`` touch no retired crop."""
        if len(self._retired) == 0:
            return np.ones(len(a), dtype=bool)
        return ~(np.isin(a, self._retired) | np.isin(b, self._retired))

    @abstractmethod
    def add(self, batch: LinkBatch) -> AddResult:
        """Assign a batch; its crops get the next sequence numbers in order."""

    @abstractmethod
    def cluster_ids(self) -> IntArray:
        """Cluster id of every crop so far, indexed by sequence number."""

    @abstractmethod
    def cluster_of(self, seqs: IntArray) -> IntArray:
        """Current cluster id of the given crops (cheap for a micro-batch)."""

    @abstractmethod
    def save(self, path: Path) -> int:
        """Persist what a restart cannot cheaply rebuild to ``path`` (atomically).

        Returns how many crops (the first ones by sequence number) the saved
        file covers; 0 when nothing was written. Raises :class:`OSError` when
        writing fails.
        """

    @abstractmethod
    def restore(self, stored: StoredLinks) -> bool:
        """Bring a fresh linker to the stored state; return whether a saved file was used.

        Raises :class:`RuntimeError` when the linker already holds crops and
        :class:`ValueError` when the stored state is inconsistent.
        """

    @property
    def embeddings(self) -> npt.NDArray[np.float32]:
        """The stored embeddings, indexed by sequence number (read-only view)."""
        view = self._cols.live_embeddings.view()
        view.flags.writeable = False
        return view
