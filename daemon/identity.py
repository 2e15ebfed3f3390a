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

:class:`Registry` is the intake's in-memory view of this; the state database
(:mod:`.store`) holds the same columns, so the view is rebuilt at every start.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, TypeVar

__all__ = ["Entry", "EntryKind", "Fingerprint", "Registry", "content_hash"]

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


class Registry:
    """Path -> :class:`Entry`, with a reverse index to find the old path of a moved file.

    Only the intake thread uses it (no locking). Lookups by content and by
    fingerprint cover ``crop`` and ``skip`` entries, the ones the state
    database holds rows for.
    """

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        self._by_content: dict[str, set[str]] = {}
        self._by_fingerprint: dict[Fingerprint, set[str]] = {}
        # Rows of a schema 1 state: no inode, no hash; size and mtime in ns must do.
        self._by_stat: dict[tuple[int, int], set[str]] = {}
        self._by_inode: dict[int, set[str]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, path: object) -> bool:
        return path in self._entries

    def get(self, path: str) -> Entry | None:
        """The entry for ``path``, or None when the path is unknown."""
        return self._entries.get(path)

    def set(
        self, path: str, kind: EntryKind, fingerprint: Fingerprint | None, content: str | None
    ) -> None:
        """Record (or replace) what is known of ``path``."""
        self.forget(path)
        self._entries[path] = Entry(kind, fingerprint, content)
        if kind != "pending":
            self._index(path, fingerprint, content)

    def mark(self, path: str, kind: EntryKind) -> None:
        """Change the kind of a known path (e.g. ``pending`` -> ``crop``)."""
        entry = self._entries.get(path)
        if entry is not None:
            self.set(path, kind, entry.fingerprint, entry.content)

    def forget(self, path: str) -> None:
        """Drop ``path`` (a no-op when unknown)."""
        entry = self._entries.pop(path, None)
        if entry is None:
            return
        _unindex(self._by_content, entry.content, path)
        _unindex(self._by_fingerprint, entry.fingerprint, path)
        if entry.fingerprint is not None:
            _unindex(self._by_inode, entry.fingerprint.inode, path)
            _unindex(self._by_stat, (entry.fingerprint.size, entry.fingerprint.mtime_ns), path)

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
        for path in sorted(candidates):
            entry = self._entries[path]
            if entry.fingerprint is not None and entry.fingerprint.size != fingerprint.size:
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
        for path in sorted(self._by_inode.get(inode, ())) if inode else ():
            if not os.path.lexists(path):
                return path
        return None

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


def registry_from(
    rows: Iterable[tuple[str, EntryKind, Fingerprint | None, str | None]],
) -> Registry:
    """A registry holding ``(path, kind, fingerprint, content)`` rows (from the state database)."""
    registry = Registry()
    for path, kind, fingerprint, content in rows:
        registry.set(path, kind, fingerprint, content)
    return registry
