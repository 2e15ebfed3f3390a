"""The scan's folder mtimes kept across restarts: ``scan-cache.sqlite`` in the state folder.

A derived cache, safe to delete. It holds one row per folder a walk of the
watched tree visited: its path, its parent's path, its mtime in ns when the
walk trusted it as unchanged (see :class:`~crop_clusterd.scan.DirMtimes`), else
NULL ("list it"), and the newest mtime of its subtree (:data:`NEVER_NS` when a
folder in it is not trusted). Nothing is stored per file and a row changes only
when its folder or its subtree's newest mtime does: each walk writes the rows
that changed, in one transaction, never the whole table. Both the parent and
the newest mtime are indexed, so that a start reads only the folders still
changing (and their sub-folders), however many the season holds, and a frozen
folder's sub-folders are read when a walk needs them (`children`).

Why stale or lost rows never cost a crop: a row with an mtime is written only
after a walk listed that folder completely and offered every file in it, so a
restart that finds the same mtime has already offered those files once. Files
offered but not committed by then (a crash, a stop mid-settle) and files
rewritten in place while the daemon was stopped (which change no folder's
mtime) are found by the verify walk after each start (:mod:`.intake`). A
missing, unreadable or foreign cache (another watched folder, another schema)
is started afresh: one full walk.
"""

from __future__ import annotations

import os
import sqlite3
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from .log import get_logger

__all__ = ["NEVER_NS", "SCAN_CACHE_NAME", "Row", "ScanCache", "children_of"]

log = get_logger(__name__)

SCAN_CACHE_NAME = "scan-cache.sqlite"
# 2: the parent and the subtree's newest mtime (frozen folders); 1 had the mtime only.
_VERSION = "2"

# The newest mtime of a subtree that holds a folder not trusted: it never freezes.
NEVER_NS = 2**63 - 1

Row = tuple[int | None, int]
"""A folder's mtime in ns (None: to be listed) and its subtree's newest mtime in ns."""

_COLUMNS = "path, mtime_ns, newest_ns"


class ScanCache:
    """The persisted rows of one watched tree (``root``, walked ``recursive``ly or not).

    `load` returns the rows a start needs (empty when the file is missing,
    unreadable or for another tree: then it is started afresh), `children` the
    rows below one folder, and `write` applies one walk's changes. A failing
    write (a full disk) logs ``scan_cache_failed``, deletes the file and turns
    the cache off for this run (``enabled``): the next start walks fully. Used
    by one thread at a time.
    """

    def __init__(self, path: Path, *, root: Path, recursive: bool) -> None:
        self.path = Path(path)
        self.root = str(root)
        self._key = {"version": _VERSION, "root": self.root, "recursive": str(recursive)}
        self._db: sqlite3.Connection | None = None
        self.enabled = True
        self._claimed = False

    def load(self, frozen_before_ns: int | None = None) -> dict[str, Row]:
        """The rows the last run wrote; ``{}`` when there are none to trust.

        With ``frozen_before_ns`` (wall clock ns), only the rows a routine walk
        visits or looks at: the root, the folders whose subtree's newest mtime
        is not older than it, and the sub-folders of both (a frozen sub-folder's
        own sub-folders are left in the file: see `children`).
        """
        try:
            db = self._open()
            if not self._claim(db):
                return {}
            if frozen_before_ns is None:
                return _rows(db.execute(f"SELECT {_COLUMNS} FROM dirs"))
            args = {"cut": frozen_before_ns, "root": self.root}
            live = "SELECT path FROM dirs WHERE newest_ns >= :cut OR path = :root"
            rows = _rows(db.execute(f"SELECT {_COLUMNS} FROM dirs WHERE path IN ({live})", args))
            below = db.execute(f"SELECT {_COLUMNS} FROM dirs WHERE parent IN ({live})", args)
            rows.update(_rows(below))
            return rows
        except sqlite3.Error as exc:
            log.warning("scan_cache_unreadable", file=str(self.path), reason=str(exc))
            self._start_afresh()
            return {}

    def children(self, folder: str) -> dict[str, Row] | None:
        """The rows of ``folder``'s sub-folders; None when the cache cannot say
        (turned off, unreadable): the caller lists the folder instead."""
        if not self.enabled:
            return None
        try:
            db = self._open()
            self._claim(db)
            return _rows(db.execute(f"SELECT {_COLUMNS} FROM dirs WHERE parent = ?", (folder,)))
        except sqlite3.Error as exc:
            self._fail(exc)
            return None

    def write(self, upserts: Iterable[tuple[str, Row]], gone: Iterable[str]) -> None:
        """Store changed rows and drop ``gone`` folders with everything below them,
        in one transaction."""
        if not self.enabled:
            return
        try:
            db = self._open()
            self._claim(db)
            with db:
                db.executemany(
                    "INSERT OR REPLACE INTO dirs VALUES (?, ?, ?, ?)",
                    ((p, os.path.dirname(p), m, n) for p, (m, n) in upserts),
                )
                # The subtree by a range of the key: rows never read into memory go too.
                db.executemany(
                    "DELETE FROM dirs WHERE path = ? OR (path >= ? AND path < ?)",
                    ((p, p + os.sep, p + chr(ord(os.sep) + 1)) for p in gone),
                )
        except (sqlite3.Error, OSError) as exc:
            self._fail(exc)

    def close(self) -> None:
        """Close the connection (the file stays)."""
        db, self._db = self._db, None
        if db is not None:
            db.close()

    def _fail(self, exc: BaseException) -> None:
        log.warning(
            "scan_cache_failed",
            file=str(self.path),
            reason=str(exc),
            note="the cache is dropped; the next start walks every folder",
        )
        self.enabled = False
        self.close()
        self._remove()

    def _claim(self, db: sqlite3.Connection) -> bool:
        """Make the file this tree's; whether it was already (else it is emptied)."""
        if self._claimed:
            return True
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        self._claimed = True
        if meta == self._key:
            return True
        if meta:
            log.info("scan_cache_reset", file=str(self.path), reason="another tree or version")
        with db:
            db.execute("DELETE FROM dirs")
            db.execute("DELETE FROM meta")
            db.executemany("INSERT INTO meta VALUES (?, ?)", self._key.items())
        return False

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            # The intake thread writes; it may be built on another one.
            db = sqlite3.connect(self.path, check_same_thread=False)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                # A cache: a lost last transaction costs a listing, never a crop.
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
                _create_dirs(db)
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    def _start_afresh(self) -> None:
        self.close()
        self._remove()
        self._claimed = False
        try:
            self._claim(self._open())
        except sqlite3.Error as exc:
            log.warning("scan_cache_failed", file=str(self.path), reason=str(exc))
            self.enabled = False
            self.close()

    def _remove(self) -> None:
        for suffix in ("", "-wal", "-shm", "-journal"):
            try:
                os.unlink(f"{self.path}{suffix}")
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("scan_cache_failed", file=str(self.path), reason=str(exc))


def _create_dirs(db: sqlite3.Connection) -> None:
    """The table of folders, replacing one of another layout (an older version)."""
    columns = [r[1] for r in db.execute("PRAGMA table_info(dirs)")]
    if columns and columns != ["path", "parent", "mtime_ns", "newest_ns"]:
        db.execute("DROP TABLE dirs")
        db.execute("DELETE FROM meta")  # claimed afresh: one full walk
    db.execute(
        "CREATE TABLE IF NOT EXISTS dirs (path TEXT PRIMARY KEY, parent TEXT NOT NULL,"
        " mtime_ns INTEGER, newest_ns INTEGER NOT NULL) WITHOUT ROWID"
    )
    db.execute("CREATE INDEX IF NOT EXISTS dirs_parent ON dirs (parent)")
    db.execute("CREATE INDEX IF NOT EXISTS dirs_newest ON dirs (newest_ns)")


def _rows(cursor: Iterator[tuple[str, int | None, int]]) -> dict[str, Row]:
    return {path: (mtime, newest) for path, mtime, newest in cursor}


def children_of(rows: Mapping[str, object]) -> dict[str, list[str]]:
    """Each stored folder's sub-folder names (sorted), from the rows' paths."""
    children: defaultdict[str, list[str]] = defaultdict(list)
    for path in rows:
        parent, name = os.path.split(path)
        if parent in rows:
            children[parent].append(name)
    for names in children.values():
        names.sort()
    return dict(children)
