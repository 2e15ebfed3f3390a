"""Reconciliation walks of the watched tree: which files count, and which folders changed.

`scan_tree` walks the tree with ``os.scandir`` and yields the crops and
metadata files it finds, with their size, mtime and inode; it never follows
symlinks. A periodic rescan passes a `DirMtimes`, which keeps each directory's
mtime and sub-directory names from the previous walk, so that a directory
nothing was added to, removed from or renamed in is not listed again: a rescan
then costs one ``stat`` per directory, not a ``stat`` and a look-up per file of
the season. Used by :mod:`.watch` (which re-exports these names) and the intake.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .flatbug import parse_metadata_name
from .inputs import is_ignored_name, is_image_name
from .log import get_logger
from .scancache import ScanCache, children_of

__all__ = [
    "RACY_S",
    "DirMtimes",
    "FileKind",
    "FileSeen",
    "VerifyWalk",
    "kind",
    "list_sorted",
    "os_reason",
    "scan_tree",
    "skip_dir_name",
]

log = get_logger(__name__)

FileKind = Literal["crop", "metadata"]


@dataclass(frozen=True)
class FileSeen:
    """A regular file as last stat'ed: its path, size in bytes, mtime in ns and
    inode number (0 when unknown); see :mod:`.identity` for how they identify it."""

    path: Path
    size: int
    mtime_ns: int
    inode: int = 0


def kind(path: Path | str) -> FileKind | None:
    """Classify a file name: ``"metadata"`` (flat-bug JSON), ``"crop"`` (image) or None.

    Hidden and temporary names are None whatever their extension.
    """
    name = os.path.basename(os.fspath(path))
    if not name or is_ignored_name(name):
        return None
    if parse_metadata_name(name) is not None:
        return "metadata"
    if is_image_name(name):
        return "crop"
    return None


def skip_dir_name(name: str) -> bool:
    """Directories never entered: hidden/temporary ones and ones named like our files."""
    return is_ignored_name(name) or kind(name) is not None


# A directory's mtime is trusted as "unchanged" only when it was at least this old
# when stat'ed: a later change then gets a later mtime, even on a file system
# with 2 s timestamps (FAT) or a server clock a few seconds off (NFS). Younger
# directories are listed at every rescan.
RACY_S = 5.0


def list_sorted(directory: Path) -> list[os.DirEntry[str]]:
    """A directory's entries in name order (``os.scandir``; raises its `OSError`)."""
    with os.scandir(directory) as it:
        return sorted(it, key=lambda e: e.name)


class DirMtimes:
    """Each directory's mtime (ns) and sub-directory names as the previous scan saw them.

    An entry added, removed or renamed in a directory changes its mtime, so a
    rescan need not list a directory whose mtime is unchanged: nothing new can
    be in it (its sub-directories are still visited, from the names kept
    here). A file rewritten in place leaves its directory's mtime alone; the
    observer's events report it, and a full scan (``begin(full=True)``: after
    lost events) or the intake's verify walk (after a start) reads every
    directory. Memory is one entry per directory, none per file. ``clock_ns``
    is the wall clock the directories' mtimes are compared with (see
    :data:`RACY_S`).

    With a ``cache`` (:class:`~crop_clusterd.scancache.ScanCache`) what a walk
    saw survives restarts: `restore` reads it (once), and every walk run to its
    end writes the directories whose entry changed (new, gone, another mtime),
    so the writes follow the changes, not the size of the tree.

    Used by one thread: :func:`scan_tree` calls :meth:`begin` ... :meth:`end`
    around one walk; ``listed`` and ``unchanged`` count that walk's directories.
    """

    def __init__(
        self,
        *,
        margin_s: float = RACY_S,
        clock_ns: Callable[[], int] = time.time_ns,
        cache: ScanCache | None = None,
    ) -> None:
        self.margin_ns = int(margin_s * 1e9)
        self.clock_ns = clock_ns
        self.cache = cache
        self._restored: bool | None = None if cache is not None else False
        self._seen: dict[str, tuple[int, tuple[str, ...]]] = {}
        self._next: dict[str, tuple[int, tuple[str, ...]]] | None = None
        # Visited but not trusted (listed every walk): kept for the cache only,
        # whose rows must name every visited directory to give their parents' sub-dirs.
        self._unkept: set[str] = set()
        self._unkept_next: set[str] = set()
        self._forgotten: set[str] = set()
        self._full = True
        self.listed = 0
        self.unchanged = 0

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, directory: object) -> bool:
        """Whether the last walk kept ``directory`` (a path) as unchanged-able."""
        return str(directory) in self._seen

    def restore(self) -> bool:
        """Read the cache the first time (later calls answer again); whether it held
        a previous walk, so that the next walk need not list every directory."""
        if self._restored is None:
            assert self.cache is not None
            rows = self.cache.load()
            children = children_of(rows)
            self._seen = {
                path: (mtime, tuple(children.get(path, ())))
                for path, mtime in rows.items()
                if mtime is not None
            }
            self._unkept = {path for path, mtime in rows.items() if mtime is None}
            self._restored = bool(rows)
        return self._restored

    def begin(self, *, full: bool) -> None:
        """Start a walk; ``full``: list every directory, whatever the last walk saw."""
        self._next = {}
        self._unkept_next = set()
        self._full = full
        self.listed = self.unchanged = 0

    def subdirs_if_unchanged(self, directory: Path, mtime_ns: int) -> tuple[str, ...] | None:
        """The sub-directory names of a directory unchanged since the last walk, or None."""
        if self._full or self._next is None:
            return None
        seen = self._seen.get(str(directory))
        if seen is None or seen[0] != mtime_ns:
            return None
        self.unchanged += 1
        self._next[str(directory)] = seen
        return seen[1]

    def listed_now(
        self, directory: Path, mtime_ns: int, stat_at_ns: int, subdirs: list[str], complete: bool
    ) -> None:
        """A directory was listed: keep its mtime (stat'ed before the listing, at
        ``stat_at_ns``) if it was old enough and every entry could be read."""
        self.listed += 1
        if self._next is None:
            return
        if complete and mtime_ns <= stat_at_ns - self.margin_ns:
            self._next[str(directory)] = (mtime_ns, tuple(subdirs))
        else:
            self._unkept_next.add(str(directory))

    def not_listed(self, directory: Path) -> None:
        """A directory could not be stat'ed or listed: visit it again next walk."""
        if self._next is not None:
            self._unkept_next.add(str(directory))

    def end(self) -> None:
        """The walk finished: what it saw replaces the last one (gone directories go)."""
        if self._next is None:
            return
        if self.cache is not None:
            self._write_changes(self._next, self._unkept_next)
        self._seen, self._next = self._next, None
        self._unkept, self._unkept_next = self._unkept_next, set()
        self._forgotten.clear()

    def forget(self, directory: Path) -> None:
        """List ``directory`` at the next walk (a file in it could not be read)."""
        if self._seen.pop(str(directory), None) is not None:
            self._forgotten.add(str(directory))

    def flush_forgotten(self) -> None:
        """Store the directories forgotten since the last walk as "to be listed"
        (before a stop: the next start lists them instead of leaving them to the
        verify walk)."""
        if self.cache is not None and self._forgotten:
            self.cache.write(((d, None) for d in sorted(self._forgotten)), ())
            self._unkept |= self._forgotten
            self._forgotten.clear()

    def _write_changes(
        self, kept: dict[str, tuple[int, tuple[str, ...]]], unkept: set[str]
    ) -> None:
        assert self.cache is not None
        upserts: list[tuple[str, int | None]] = []
        for path, entry in kept.items():
            old = self._seen.get(path)
            if old is not entry and (old is None or old[0] != entry[0]):
                upserts.append((path, entry[0]))
        upserts.extend((path, None) for path in unkept if path not in self._unkept)
        before = self._seen.keys() | self._unkept | self._forgotten
        gone = before - kept.keys() - unkept
        if upserts or gone:
            self.cache.write(sorted(upserts), sorted(gone))


def scan_tree(
    folder: Path,
    *,
    recursive: bool = True,
    dirs: DirMtimes | None = None,
    listdir: Callable[[Path], list[os.DirEntry[str]]] = list_sorted,
) -> Iterator[FileSeen]:
    """Yield the crops and metadata files under ``folder`` with their size and mtime.

    A reconciliation walk: symlinks are never followed (neither to files nor to
    directories, so nothing outside the tree is read), hidden/temporary names and
    directories named like images are skipped, and entries sorted by name within
    each directory. A sub-directory that cannot be listed, or an entry that
    vanishes or cannot be stat'ed mid-walk, is logged (``scan_error``) and skipped.
    An unreadable ``folder`` itself raises its `OSError` on the first ``next()``
    (e.g. `FileNotFoundError`), so that the caller can tell an unavailable root
    from an empty one. Use `kind` to tell crops from metadata.

    With ``dirs`` (after its ``begin``), a directory whose mtime is unchanged
    since the walk ``dirs`` last saw is not listed (its sub-directories are
    still visited), and a walk run to its end updates ``dirs``. ``listdir``
    lists one directory (a seam for tests).
    """
    root = Path(folder)
    stack: list[Path] = [root]
    while stack:
        directory = stack.pop()
        try:
            kept, mtime_ns, stat_at = _stat_dir(directory, dirs, root=directory is root)
            entries = [] if kept is not None else listdir(directory)
        except OSError as exc:
            if directory is root:
                raise  # unreachable is not the same as empty
            log.warning("scan_error", path=str(directory), reason=os_reason(exc))
            if dirs is not None:
                dirs.not_listed(directory)
            continue
        if kept is None:
            subdirs: list[Path] = []
            complete = True
            for entry in entries:
                seen, ok = _scan_entry(entry, recursive, subdirs)
                complete = complete and ok
                if seen is not None:
                    yield seen
            kept = tuple(d.name for d in subdirs)
            if dirs is not None:
                dirs.listed_now(directory, mtime_ns, stat_at, list(kept), complete)
        # Reversed so that the stack pops sub-directories in name order.
        stack.extend(directory / name for name in reversed(kept))
    if dirs is not None:
        dirs.end()


def _stat_dir(
    directory: Path, dirs: DirMtimes | None, *, root: bool
) -> tuple[tuple[str, ...] | None, int, int]:
    """With ``dirs``, stat ``directory`` before it is listed: (its kept sub-directory
    names when unchanged, else None; its mtime in ns; when it was stat'ed, wall
    clock ns). Without ``dirs`` nothing is stat'ed: (None, 0, 0). Raises `OSError`."""
    if dirs is None:
        return None, 0, 0
    at = dirs.clock_ns()
    st = os.stat(directory) if root else os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        if not root:  # replaced since it was listed (a symlink is never followed)
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(directory))
        return None, 0, 0  # the listing fails and says why
    return dirs.subdirs_if_unchanged(directory, st.st_mtime_ns), st.st_mtime_ns, at


def _scan_entry(
    entry: os.DirEntry[str], recursive: bool, subdirs: list[Path]
) -> tuple[FileSeen | None, bool]:
    """The entry as a `FileSeen` if it is a wanted regular file (queueing sub-dirs),
    and False when it could not be read (logged)."""
    name = entry.name
    if is_ignored_name(name):
        return None, True
    try:
        if entry.is_symlink():
            return None, True
        if entry.is_dir(follow_symlinks=False):
            if recursive and not skip_dir_name(name):
                subdirs.append(Path(entry.path))
            return None, True
        if kind(name) is None:
            return None, True
        st = entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        return None, True  # vanished between listing and stat: nothing to report
    except OSError as exc:
        log.warning("scan_error", path=entry.path, reason=os_reason(exc))
        return None, False
    if not stat.S_ISREG(st.st_mode):
        return None, True  # fifo, socket, device: never read
    return FileSeen(Path(entry.path), st.st_size, st.st_mtime_ns, st.st_ino), True


def os_reason(exc: BaseException) -> str:
    """A short, stable description of an exception for log fields."""
    if isinstance(exc, OSError) and exc.errno is not None:
        code = errno.errorcode.get(exc.errno, str(exc.errno))
        return f"{code}: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


class VerifyWalk:
    """The walk after a start that stats every file of the tree, a slice at a time.

    The first scan after a restart lists only the directories whose mtime
    changed since the stored walk (`DirMtimes.restore`); a file rewritten in
    place while the daemon was stopped changes no directory's mtime, and one
    rewritten between that scan and its directory's watch sends no event. This
    walk, begun once the watches are set, stats every file (and the caller
    compares each with the state, a batch at a time), so neither goes unseen.
    ``files`` and ``new_files`` count what it yielded and what of it the caller
    took as new or changed; ``started_at`` is in ``clock`` seconds.
    """

    def __init__(
        self, root: Path, *, recursive: bool, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.root = Path(root)
        self._files = scan_tree(self.root, recursive=recursive)
        self._clock = clock
        self.started_at = clock()
        self.files = 0
        self.new_files = 0
        self.done = False

    def step(self, offer: Callable[[list[FileSeen]], int], limit: int) -> bool:
        """Hand up to ``limit`` more files to ``offer`` (which returns how many it
        took as new or changed); whether the walk is over now (``verify_walk_done``
        logged, or ``verify_walk_failed`` when the root could not be read)."""
        batch: list[FileSeen] = []
        try:
            for seen in self._files:
                batch.append(seen)
                if len(batch) == limit:
                    break
            else:
                self.done = True
        except OSError as exc:
            # The root went away: an observer restart's full rescan follows its return.
            log.warning("verify_walk_failed", folder=str(self.root), reason=os_reason(exc))
            self.done = True
            return True
        self.files += len(batch)
        self.new_files += offer(batch)
        if self.done:
            log.info(
                "verify_walk_done",
                files=self.files,
                new_files=self.new_files,
                seconds=round(self._clock() - self.started_at, 3),
            )
        return self.done
