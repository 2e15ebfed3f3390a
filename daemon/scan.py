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
import math
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .flatbug import parse_metadata_name
from .inputs import is_ignored_name, is_image_name
from .log import get_logger
from .scancache import NEVER_NS, Row, ScanCache, children_of

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

_ALL = -(2**63)  # a cut-off no mtime is older than: nothing frozen


def list_sorted(directory: Path) -> list[os.DirEntry[str]]:
    """A directory's entries in name order (``os.scandir``; raises its `OSError`)."""
    with os.scandir(directory) as it:
        return sorted(it, key=lambda e: e.name)


class _Dir:
    """What a walk saw of one directory (see `DirMtimes`)."""

    __slots__ = ("mtime_ns", "newest_ns", "stored", "subdirs")

    def __init__(
        self,
        mtime_ns: int | None,
        subdirs: tuple[str, ...] | None,
        newest_ns: int = NEVER_NS,
        stored: Row | None = None,
    ) -> None:
        self.mtime_ns = mtime_ns  # None: not trusted, listed at the next visit
        self.subdirs = subdirs  # None: not read from the cache yet (a frozen folder)
        self.newest_ns = newest_ns  # of the subtree; NEVER_NS: never frozen
        self.stored = stored  # the cache's row, when there is one

    def row(self) -> Row:
        return (self.mtime_ns, self.newest_ns)


class DirMtimes:
    """Each directory's mtime (ns), sub-directory names and subtree's newest mtime
    as the walks saw them; which directories a routine walk lists, and which it skips.

    An entry added, removed or renamed in a directory changes its mtime, so a
    rescan need not list a directory whose mtime is unchanged: nothing new can
    be in it (its sub-directories are still visited, from the names kept
    here). A file rewritten in place leaves its directory's mtime alone; the
    observer's events report it, and a full scan (``begin(full=True)``: after
    lost events) or the intake's verify walk (after a start) reads every
    directory. ``clock_ns`` is the wall clock the directories' mtimes are
    compared with (see :data:`RACY_S`).

    **Frozen directories.** A trusted directory's ``newest`` is the newest mtime
    in its subtree (its own and its sub-directories' ``newest``; `NEVER_NS` when
    a directory in it is not trusted). With ``freeze_after_s``, a directory
    whose ``newest`` is older than that is frozen: a routine walk (not ``full``)
    neither stats nor enters it, so its cost follows the directories still
    changing (tonight's), not the season's. Nothing is lost by skipping one: a
    file added, removed or renamed in a frozen subtree while the daemon runs
    sends the observer's events (the intake routes them and `thaw` makes the
    next walk visit that directory and its ancestors again); what changed while
    it was stopped, or while events were lost, is found by the full walk after
    lost events and by the verify walk after each start, which stats every file
    of the tree whatever this class says. The root is always visited.

    With a ``cache`` (:class:`~crop_clusterd.scancache.ScanCache`) what a walk
    saw survives restarts: `restore` reads it (once), and every walk run to its
    end writes the directories whose row changed (new, gone, another mtime or
    ``newest``: a few ancestors' rows a walk), so the writes follow the changes,
    not the size of the tree. Memory then holds the directories a routine walk
    visits plus the frozen ones just below them: `restore` reads no more, and a
    walk drops a frozen directory's sub-directories (read back from the cache
    when `thaw` or a full walk needs them). Without a cache every directory is
    held: one entry each, none per file.

    Used by one thread: :func:`scan_tree` calls :meth:`begin` ... :meth:`end`
    around one walk; ``listed``, ``unchanged`` and ``frozen`` count that walk's
    directories (``frozen``: the frozen ones it did not enter).
    """

    def __init__(
        self,
        *,
        margin_s: float = RACY_S,
        freeze_after_s: float | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
        cache: ScanCache | None = None,
    ) -> None:
        self.margin_ns = int(margin_s * 1e9)
        # None: nothing freezes (an infinite setting says the same).
        self.freeze_ns: int | None = None
        if freeze_after_s is not None and math.isfinite(freeze_after_s):
            self.freeze_ns = int(freeze_after_s * 1e9)
        self.clock_ns = clock_ns
        self.cache = cache
        self._restored: bool | None = None if cache is not None else False
        self._seen: dict[str, _Dir] = {}
        # One walk's visits, in pre-order: path -> (mtime, sub-dirs, listed).
        self._walk: dict[str, tuple[int | None, tuple[str, ...], bool]] | None = None
        self._dirty: set[str] = set()  # changed outside a walk (forget, thaw)
        self._full = True
        self._cutoff = _ALL  # a walk enters a sub-directory whose newest is not older
        self._frozen_cut = _ALL  # memory drops what is below one whose newest is older
        self.listed = self.unchanged = self.frozen = 0

    def __len__(self) -> int:
        """Directories held in memory."""
        return len(self._seen)

    def __contains__(self, directory: object) -> bool:
        """Whether ``directory`` (a path) is held as trusted (unchanged-able)."""
        entry = self._seen.get(str(directory))
        return entry is not None and entry.mtime_ns is not None

    def restore(self) -> bool:
        """Read the cache the first time (later calls answer again); whether it held
        a previous walk, so that the next walk need not list every directory."""
        if self._restored is None:
            assert self.cache is not None
            cutoff = self._frozen_before()
            rows = self.cache.load(cutoff)
            children = children_of(rows)
            for path, (mtime, newest) in rows.items():
                known = path == self.cache.root or cutoff is None or newest >= cutoff
                subdirs = tuple(children.get(path, ())) if known else None
                self._seen[path] = _Dir(mtime, subdirs, newest, (mtime, newest))
            self._restored = bool(rows)
        return self._restored

    def begin(self, *, full: bool) -> None:
        """Start a walk; ``full``: list and enter every directory, whatever the last walk saw."""
        self._walk = {}
        self._full = full
        cutoff = self._frozen_before()
        self._frozen_cut = _ALL if cutoff is None else cutoff
        self._cutoff = _ALL if full else self._frozen_cut
        self.listed = self.unchanged = self.frozen = 0

    def subdirs_if_unchanged(self, directory: Path, mtime_ns: int) -> tuple[str, ...] | None:
        """The sub-directory names of a directory unchanged since the last walk, or None."""
        if self._full or self._walk is None:
            return None
        entry = self._seen.get(str(directory))
        if entry is None or entry.mtime_ns != mtime_ns:
            return None
        subdirs = self._subdirs(str(directory), entry)
        if subdirs is None:
            return None  # the cache cannot say: list it
        self.unchanged += 1
        self._walk[str(directory)] = (mtime_ns, subdirs, False)
        return subdirs

    def listed_now(
        self, directory: Path, mtime_ns: int, stat_at_ns: int, subdirs: list[str], complete: bool
    ) -> None:
        """A directory was listed: keep its mtime (stat'ed before the listing, at
        ``stat_at_ns``) if it was old enough and every entry could be read."""
        self.listed += 1
        if self._walk is None:
            return
        trusted = complete and mtime_ns <= stat_at_ns - self.margin_ns
        self._walk[str(directory)] = (mtime_ns if trusted else None, tuple(subdirs), True)

    def not_listed(self, directory: Path) -> None:
        """A directory could not be stat'ed or listed: visit it again next walk."""
        if self._walk is not None:
            self._walk[str(directory)] = (None, (), False)

    def to_visit(self, directory: Path, subdirs: tuple[str, ...]) -> tuple[str, ...]:
        """Which of a visited directory's sub-directories the walk enters: all but
        the frozen ones (all in a full walk)."""
        parent = str(directory)
        visit = tuple(
            name
            for name in subdirs
            if (e := self._seen.get(os.path.join(parent, name))) is None
            or e.newest_ns >= self._cutoff
        )
        self.frozen += len(subdirs) - len(visit)
        return visit

    def end(self) -> None:
        """The walk finished: what it saw replaces what the last ones saw of the
        directories it visited; sub-directories gone from a listed one go."""
        if self._walk is None:
            return
        visited, self._walk = self._walk, None
        gone = self._apply(visited)
        for path in reversed(visited):  # sub-directories before their parent
            self._seen[path].newest_ns = self._newest(path, self._seen[path])
        if self.cache is not None:
            self._write_changes(visited.keys() | self._dirty, gone)
            if self.cache.enabled:
                self._drop_frozen_below(visited)
        self._dirty.clear()

    def forget(self, directory: Path) -> None:
        """List ``directory`` at the next walk (a file in it could not be read)."""
        self.thaw(directory)
        entry = self._seen.get(str(directory))
        if entry is not None and entry.mtime_ns is not None:
            entry.mtime_ns = None
            self._dirty.add(str(directory))

    def thaw(self, directory: Path) -> None:
        """Visit ``directory`` and its ancestors at the next walk, frozen or not
        (an event came from it). Reads from the cache the rows on its way that
        memory does not hold."""
        path, below = str(directory), []
        while path not in self._seen:
            parent = os.path.dirname(path)
            if parent == path:
                return  # not in a tree walked so far: a new directory is listed anyway
            below.append(path)
            path = parent
        for child in reversed(below):  # from the highest held one down
            if self._subdirs(path, self._seen[path]) is None or child not in self._seen:
                break  # not stored: its parent's listing finds it
            path = child
        while (entry := self._seen.get(path)) is not None and entry.newest_ns != NEVER_NS:
            entry.newest_ns = NEVER_NS  # its ancestors are then NEVER_NS too: stop there
            self._dirty.add(path)
            path = os.path.dirname(path)

    def flush_forgotten(self) -> None:
        """Store the directories forgotten and thawed since the last walk (before a
        stop: the next start lists them instead of leaving them to the verify walk)."""
        if self.cache is not None and self._dirty:
            self._write_changes(self._dirty, set())
            self._dirty.clear()

    def _frozen_before(self) -> int | None:
        """The wall clock ns before which a subtree's newest mtime means frozen."""
        return None if self.freeze_ns is None else self.clock_ns() - self.freeze_ns

    def _subdirs(self, path: str, entry: _Dir) -> tuple[str, ...] | None:
        """A held directory's sub-directory names, read from the cache when memory
        dropped them; None when the cache cannot say."""
        if entry.subdirs is None and self.cache is not None:
            rows = self.cache.children(path)
            if rows is None:
                return None
            for child, (mtime, newest) in rows.items():
                self._seen.setdefault(child, _Dir(mtime, None, newest, (mtime, newest)))
            entry.subdirs = tuple(sorted(os.path.basename(c) for c in rows))
        return entry.subdirs

    def _apply(self, visited: dict[str, tuple[int | None, tuple[str, ...], bool]]) -> set[str]:
        """Put one walk's visits into memory; the directories gone (each with its subtree)."""
        gone: set[str] = set()
        for path, (mtime, subdirs, listed) in visited.items():
            entry = self._seen.get(path)
            if entry is None:
                self._seen[path] = _Dir(mtime, subdirs)
                continue
            if listed:
                before = self._subdirs(path, entry) or ()
                for name in set(before) - set(subdirs):
                    gone.add(os.path.join(path, name))
                    self._drop(os.path.join(path, name), keep=False)
            entry.mtime_ns = mtime
            if listed or mtime is not None:
                entry.subdirs = subdirs
        return gone

    def _newest(self, path: str, entry: _Dir) -> int:
        if entry.mtime_ns is None or entry.subdirs is None:
            return NEVER_NS
        newest = entry.mtime_ns
        for name in entry.subdirs:
            child = self._seen.get(os.path.join(path, name))
            if child is None:
                return NEVER_NS
            newest = max(newest, child.newest_ns)
        return newest

    def _drop(self, path: str, *, keep: bool) -> None:
        """Forget what memory holds below ``path`` (and ``path`` itself unless ``keep``)."""
        entry = self._seen.get(path) if keep else self._seen.pop(path, None)
        if entry is None or entry.subdirs is None:
            return
        for name in entry.subdirs:
            self._drop(os.path.join(path, name), keep=False)
        if keep:
            entry.subdirs = None

    def _drop_frozen_below(self, visited: Iterable[str]) -> None:
        """Memory keeps the frozen sub-directories of the visited ones, not what is
        below them: the cache holds that (written just before)."""
        for path in visited:
            entry = self._seen.get(path)
            for name in entry.subdirs or () if entry is not None else ():
                child_path = os.path.join(path, name)
                child = self._seen.get(child_path)
                if child is not None and child.subdirs and child.newest_ns < self._frozen_cut:
                    self._drop(child_path, keep=True)

    def _write_changes(self, paths: Iterable[str], gone: set[str]) -> None:
        assert self.cache is not None
        upserts: list[tuple[str, Row]] = []
        for path in paths:
            entry = self._seen.get(path)
            if entry is not None and entry.row() != entry.stored:
                upserts.append((path, entry.row()))
                entry.stored = entry.row()
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
    still visited, but for frozen ones: see `DirMtimes`), and a walk run to its
    end updates ``dirs``. ``listdir`` lists one directory (a seam for tests).
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
        if dirs is not None:
            kept = dirs.to_visit(directory, kept)
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
    Nor does anything that changed while stopped inside a frozen folder, which
    the first scan does not enter at all (`DirMtimes`): this walk ignores what
    `DirMtimes` says and enters every folder.
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
