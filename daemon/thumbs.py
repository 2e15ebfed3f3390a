"""Gallery thumbnails: one small JPEG per crop, made once, in ``<session folder>/thumbs/``.

A thumbnail is named by a hash of the crop's name (:func:`thumb_name`), so the
daemon (which makes it when the crop is committed) and ``crop-clusterd
gallery`` (which makes the missing ones for a batch output folder) agree on it
without any index. It carries its crop's modification time, and is made again
only when that no longer matches (the crop was rewritten under the same name:
a new picture) or when it is empty (what a power cut can leave, since
thumbnails skip fsync); otherwise it is never made again.
Transparency is composited on ``input.background`` exactly as for embedding
(:func:`crop_clusterd.images.load_rgb`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

from PIL import Image

# Imported by name, not through the module: scripts/soak.py slows the snapshot's
# writes by patching atomic.atomic_write, and thumbnails are the link stage's.
from .atomic import atomic_write
from .images import DEFAULT_BACKGROUND, RGB, DecodeError, load_rgb
from .log import get_logger
from .records import CommittedCrop
from .sessionfiles import session_folder

__all__ = [
    "THUMBS_DIR",
    "THUMB_PX",
    "ThumbWriter",
    "make_thumbnail",
    "make_thumbnails",
    "thumb_name",
]

log = get_logger(__name__)

THUMBS_DIR: Final = "thumbs"
"""Folder of a session's thumbnails, next to its ``index.html``."""

THUMB_PX: Final = 96
"""Longest side of a thumbnail in pixels (smaller crops are not enlarged)."""

_QUALITY: Final = 80


def thumb_name(crop_name: str) -> str:
    """The thumbnail's file name for a crop named ``crop_name`` (its name in ``clusters.csv``):
    the first 16 hex digits of the SHA-1 of the name, plus ``.jpg``."""
    digest = hashlib.sha1(crop_name.encode("utf-8", "surrogateescape"), usedforsecurity=False)
    return digest.hexdigest()[:16] + ".jpg"


def _current(target: Path, mtime_ns: int) -> bool:
    """Whether ``target`` is a thumbnail of the crop version modified at ``mtime_ns``."""
    try:
        st = target.stat()
    except FileNotFoundError:
        return False
    return st.st_size > 0 and st.st_mtime_ns == mtime_ns


def make_thumbnail(
    source: Path,
    target: Path,
    *,
    background: RGB = DEFAULT_BACKGROUND,
    px: int = THUMB_PX,
) -> bool:
    """Write ``target`` (a JPEG whose longest side is at most ``px``) from the crop
    ``source`` unless ``target`` is already the thumbnail of this version of
    ``source`` (non-empty, same modification time); True when it was written.

    Raises :class:`~crop_clusterd.images.DecodeError` when ``source`` cannot be
    decoded and ``OSError`` when ``target`` cannot be written (nothing partial is
    left: the write is atomic).
    """
    try:
        # Taken before decoding: a rewrite during it leaves an older time, so
        # the next call makes the thumbnail again.
        st = source.stat()
    except OSError as exc:
        raise DecodeError(f"cannot read: {exc.strerror or exc}", source) from exc
    if _current(target, st.st_mtime_ns):
        return False
    image = load_rgb(source, background=background)
    # reducing_gap: a cheap box pre-shrink before the resampling, fine at this size.
    image.thumbnail((px, px), Image.Resampling.BILINEAR, reducing_gap=2.0)

    def write(handle: BinaryIO) -> None:
        image.save(handle, "JPEG", quality=_QUALITY)

    atomic_write(target, write, sync=False)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    return True


@dataclass(frozen=True, slots=True)
class ThumbCount:
    """What one call made: thumbnails ``written``, crops ``failed`` (logged)."""

    written: int
    failed: int


def make_thumbnails(
    folder: Path,
    crops: Iterable[tuple[str, Path]],
    *,
    background: RGB = DEFAULT_BACKGROUND,
    px: int = THUMB_PX,
) -> ThumbCount:
    """Make the missing thumbnails of ``crops`` ((name, file) pairs) in ``folder/thumbs``.

    A crop that cannot be decoded (moved away since) is logged and counted in
    ``failed``; the page shows its name without a picture. Raises ``OSError``
    when the thumbnails folder cannot be created or a thumbnail written.
    """
    thumbs = folder / THUMBS_DIR
    thumbs.mkdir(parents=True, exist_ok=True)
    written = failed = 0
    for name, source in crops:
        try:
            written += make_thumbnail(
                source, thumbs / thumb_name(name), background=background, px=px
            )
        except DecodeError as exc:
            failed += 1
            log.debug("thumbnail_failed", file=name, reason=exc.reason)
    return ThumbCount(written, failed)


class ThumbWriter:
    """Makes the thumbnails of crops as the link stage commits them.

    ``out`` is the output folder (the session ``"all"`` of ``split = "none"``
    writes straight into it, see :func:`session_folder`). A failure to write (a full disk) is
    logged once per kind of error and never raised: thumbnails are a view, and
    the commit they follow has already happened.
    """

    def __init__(
        self, out: Path, *, background: RGB = DEFAULT_BACKGROUND, px: int = THUMB_PX
    ) -> None:
        self.out = Path(out)
        self.background = background
        self.px = px
        self._last_error: str | None = None

    def __call__(self, session: str, committed: Sequence[CommittedCrop]) -> None:
        """Make the thumbnails of one session's committed crops."""
        if not committed:
            return
        folder = session_folder(self.out, session)
        crops = ((c.item.crop.name, c.item.crop.path) for c in committed)
        try:
            make_thumbnails(folder, crops, background=self.background, px=self.px)
        except OSError as exc:
            if str(exc) != self._last_error:
                log.warning("thumbnails_failed", session=session, reason=str(exc))
            self._last_error = str(exc)
        else:
            self._last_error = None
