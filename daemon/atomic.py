"""Atomic file replacement: a reader sees the old complete file or the new one.

Readers poll the output files while the daemon runs, so every file is written
to a hidden temporary name in the same folder, fsynced and renamed over the
target (:func:`atomic_write`). A process killed mid-write leaves the temporary
file behind; :func:`remove_stale_temp_files` clears those. A symbolic link is
replaced the same way (:func:`replace_symlink`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "remove_stale_temp_files", "replace_symlink", "temp_prefix"]


@functools.cache
def _umask() -> int:
    """The process umask, read without changing it where /proc allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    # Fallback briefly sets the umask; only reached off Linux.
    old = os.umask(0o022)
    os.umask(old)
    return old


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable; a no-op where the filesystem cannot."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some filesystems (and platforms) refuse fsync on folders; the rename
        # itself has already happened, so there is nothing to undo.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def temp_prefix(name: str) -> str:
    """Hidden temporary-file prefix for ``name`` (``.<name>.tmp-``), cut so a random
    suffix still fits under the 255-byte file-name limit."""
    cut = name.encode("utf-8", "surrogateescape")[:200].decode("utf-8", "ignore")
    return f".{cut}.tmp-"


def remove_stale_temp_files(path: Path) -> int:
    """Delete temporary files that :func:`atomic_write` left for ``path`` when the
    process was killed mid-write (a snapshot of a million embeddings leaves a
    large one); return how many. Call before anything writes ``path`` again."""
    removed = 0
    prefix = temp_prefix(path.name)
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(path.parent):
            # Symlinks too: a kill inside replace_symlink leaves a temporary link.
            if entry.name.startswith(prefix) and (
                entry.is_file(follow_symlinks=False) or entry.is_symlink()
            ):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
    return removed


def atomic_write(path: Path, write: Callable[[BinaryIO], None], *, sync: bool = True) -> None:
    """Replace ``path`` with what ``write`` writes to the binary file it is given.

    The data goes to a hidden temporary file in the same folder
    (``.<name>.tmp-<random>``), is flushed and fsynced, then renamed over
    ``path`` and the folder fsynced. On any error (including an ``OSError`` such
    as ENOSPC, which propagates unchanged) the temporary file is removed and the
    previous ``path`` is left intact. The new file keeps the old file's mode, or
    gets ``0o666`` minus the umask. ``sync=False`` skips both fsyncs: readers
    still never see a partial file, but a power cut may leave an empty one (for
    files that can be made again, such as thumbnails, where two fsyncs per file
    would cost more than the file).
    """
    path = Path(path)
    folder = path.parent
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(path.name), dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            if sync:
                os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        # BaseException too: a Ctrl-C mid-write must not leave temp files behind.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    if sync:
        _fsync_dir(folder)


def replace_symlink(link: Path, target: str) -> bool:
    """Point the symbolic link ``link`` at ``target`` atomically; True when it changed.

    ``target`` is stored as given (pass a relative path, such as a sibling
    folder's name, so the link survives the folder being moved). A reader
    resolving ``link`` meanwhile finds the old target or the new one, never no
    link: a new link is made under a hidden temporary name and renamed over
    ``link``, then the folder is fsynced. Nothing is written when ``link``
    already points at ``target``. Raises ``FileExistsError`` when ``link`` exists
    and is not a symlink (it is left untouched), and ``OSError`` on other failures.
    """
    link = Path(link)
    try:
        if os.readlink(link) == target:
            return False
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: it exists but is not a symlink
            raise
        raise FileExistsError(
            errno.EEXIST, f"{link} exists and is not a symbolic link; not replacing it"
        ) from None
    # mkstemp reserves a unique name; the link takes its place under that name.
    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(link.name), dir=link.parent)
    os.close(fd)
    try:
        os.unlink(tmp_name)
        os.symlink(target, tmp_name)
        os.replace(tmp_name, link)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(link.parent)
    return True
