"""The scan's folder mtimes kept across restarts: ``scan-cache.sqlite`` in the state folder.

A derived cache, safe to delete. It holds one row per folder the last walk of
the watched tree visited: its path and, when the walk trusted it as unchanged
(see :class:`~crop_clusterd.scan.DirMtimes`), its mtime in ns, else NULL
("list it"). A folder's sub-folders are the rows below it, so nothing is
stored per file and a row changes only when its folder does: each walk writes
the rows that changed, in one transaction, never the whole table.

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
from collections.abc import Iterable, Mapping
from pathlib import Path

from .log import get_logger

__all__ = ["SCAN_CACHE_NAME", "ScanCache"]

log = get_logger(__name__)

SCAN_CACHE_NAME = "scan-cache.sqlite"
_VERSION = "1"

Rows = Mapping[str, int | None]
"""Folder path -> mtime in ns (trusted unchanged) or None (to be listed)."""


class ScanCache:
    """The persisted rows of one watched tree (``root``, walked ``recursive``ly or not).

    `load` returns the rows (empty when the file is missing, unreadable or for
    another tree: then it is started afresh); `write` applies one walk's
    changes. A failing write (a full disk) logs ``scan_cache_failed``, deletes
    the file and turns the cache off for this run: the next start walks fully.
    Used by one thread at a time.
    """

    def __init__(self, path: Path, *, root: Path, recursive: bool) -> None:
        self.path = Path(path)
        self._key = {"version": _VERSION, "root": str(root), "recursive": str(recursive)}
        self._db: sqlite3.Connection | None = None
        self.enabled = True
        self._claimed = False

    def load(self) -> dict[str, int | None]:
        """The rows the last run wrote; ``{}`` when there are none to trust."""
        try:
            db = self._open()
            if not self._claim(db):
                return {}
            return dict(db.execute("SELECT path, mtime_ns FROM dirs").fetchall())
        except sqlite3.Error as exc:
            log.warning("scan_cache_unreadable", file=str(self.path), reason=str(exc))
            self._start_afresh()
            return {}

    def write(self, upserts: Iterable[tuple[str, int | None]], deletes: Iterable[str]) -> None:
        """Store changed rows and drop gone ones, in one transaction."""
        if not self.enabled:
            return
        try:
            db = self._open()
            self._claim(db)
            with db:
                db.executemany("INSERT OR REPLACE INTO dirs VALUES (?, ?)", upserts)
                db.executemany("DELETE FROM dirs WHERE path = ?", ((p,) for p in deletes))
        except (sqlite3.Error, OSError) as exc:
            log.warning(
                "scan_cache_failed",
                file=str(self.path),
                reason=str(exc),
                note="the cache is dropped; the next start walks every folder",
            )
            self.enabled = False
            self.close()
            self._remove()

    def close(self) -> None:
        """Close the connection (the file stays)."""
        db, self._db = self._db, None
        if db is not None:
            db.close()

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
                db.execute(
                    "CREATE TABLE IF NOT EXISTS dirs (path TEXT PRIMARY KEY, mtime_ns INTEGER)"
                    " WITHOUT ROWID"
                )
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


def children_of(rows: Rows) -> dict[str, list[str]]:
    """Each stored folder's sub-folder names (sorted), from the rows' paths."""
    children: defaultdict[str, list[str]] = defaultdict(list)
    for path in rows:
        parent, name = os.path.split(path)
        if parent in rows:
            children[parent].append(name)
    for names in children.values():
        names.sort()
    return dict(children)
