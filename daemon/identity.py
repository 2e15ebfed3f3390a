"""A crop file's identity: what tells a new crop from a moved, a rewritten or an unchanged one.

A path alone is not an identity: operators move frame folders after the fact,
``rsync`` replaces a file by renaming a temporary one over it, and a reset
camera clock writes new pixels under old names. So each file the daemon has
dealt with is remembered by its path plus a :class:`Fingerprint` (size in
bytes, mtime in ns, inode number) and a content hash (:func:`content_hash`):

- same path, same fingerprint: unchanged, nothing to do (no file is read);
- same path, other fingerprint, same hash: touched or copied over with the
  same bytes; only the fingerprint is updated;
- same path, other fingerprint, other hash: rewritten. A skipped file is tried
  again; a clustered crop is retired and embedded again (see the README);
- new path whose hash (or inode, size and mtime) belongs to a known file whose
  path no longer exists: moved; the stored row takes the new path and nothing
  is embedded again. If the old path still exists it is a copy: a new crop.

:class:`Registry` is the intake's view of this. Files already committed are
looked up in the state database (:class:`FileLookup`, the intake's own
read-only connection: :class:`crop_clusterd.storedfiles.StoredFiles`); only
what this run has decided but not yet seen committed is held in memory, so its
memory follows the work in flight, not the files of the whole season.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, TypeVar

from .records import Moved

if TYPE_CHECKING:
    from .scan import FileSeen

__all__ = [
    "Entry",
    "EntryKind",
    "FileLookup",
    "Fingerprint",
    "Registry",
    "changed_since",
    "content_hash",
    "touched_paths",
]

# Crops are a few kB to a few MB; read in blocks so a huge file never sits in memory.
_BLOCK = 1 << 20

K = TypeVar("K")

EntryKind = Literal["pending", "crop", "skip"]
"""``pending``: found and on its way (settling, decoding, embedding); ``crop``:
handed to the model (committed unless the daemon stops first); ``skip``: given
up on and recorded in ``errors.csv``."""


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """A file's stat as identity: size in bytes, mtime in ns, inode number (0 if unknown)."""

    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, st: os.stat_result) -> Fingerprint:
        """The fingerprint of a stat result."""
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)

    def matches(self, other: Fingerprint) -> bool:
        """Whether ``other`` may be the same file unchanged: size and mtime equal, and
        the inodes too where both are known (rows of a schema 1 state have none)."""
        if (self.size, self.mtime_ns) != (other.size, other.mtime_ns):
            return False
        return self.inode == 0 or other.inode == 0 or self.inode == other.inode


def content_hash(path: str | os.PathLike[str]) -> str:
    """BLAKE2b-128 of a file's bytes as 32 hex digits; raises `OSError` as `open` does."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


@dataclass(slots=True)
class Entry:
    """What the registry knows of one path. ``content`` is None when not (yet) hashed."""

    kind: EntryKind
    fingerprint: Fingerprint | None
    content: str | None


class FileLookup(Protocol):
    """The committed files (live crops and skips) as the state database holds them.

    Each lookup returns path -> :class:`Entry` (kind ``crop`` or ``skip``) and
    sees the latest committed state; see :class:`crop_clusterd.storedfiles.StoredFiles`.
    """

    def file_at(self, path: str) -> Entry | None:
        """The committed file at ``path``, or None."""

    def files_at(self, paths: Sequence[str]) -> dict[str, Entry]:
        """The committed files at ``paths`` (those that have one), in one go."""

    def files_like(self, fingerprint: Fingerprint, content: str | None) -> dict[str, Entry]:
        """Committed files that may be this one moved: the same size, mtime and
        inode (when ``fingerprint.inode``), the same ``content`` (when given), or
        the same size and mtime for a row with neither inode nor hash (schema 1)."""

    def files_with_inode(self, inode: int) -> dict[str, Entry]:
        """Committed files with a known stat whose inode is ``inode`` (not 0)."""

    def close(self) -> None:
        """Release the lookup's connection."""


class Registry:
    """Path -> :class:`Entry`: the committed files (through ``stored``) overlaid by
    what this run decided since and has not yet seen committed.

    In memory stay only: ``pending`` entries, entries handed on (a crop to the
    model, a skip, a move) until their commit is reported (:meth:`committed`),
    and *vacated* paths, whose stored row moves away with a commit still to
    come (a lookup sees nothing there). A path in memory hides its stored row.
    Without ``stored`` (tests, tools) the registry is memory alone.

    Only the intake thread uses it (no locking). Lookups by content and by
    fingerprint cover ``crop`` and ``skip`` entries, the ones the state
    database holds rows for.
    """

    def __init__(self, stored: FileLookup | None = None) -> None:
        self._stored = stored
        # None: vacated (the stored row is moving away).
        self._entries: dict[str, Entry | None] = {}
        # Path -> how many operations on its stored row were handed on and not yet
        # reported committed; an entry leaves memory once this is back to zero.
        self._owed: dict[str, int] = {}
        self._by_content: dict[str, set[str]] = {}
        self._by_fingerprint: dict[Fingerprint, set[str]] = {}
        # Rows of a schema 1 state: no inode, no hash; size and mtime in ns must do.
        self._by_stat: dict[tuple[int, int], set[str]] = {}
        self._by_inode: dict[int, set[str]] = {}
        # Stored entries looked up ahead for a scan (see prefetch); None: no row.
        self._prefetched: dict[str, Entry | None] = {}

    def __len__(self) -> int:
        """Paths held in memory (entries and vacated paths), not the committed files."""
        return len(self._entries)

    @property
    def owed(self) -> int:
        """Paths with operations handed on whose commit is not reported yet."""
        return len(self._owed)

    def get(self, path: str) -> Entry | None:
        """The entry for ``path``, or None when the path is unknown (or vacated)."""
        if path in self._entries:
            return self._entries[path]
        if path in self._prefetched and path not in self._owed:
            return self._prefetched[path]
        return self._stored.file_at(path) if self._stored is not None else None

    def prefetch(self, paths: Sequence[str]) -> None:
        """Look ``paths`` up in the state database at once for the :meth:`get` calls
        that follow (a scan's files, a few hundred at a time: one query instead of
        one each); replaces the previous prefetch, ``()`` drops it. Commits
        reported meanwhile (:meth:`committed`) drop it too: they changed rows."""
        self._prefetched = {}
        if self._stored is not None and paths:
            found = self._stored.files_at(paths)
            self._prefetched = {path: found.get(path) for path in paths}

    def set(
        self, path: str, kind: EntryKind, fingerprint: Fingerprint | None, content: str | None
    ) -> None:
        """Record (or replace) what is known of ``path``."""
        self._drop(path)
        self._entries[path] = Entry(kind, fingerprint, content)
        if kind != "pending":
            self._index(path, fingerprint, content)

    def mark(self, path: str, kind: EntryKind) -> None:
        """Change the kind of a path held in memory (e.g. ``pending`` -> ``crop``)."""
        entry = self._entries.get(path)
        if entry is not None:
            self.set(path, kind, entry.fingerprint, entry.content)

    def forget(self, path: str) -> None:
        """Drop what this run knows of ``path``: lookups see its committed row again."""
        self._drop(path)

    def vacate(self, path: str) -> None:
        """``path``'s file moved away: until the move is committed (and reported),
        lookups see nothing there, whatever the state database still holds."""
        self._drop(path)
        self._entries[path] = None

    def sent(self, paths: Iterable[str]) -> None:
        """Operations on these paths' stored rows were handed on to be committed
        (see :func:`touched_paths`); each path once per operation."""
        for path in paths:
            self._owed[path] = self._owed.get(path, 0) + 1

    def committed(self, paths: Iterable[str]) -> None:
        """Operations on these paths were committed (as :meth:`sent` counted them).

        A path with nothing more owed leaves memory unless it is ``pending``
        (found again since): the state database now says what memory said.
        """
        self._prefetched = {}
        for path in paths:
            owed = self._owed.get(path)
            if owed is None:
                continue  # forgotten meanwhile (a file that vanished)
            if owed > 1:
                self._owed[path] = owed - 1
                continue
            del self._owed[path]
            if path in self._entries:
                entry = self._entries[path]
                if entry is None or entry.kind != "pending":
                    self._drop(path)

    def moved_from(self, fingerprint: Fingerprint, content: str | None) -> str | None:
        """The known path whose file now lives elsewhere with this identity, or None.

        A candidate matches by inode+size+mtime (a rename) or by content (a
        copy-and-delete, another file system), or, for a row without inode and
        hash (schema 1), by size and mtime; it counts only if nothing exists
        at its path any more, so a copy beside the original is a new crop.
        Of several candidates the first in path order is taken.
        """
        candidates = set(self._by_fingerprint.get(fingerprint, ())) if fingerprint.inode else set()
        if content is not None:
            candidates.update(self._by_content.get(content, ()))
        candidates.update(self._by_stat.get((fingerprint.size, fingerprint.mtime_ns), ()))
        known = {path: self._entries[path] for path in candidates}
        if self._stored is not None:
            known.update(self._unshadowed(self._stored.files_like(fingerprint, content)))
        for path in sorted(known):
            entry = known[path]
            fp = entry.fingerprint if entry is not None else None
            if fp is not None and fp.size != fingerprint.size:
                continue
            if not os.path.lexists(path):
                return path
        return None

    def replaced(self, inode: int) -> str | None:
        """The known path whose file was moved to ``inode``'s new path and rewritten, or None.

        The same inode under a new path, with another size or mtime, and nothing
        left at the old path: the old row names a file that is gone either way
        (moved and changed, or deleted and its inode reused), so it is retired.
        """
        if not inode:
            return None
        paths = set(self._by_inode.get(inode, ()))
        if self._stored is not None:
            paths.update(self._unshadowed(self._stored.files_with_inode(inode)))
        for path in sorted(paths):
            if not os.path.lexists(path):
                return path
        return None

    def close(self) -> None:
        """Close the lookup of committed files (a no-op without one)."""
        if self._stored is not None:
            self._stored.close()

    def _unshadowed(self, stored: dict[str, Entry]) -> dict[str, Entry]:
        """The stored rows whose paths memory does not hold (memory is newer)."""
        return {path: e for path, e in stored.items() if path not in self._entries}

    def _drop(self, path: str) -> None:
        """Remove ``path`` from memory and its indexes (a no-op when not held)."""
        if path not in self._entries:
            return
        entry = self._entries.pop(path)
        if entry is None:
            return
        _unindex(self._by_content, entry.content, path)
        _unindex(self._by_fingerprint, entry.fingerprint, path)
        if entry.fingerprint is not None:
            _unindex(self._by_inode, entry.fingerprint.inode, path)
            _unindex(self._by_stat, (entry.fingerprint.size, entry.fingerprint.mtime_ns), path)

    def _index(self, path: str, fingerprint: Fingerprint | None, content: str | None) -> None:
        if content is not None:
            self._by_content.setdefault(content, set()).add(path)
        if fingerprint is not None and fingerprint.inode:
            self._by_fingerprint.setdefault(fingerprint, set()).add(path)
            self._by_inode.setdefault(fingerprint.inode, set()).add(path)
        elif fingerprint is not None and content is None:
            self._by_stat.setdefault((fingerprint.size, fingerprint.mtime_ns), set()).add(path)


def _unindex(index: dict[K, set[str]], key: K | None, path: str) -> None:
    """Remove ``path`` from ``index[key]``, dropping the key when no path is left."""
    if key is None or key not in index:
        return
    index[key].discard(path)
    if not index[key]:
        del index[key]


def changed_since(entry: Entry | None, seen: FileSeen | None, path: Path) -> bool:
    """Whether a hinted or scanned file is new or changed since it was last dealt
    with (``entry``: what the registry knows of it; ``seen``: a scan's stat of it).

    Files on their way (``pending``) are left alone: their retry reads
    the new bytes. A known file is stat'ed when the hint came without one.
    """
    if entry is None:
        return True
    if entry.kind == "pending":
        return False
    if entry.fingerprint is None:
        return True  # a row whose stat is unknown: look at the file again
    if seen is None:
        try:
            return not entry.fingerprint.matches(Fingerprint.of(os.lstat(path)))
        except OSError:
            return False  # gone or unreadable: nothing to do (deletions are never acted on)
    return not entry.fingerprint.matches(Fingerprint(seen.size, seen.mtime_ns, seen.inode))


def touched_paths(names: Iterable[str], moved: Iterable[Moved]) -> list[str]:
    """The paths whose stored rows a commit changes: each crop's or skip's name
    (``names``), and each move's old and (when another) new path; a path once per
    operation. The intake counts these when it hands them on, the link stage
    reports them once committed (:meth:`Registry.sent`, :meth:`Registry.committed`).
    """
    paths = list(names)
    for m in moved:
        paths.append(m.old)
        if m.new != m.old:
            paths.append(m.new)
    return paths
