"""The gallery of a batch output folder: ``crop-clusterd gallery OUT`` and ``cluster --gallery``.

The batch command writes ``clusters.csv`` into the output folder (``split =
"none"``) or into one folder per session; each such folder gets the page the
daemon writes (:mod:`crop_clusterd.gallery`), its thumbnails (only the missing
ones are made) and its activity files. Capture times and frames are read from
the crop names (flat-bug's form and ``input.time_format``), as the batch
command reads them; crops of other names have neither.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .activity import ActivityWriter
from .csvfiles import CLUSTERS_CSV, read_clusters_csv
from .flatbug import TimeFormat, describe_crop
from .gallery import INDEX_HTML, GalleryCrops, GalleryWriter
from .images import DEFAULT_BACKGROUND, RGB
from .log import get_logger
from .summary import summarize
from .thumbs import make_thumbnails

__all__ = ["GalleryBuilt", "build_galleries", "gallery_folders"]

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class GalleryBuilt:
    """One folder's page: its ``index.html``, crops, clusters, thumbnails made now
    and crops whose thumbnail could not be made (their files are gone or broken)."""

    page: Path
    crops: int
    clusters: int
    thumbs_made: int
    thumbs_failed: int


def gallery_folders(out: Path) -> list[Path]:
    """The folders under ``out`` that hold a ``clusters.csv``: ``out`` itself, else
    its session folders in name order (``current`` link skipped). Empty when none."""
    if (out / CLUSTERS_CSV).is_file():
        return [out]
    return sorted(
        p
        for p in out.iterdir()
        if p.is_dir() and not p.is_symlink() and (p / CLUSTERS_CSV).is_file()
    )


def build_galleries(
    out: Path,
    *,
    background: RGB = DEFAULT_BACKGROUND,
    time_format: str | None = None,
    root: Path | None = None,
) -> list[GalleryBuilt]:
    """Write the gallery of every folder of ``out`` with a ``clusters.csv``.

    Relative crop names are taken relative to ``root`` (default: the current
    folder), as the batch command wrote them. Raises ``FileNotFoundError`` when
    no folder has a ``clusters.csv``, ``ValueError`` for a malformed one and
    ``OSError`` when a file cannot be written.
    """
    folders = gallery_folders(out)
    if not folders:
        raise FileNotFoundError(f"no {CLUSTERS_CSV} in {out} nor in its session folders")
    base = (root if root is not None else Path.cwd()).absolute()
    writer = GalleryWriter(root=base.as_uri().rstrip("/") + "/")
    fmt = TimeFormat.compile(time_format) if time_format else None
    return [_build_one(folder, writer, background, fmt, base) for folder in folders]


def _build_one(
    folder: Path, writer: GalleryWriter, background: RGB, fmt: TimeFormat | None, base: Path
) -> GalleryBuilt:
    rows = read_clusters_csv(folder / CLUSTERS_CSV)
    names = [name for name, _ in rows]
    paths = [base / name for name in names]  # an absolute name stays itself
    clusters = np.array([c for _, c in rows], dtype=np.int64)
    times, frames = _times_and_frames(names, paths, fmt)
    count = make_thumbnails(folder, zip(names, paths, strict=True), background=background)
    ActivityWriter().write(folder, clusters, times, final=True, title=folder.name)
    session = folder.name
    summary = summarize(session, clusters, times)
    writer.write(folder, GalleryCrops(names, clusters, times, frames), summary, title=session)
    log.info(
        "gallery_written",
        folder=str(folder),
        crops=len(names),
        clusters=summary.clusters,
        thumbs_made=count.written,
        thumbs_failed=count.failed,
    )
    return GalleryBuilt(
        folder / INDEX_HTML, len(names), summary.clusters, count.written, count.failed
    )


def _times_and_frames(
    names: Sequence[str], paths: Sequence[Path], fmt: TimeFormat | None
) -> tuple[np.ndarray[tuple[int], np.dtype[np.float64]], list[str | None]]:
    times = np.full(len(names), math.nan, dtype=np.float64)
    frames: list[str | None] = []
    for i, (name, path) in enumerate(zip(names, paths, strict=True)):
        crop, _ = describe_crop(path, name, time_format=fmt, metadata=None)
        if crop.time is not None:
            times[i] = crop.time
        frames.append(None if crop.frame is None else str(crop.frame))
    return times, frames
