"""Frozen records passed between pipeline stages.

Each stage takes and returns these, never loose dicts, so a field renamed in one
place is a type error everywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

Vector = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Crop:
    """One crop file with what its name and metadata tell about it.

    ``name`` is the string written to ``clusters.csv``; ``time`` is the frame's
    capture time in seconds (naive local time read from the file name, only ever
    compared with other crops' times), ``center`` the centre of the crop's box in
    frame pixels. Either is ``None`` when unknown. ``size`` and ``mtime_ns`` are
    the file's stat when the daemon found it ready (the registry of processed
    files keeps them); the batch command leaves them ``None``.
    """

    path: Path
    name: str
    frame: str | None = None
    crop_index: int | None = None
    time: float | None = None
    center: tuple[float, float] | None = None
    size: int | None = None
    mtime_ns: int | None = None


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
