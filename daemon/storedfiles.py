"""The committed files as the intake looks them up: its own read-only connection.

The intake's :class:`~crop_clusterd.identity.Registry` holds in memory only what
is in flight; every file committed before (this run or any earlier one) is
looked up here, by path, by content hash, by inode and stat, and, for rows of a
schema 1 state that have neither inode nor hash, by size and mtime. Each lookup
is one indexed query (the indexes are in :mod:`.storeschema`), so its cost does
not grow with the season, and start-up loads nothing.

SQLite in WAL mode lets this connection read while the link stage writes; each
query sees the latest committed state. Queries fetch all their rows at once, so
no read transaction stays open (an open one would hold back WAL checkpoints).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .identity import Entry, EntryKind, Fingerprint
from .store import StateStore

__all__ = ["StoredFiles"]

_COLUMNS = "path, size, mtime_ns, inode, content"

# `retired = 0` and `content IS NULL` are spelled as the partial indexes' WHERE
# clauses are, so that SQLite uses them (see storeschema.INDEXES).
_AT = (
    f"SELECT 'skip', {_COLUMNS} FROM skipped WHERE path = ? "
    f"UNION ALL SELECT 'crop', {_COLUMNS} FROM crops WHERE path = ? AND retired = 0 "
    "ORDER BY 1 DESC"
)
_BY_FINGERPRINT = (
    f"SELECT 'crop', {_COLUMNS} FROM crops "
    "WHERE inode = ? AND size = ? AND mtime_ns = ? AND retired = 0 "
    f"UNION ALL SELECT 'skip', {_COLUMNS} FROM skipped "
    "WHERE inode = ? AND size = ? AND mtime_ns = ?"
)
# One seek per session into crops_session_content (see storeschema.INDEXES for why).
_BY_CONTENT = (
    f"SELECT 'crop', {_COLUMNS} FROM crops "
    "WHERE session IN (SELECT id FROM sessions) AND content = ? AND retired = 0 "
    f"UNION ALL SELECT 'skip', {_COLUMNS} FROM skipped WHERE content = ?"
)
_BY_STAT = (
    f"SELECT 'crop', {_COLUMNS} FROM crops WHERE size = ? AND mtime_ns = ? "
    "AND retired = 0 AND content IS NULL AND coalesce(inode, 0) = 0 "
    f"UNION ALL SELECT 'skip', {_COLUMNS} FROM skipped WHERE size = ? AND mtime_ns = ? "
    "AND content IS NULL AND coalesce(inode, 0) = 0"
)
_BY_INODE = (
    f"SELECT 'crop', {_COLUMNS} FROM crops WHERE inode = ? AND retired = 0 "
    "AND size IS NOT NULL AND mtime_ns IS NOT NULL "
    f"UNION ALL SELECT 'skip', {_COLUMNS} FROM skipped WHERE inode = ? "
    "AND size IS NOT NULL AND mtime_ns IS NOT NULL"
)

Row = tuple[str, str, int | None, int | None, int | None, str | None]

# Paths per query of files_at (twice as many parameters; SQLite allows 32766).
_CHUNK = 500


class StoredFiles(StateStore):
    """A read-only connection to the state database in ``folder`` answering
    :class:`~crop_clusterd.identity.FileLookup` (live crops and skips).

    Raises :class:`~crop_clusterd.store.StateError` when there is no database
    (the link stage's writer creates it first) and ``sqlite3.Error`` from a
    failed query.
    """

    def __init__(self, folder: Path, *, timeout_s: float = 30.0) -> None:
        super().__init__(folder, readonly=True, timeout_s=timeout_s)

    def file_at(self, path: str) -> Entry | None:
        """The committed file at ``path``, or None (a skip row first, as the old
        in-memory registry let a skip replace a crop of the same path)."""
        rows = self._rows(_AT, (path, path))
        return _entry(rows[0]) if rows else None

    def files_at(self, paths: Sequence[str]) -> dict[str, Entry]:
        """The committed files at ``paths`` (a skip row over a crop row, as in
        :meth:`file_at`); paths without one are left out."""
        found: dict[str, Entry] = {}
        for start in range(0, len(paths), _CHUNK):
            chunk = list(paths[start : start + _CHUNK])
            rows = self._rows(_at_many(len(chunk)), (*chunk, *chunk))
            found.update((row[1], _entry(row)) for row in rows)
        return found

    def files_like(self, fingerprint: Fingerprint, content: str | None) -> dict[str, Entry]:
        """See :meth:`crop_clusterd.identity.FileLookup.files_like`."""
        size, mtime = fingerprint.size, fingerprint.mtime_ns
        rows: list[Row] = []
        if fingerprint.inode:
            fp = (fingerprint.inode, size, mtime)
            rows += self._rows(_BY_FINGERPRINT, fp + fp)
        if content is not None:
            rows += self._rows(_BY_CONTENT, (content, content))
        rows += self._rows(_BY_STAT, (size, mtime, size, mtime))
        return {row[1]: _entry(row) for row in rows}

    def files_with_inode(self, inode: int) -> dict[str, Entry]:
        """See :meth:`crop_clusterd.identity.FileLookup.files_with_inode`."""
        return {row[1]: _entry(row) for row in self._rows(_BY_INODE, (inode, inode))}

    def query_plans(self) -> dict[str, list[str]]:
        """Each lookup's query plan (SQLite's EXPLAIN QUERY PLAN details), for tests."""
        queries = {
            "at": (_AT, 2),
            "at_many": (_at_many(2), 4),
            "fingerprint": (_BY_FINGERPRINT, 6),
            "content": (_BY_CONTENT, 2),
            "stat": (_BY_STAT, 4),
            "inode": (_BY_INODE, 2),
        }
        return {
            name: [str(r[3]) for r in self._db.execute(f"EXPLAIN QUERY PLAN {sql}", (1,) * n)]
            for name, (sql, n) in queries.items()
        }

    def _rows(self, sql: str, args: tuple[object, ...]) -> list[Row]:
        return self._db.execute(sql, args).fetchall()


def _at_many(n: int) -> str:
    """The query of :meth:`StoredFiles.files_at` for ``n`` paths (crop rows, then skip rows)."""
    marks = ",".join("?" * n)
    return (
        f"SELECT 'crop', {_COLUMNS} FROM crops WHERE path IN ({marks}) AND retired = 0 "
        f"UNION ALL SELECT 'skip', {_COLUMNS} FROM skipped WHERE path IN ({marks})"
    )


def _entry(row: Row) -> Entry:
    """An entry of a row of the queries above: (kind, path, size, mtime_ns, inode, content)."""
    kind: EntryKind = "skip" if row[0] == "skip" else "crop"
    _, _, size, mtime_ns, inode, content = row
    fingerprint = (
        None
        if size is None or mtime_ns is None
        else Fingerprint(int(size), int(mtime_ns), int(inode or 0))
    )
    return Entry(kind, fingerprint, content)
