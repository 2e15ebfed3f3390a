"""The gallery of a batch output folder: ``crop-clusterd gallery OUT`` and ``cluster --gallery``.

The batch command writes ``clusters.csv`` into the output folder (``split =
"none"``) or into one folder per session; each such folder gets the page the
daemon writes (:mod:`crop_clusterd.gallery`), its thumbnails (only the missing
ones are made) and its activity files. Capture times and frames are read from
the crop names (flat-bug's form and ``input.time_format``), as the batch
command reads them; crops of other names have neither. Box positions (the
page's track sketches) come from flat-bug's metadata when ``input.meta_folder``
is given, as for the batch command's ``-mf``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from .activity import ActivityWriter
from .csvfiles import CLUSTERS_CSV, read_clusters_csv
from .flatbug import MetadataIndex, TimeFormat, describe_crop
from .gallery import INDEX_HTML, GalleryCrops, GalleryWriter
from .images import DEFAULT_BACKGROUND, RGB
from .log import get_logger
from .summary import summarize
from .thumbs import make_thumbnails

FloatColumn = np.ndarray[tuple[int], np.dtype[np.float64]]

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
    meta_folder: Path | None = None,
    root: Path | None = None,
) -> list[GalleryBuilt]:
    """Write the gallery of every folder of ``out`` with a ``clusters.csv``.

    Relative crop names are taken relative to ``root`` (default: the current
    folder), as the batch command wrote them. Raises ``FileNotFoundError`` when
    no folder has a ``clusters.csv`` or ``meta_folder`` is not a folder,
    ``ValueError`` for a malformed ``clusters.csv`` and ``OSError`` when a file
    cannot be written.
    """
    folders = gallery_folders(out)
    if not folders:
        raise FileNotFoundError(f"no {CLUSTERS_CSV} in {out} nor in its session folders")
    base = (root if root is not None else Path.cwd()).absolute()
    writer = GalleryWriter(root=base.as_uri().rstrip("/") + "/")
    reader = _CropReader(
        TimeFormat.compile(time_format) if time_format else None,
        MetadataIndex.scan(meta_folder, loose=True) if meta_folder is not None else None,
    )
    return [_build_one(folder, writer, background, reader, base) for folder in folders]


def _build_one(
    folder: Path, writer: GalleryWriter, background: RGB, reader: _CropReader, base: Path
) -> GalleryBuilt:
    rows = read_clusters_csv(folder / CLUSTERS_CSV)
    names = [name for name, _ in rows]
    paths = [base / name for name in names]  # an absolute name stays itself
    clusters = np.array([c for _, c in rows], dtype=np.int64)
    times, frames, boxes = reader.read(names, paths)
    count = make_thumbnails(folder, zip(names, paths, strict=True), background=background)
    ActivityWriter().write(folder, clusters, times, final=True, title=folder.name)
    session = folder.name
    summary = summarize(session, clusters, times)
    crops = GalleryCrops(names, clusters, times, frames, boxes)
    writer.write(folder, crops, summary, title=session)
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


@dataclass(frozen=True, slots=True)
class _CropReader:
    """Reads what the page shows of each crop from its name (and metadata)."""

    fmt: TimeFormat | None
    metadata: MetadataIndex | None

    def read(
        self, names: Sequence[str], paths: Sequence[Path]
    ) -> tuple[FloatColumn, list[str | None], npt.NDArray[np.float64] | None]:
        """Capture times (NaN unknown), frames and boxes (n×4, see ``GalleryCrops``)."""
        times = np.full(len(names), math.nan, dtype=np.float64)
        boxes = np.full((len(names), 4), math.nan, dtype=np.float64)
        frames: list[str | None] = []
        for i, (name, path) in enumerate(zip(names, paths, strict=True)):
            crop, _ = describe_crop(path, name, time_format=self.fmt, metadata=self.metadata)
            if crop.time is not None:
                times[i] = crop.time
            if crop.center is not None:
                boxes[i, :2] = crop.center
            if crop.frame_size is not None:
                boxes[i, 2:] = crop.frame_size
            frames.append(None if crop.frame is None else str(crop.frame))
        return times, frames, boxes if self.metadata is not None else None
