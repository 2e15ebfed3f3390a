"""Frozen records passed between pipeline stages, all of them, in flow order.

Each stage takes and returns these, never loose dicts, so a field renamed in one
place is a type error everywhere else. The daemon's flow:

    Crop -> Prepared (decoded) -> IntakeUnit (intake -> embed)
         -> Embedded -> MicroBatch (embed -> link)
         -> CommittedCrop, Merge, DecodeFailure (link -> state store)
         -> BatchCommitted (link -> supervisor)

The batch command's flow: Crop -> Prepared -> EmbedBatch -> Assignment, and
Skipped (one row of ``errors.csv``) for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    # Only for annotations: readers of the records (status, snapshots) must not import torch.
    import torch

Vector = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True, order=True)
class TrapId:
    """One trap: the folder that holds its frames, and flat-bug's identifier.

    ``place`` is that folder as an absolute path string (see
    :func:`crop_clusterd.flatbug.frame_place`); ``identifier`` is the ``UUID_<id>``
    part of the file names, ``""`` when the names carry none. Crops of two
    different traps never share a cluster.
    """

    place: str
    identifier: str


@dataclass(frozen=True, slots=True, order=True)
class FrameId:
    """One flat-bug frame: its name (the capture time and camera suffix) in one trap.

    Two frames of two traps may share a name; they are still two frames. Build it
    with :func:`crop_clusterd.flatbug.frame_of_crop` (a crop) or
    :func:`crop_clusterd.flatbug.frame_of_metadata` (a metadata JSON), so every
    lookup derives it the same way.
    """

    name: str
    trap: TrapId

    def __str__(self) -> str:
        """``<place>/<name>`` plus ``[<identifier>]``, for logs."""
        suffix = f"[{self.trap.identifier}]" if self.trap.identifier else ""
        return f"{self.trap.place}/{self.name}{suffix}"


@dataclass(frozen=True, slots=True)
class Crop:
    """One crop file with what its name and metadata tell about it.

    ``name`` is the string written to ``clusters.csv``; ``frame`` is flat-bug's
    frame (None when the name is not flat-bug's); ``time`` is the frame's
    capture time in seconds (naive local time read from the file name, only ever
    compared with other crops' times), ``center`` the centre of the crop's box in
    frame pixels. Either is ``None`` when unknown. ``size``, ``mtime_ns`` and
    ``inode`` are the file's stat when the daemon found it ready and ``content``
    its hash (:func:`crop_clusterd.identity.content_hash`): its identity, which
    the registry of processed files keeps; the batch command leaves them ``None``.
    ``frame_size`` is the frame's (width, height) in pixels from its metadata
    (``image_width``, ``image_height``), ``None`` when unknown.
    """

    path: Path
    name: str
    frame: FrameId | None = None
    crop_index: int | None = None
    time: float | None = None
    center: tuple[float, float] | None = None
    size: int | None = None
    mtime_ns: int | None = None
    inode: int | None = None
    content: str | None = None
    frame_size: tuple[float, float] | None = None


@dataclass(frozen=True, slots=True)
class Embedded:
    """A crop with its L2-normalised float32 embedding."""

    crop: Crop
    vector: Vector


@dataclass(frozen=True, slots=True)
class Assignment:
    """Where one crop landed: its sequence number and its cluster id."""

    seq: int
    name: str
    cluster: int


@dataclass(frozen=True, slots=True)
class Merge:
    """Two clusters joined by a new crop; the smaller id survives."""

    from_cluster: int
    into_cluster: int


@dataclass(frozen=True, slots=True)
class Skipped:
    """A file that was not clustered, and why (one row of ``errors.csv``)."""

    name: str
    reason: str


@dataclass(frozen=True, slots=True)
class DecodeFailure:
    """A crop file given up on after its decode retries, as the state store records it.

    ``name`` is the crop's record name, ``reason`` the ``errors.csv`` text;
    ``size`` (bytes), ``mtime_ns`` and ``inode`` are the file's stat when it
    was found ready and ``content`` its hash, ``None`` when unknown.
    """

    name: str
    reason: str
    size: int | None = None
    mtime_ns: int | None = None
    inode: int | None = None
    content: str | None = None


@dataclass(frozen=True, slots=True)
class Moved:
    """A known file found under a new path (``old != new``: a move, nothing is
    embedded again) or with a new stat but the same bytes (``old == new``).

    ``kind`` says which table holds it (``"crop"`` or ``"skip"``); ``size``
    (bytes), ``mtime_ns``, ``inode`` and ``content`` are its identity now;
    ``None`` stat fields mark a row whose new content is still to be committed
    (moved and rewritten), which the next start looks at again.
    """

    old: str
    new: str
    kind: str
    size: int | None
    mtime_ns: int | None
    inode: int | None
    content: str | None


@dataclass(frozen=True)
class Prepared:
    """A decoded crop, preprocessed into the embedder's input tensor (C x H x W)."""

    crop: Crop
    tensor: torch.Tensor


@dataclass(frozen=True)
class EmbedBatch:
    """The batch command's unit: one model batch of embedded crops and the ones
    skipped meanwhile (see :func:`crop_clusterd.decode.embed_crops`)."""

    embedded: tuple[Embedded, ...]
    skipped: tuple[Skipped, ...]


@dataclass(frozen=True)
class IntakeUnit:
    """Crops released together by intake: one frame's ready crops, decoded.

    A unit is never split across link batches, so a frame's crops are matched
    together (what ``track`` needs to equal the batch result). ``ready_at`` is
    the monotonic time (seconds) each crop's file was found ready, for latency
    figures, one per ``prepared``.
    """

    prepared: tuple[Prepared, ...]
    ready_at: tuple[float, ...]
    skipped: tuple[DecodeFailure, ...] = ()
    moved: tuple[Moved, ...] = ()

    def __len__(self) -> int:
        return len(self.prepared)


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch after the model (embed -> link): what the link stage
    assigns and commits. ``ready_at`` is as in :class:`IntakeUnit`, one per
    ``embedded``."""

    embedded: tuple[Embedded, ...]
    ready_at: tuple[float, ...]
    skipped: tuple[DecodeFailure, ...]
    moved: tuple[Moved, ...] = ()


@dataclass(frozen=True, slots=True)
class CommittedCrop:
    """One crop as a micro-batch commits it: the embedded crop, its sequence
    number (over all sessions), its cluster id at that moment and its number
    within its session (``local``; None: the same as ``seq``, one session).
    Cluster ids are local numbers."""

    item: Embedded
    seq: int
    cluster: int
    local: int | None = None


@dataclass(frozen=True, slots=True)
class BatchCommitted:
    """What the link stage reports after each commit (for STATUS and tests).

    ``crops``, ``skipped``, ``merges`` and ``new_clusters`` count this batch;
    ``total_crops`` is every session's crops after it, ``session_crops`` its
    session's; ``latency_ms_max`` the longest time from a
    file found ready to its commit, in milliseconds.
    """

    batch: int
    crops: int
    skipped: int
    merges: int
    total_crops: int
    latency_ms_max: float
    session: str = "all"
    session_crops: int = 0
    new_clusters: int = 0
