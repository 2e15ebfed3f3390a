"""Durable state of the daemon: one SQLite database (WAL) in the state folder.

Everything needed to resume lives here: the registry of processed files (path,
size, mtime, inode and content hash: a file's identity, see :mod:`.identity`),
each crop's embedding, time, box and cluster at the moment it was
committed, the merges that happened since, and the files that were skipped. The
link stage commits once per micro-batch, in one transaction, so after a crash at
any moment the database holds whole batches only: the batch in flight is simply
found again by the start-up scan and redone.

Cluster ids are never rewritten in old rows. A crop's ``cluster`` column is its
cluster id when its batch was committed; later merges are appended to
``merges``. Replaying the merges in order over the stored ids gives every crop's
current id (:func:`current_clusters`), which is also how the snapshot writer and
``crop-clusterd status`` read them while the daemon runs.

A crop whose file was later rewritten with other pixels is *retired*: its row
stays (sequence numbers stay contiguous, and the ids and merges it took part in
stay valid) but it leaves the outputs, and the new content gets a new row. A
moved crop keeps its row; only the path changes. Either bumps the ``paths``
counter in ``meta`` so that readers caching paths read them afresh.

No pickle is ever read from the state folder: embeddings are raw float32 blobs.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .identity import EntryKind, Fingerprint
from .log import get_logger
from .records import CommittedCrop, DecodeFailure, Merge, Moved

log = get_logger(__name__)

SCHEMA_VERSION = 2
DB_NAME = "state.sqlite3"
INDEX_NAME = "index.hnsw"

# The crops table, written once: the schema creates it, the migration rebuilds it.
_CROPS_TABLE = """
crops (
    seq      INTEGER PRIMARY KEY,
    path     TEXT NOT NULL,
    size     INTEGER,
    mtime_ns INTEGER,
    inode    INTEGER,
    content  TEXT,
    retired  INTEGER NOT NULL DEFAULT 0,
    frame    TEXT,
    crop_index INTEGER,
    time     REAL,
    cx       REAL,
    cy       REAL,
    batch    INTEGER NOT NULL,
    cluster  INTEGER NOT NULL,
    added    REAL NOT NULL,
    vector   BLOB NOT NULL
);
"""

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS {_CROPS_TABLE}CREATE TABLE IF NOT EXISTS merges (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    at           REAL NOT NULL,
    batch        INTEGER NOT NULL,
    from_cluster INTEGER NOT NULL,
    into_cluster INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS skipped (
    path     TEXT PRIMARY KEY,
    reason   TEXT NOT NULL,
    size     INTEGER,
    mtime_ns INTEGER,
    at       REAL NOT NULL,
    inode    INTEGER,
    content  TEXT
);
CREATE TABLE IF NOT EXISTS runtime (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

# Created after the migration: on a version 1 database these columns do not exist yet.
_INDEXES = """
CREATE INDEX IF NOT EXISTS crops_added ON crops(added);
CREATE UNIQUE INDEX IF NOT EXISTS crops_live_path ON crops(path) WHERE retired = 0;
"""

# Version 1 -> 2: crops gain inode, content and retired, and a path is unique only
# among live rows, which needs the table rebuilt (SQLite cannot drop a UNIQUE);
# skipped gains inode and content. Old rows get NULL hashes: a moved old crop is
# then recognised by inode, size and mtime only.
_MIGRATE_1_TO_2 = f"""
ALTER TABLE crops RENAME TO crops_v1;
CREATE TABLE {_CROPS_TABLE}
INSERT INTO crops(seq, path, size, mtime_ns, frame, crop_index, time, cx, cy, batch, cluster,
                  added, vector)
    SELECT seq, path, size, mtime_ns, frame, crop_index, time, cx, cy, batch, cluster,
           added, vector FROM crops_v1;
DROP TABLE crops_v1;
DROP INDEX IF EXISTS crops_added;
ALTER TABLE skipped ADD COLUMN inode INTEGER;
ALTER TABLE skipped ADD COLUMN content TEXT;
UPDATE meta SET value = '2' WHERE key = 'schema';
"""


class StateError(Exception):
    """The state folder cannot be used (locked, corrupt, or built with other settings)."""


@dataclass(frozen=True)
class StoredCrops:
    """Columns of stored crops in sequence order (see :meth:`StateStore.load_crops`)."""

    seqs: npt.NDArray[np.int64]
    paths: tuple[str, ...]
    frames: tuple[str | None, ...]
    crop_indexes: tuple[int | None, ...]
    times: npt.NDArray[np.float64]
    centers: npt.NDArray[np.float64]
    batches: npt.NDArray[np.int64]
    clusters: npt.NDArray[np.int64]
    vectors: npt.NDArray[np.float32]

    def __len__(self) -> int:
        return len(self.seqs)


@dataclass(frozen=True, slots=True)
class StoredMerge:
    """One row of the merges table."""

    id: int
    at: float
    batch: int
    merge: Merge


@dataclass(frozen=True, slots=True)
class StoredSkip:
    """One row of the skipped table."""

    path: str
    reason: str
    at: float


@dataclass(frozen=True, slots=True)
class Counts:
    """Cheap totals for status lines."""

    crops: int
    skipped: int
    merges: int
    batches: int


def current_clusters(
    stored: npt.NDArray[np.int64], merges: Iterable[Merge]
) -> npt.NDArray[np.int64]:
    """Every crop's current cluster id from the ids stored at commit plus the merges.

    ``stored[seq]`` is the crop's cluster when its batch was committed (the
    smallest member's sequence number then, so ``stored[seq] <= seq`` and a
    cluster's id is a member). Each merge re-points a whole cluster at a smaller
    id, so replaying them in order and then following the pointers gives the
    current ids.
    """
    parent = stored.astype(np.int64, copy=True)
    for merge in merges:
        # Both were cluster ids (roots) when the merge happened; `into` may since
        # have been merged further, which the pointer jumping below follows.
        if merge.from_cluster < len(parent):
            parent[merge.from_cluster] = merge.into_cluster
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent = grand


class StateStore:
    """The state database. One writer (the link stage); readers open their own.

    ``readonly=True`` opens an existing database for reading only (the snapshot
    writer, ``crop-clusterd status``); it never creates or migrates anything.
    """

    def __init__(self, folder: Path, *, readonly: bool = False, timeout_s: float = 30.0) -> None:
        self.folder = folder
        self.path = folder / DB_NAME
        self.readonly = readonly
        if readonly:
            if not self.path.exists():
                raise StateError(f"no state database at {self.path}")
            uri = f"file:{self.path}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, timeout=timeout_s, check_same_thread=False)
        else:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StateError(f"cannot create state folder {folder}: {exc}") from exc
            self._db = sqlite3.connect(self.path, timeout=timeout_s, check_same_thread=False)
        self._db.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
        try:
            if not readonly:
                self._db.execute("PRAGMA journal_mode = WAL")
                # FULL: a commit survives power loss, not only a crash (traps lose power).
                self._db.execute("PRAGMA synchronous = FULL")
                self._db.executescript(_SCHEMA)
                self._check_schema()
                self._db.executescript(_INDEXES)
            self._db.execute("SELECT count(*) FROM crops").fetchone()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise StateError(f"state database {self.path} is unusable: {exc}") from exc

    def close(self) -> None:
        """Close the connection (a no-op when already closed)."""
        self._db.close()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_schema(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row is None:
            with self._db:
                self._db.execute(
                    "INSERT INTO meta(key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
                )
        elif row[0] == "1":
            # executescript commits first and runs the script in one transaction of
            # its own, so a crash mid-migration leaves the version 1 database intact.
            self._db.executescript(f"BEGIN;{_MIGRATE_1_TO_2}COMMIT;")
            log.info("state_migrated", path=str(self.path), schema=SCHEMA_VERSION)
        elif row[0] != str(SCHEMA_VERSION):
            raise StateError(
                f"state database {self.path} has schema version {row[0]}, "
                f"this crop-clusterd uses {SCHEMA_VERSION}"
            )

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: every query inside sees the same snapshot."""
        self._db.execute("BEGIN")
        try:
            yield self._db
        finally:
            self._db.execute("COMMIT")

    # -- settings the state was built with -------------------------------------------

    def check_settings(self, settings: Mapping[str, object]) -> None:
        """Record the settings on first use; afterwards refuse different ones.

        Embeddings and cluster ids are only comparable under one model and one
        linking rule, so resuming with another would silently mix two results.
        """
        wanted = json.dumps(dict(settings), sort_keys=True)
        row = self._db.execute("SELECT value FROM meta WHERE key = 'settings'").fetchone()
        if row is None:
            with self._db:
                self._db.execute("INSERT INTO meta(key, value) VALUES ('settings', ?)", (wanted,))
            return
        stored = json.loads(row[0])
        changed = [
            f"{key}: state has {stored.get(key)!r}, config says {value!r}"
            for key, value in sorted(settings.items())
            if stored.get(key) != value
        ]
        if changed:
            raise StateError(
                f"the state in {self.folder} was built with other settings:\n  "
                + "\n  ".join(changed)
                + "\nUse another state folder (state.folder / --state) for the new settings, "
                "or move this one away to start over."
            )

    def get_meta(self, key: str) -> str | None:
        """A value from the meta table, or None."""
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        """Set a value in the meta table (its own transaction)."""
        with self._db:
            self._db.execute(
                "INSERT INTO meta(key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    # -- the writer --------------------------------------------------------------------

    def commit_batch(
        self,
        batch: int,
        crops: Sequence[CommittedCrop],
        merges: Sequence[Merge],
        skipped: Sequence[DecodeFailure],
        *,
        moved: Sequence[Moved] = (),
        now: float | None = None,
    ) -> None:
        """Commit one micro-batch atomically: its crops, its merges, its skips, its moves.

        A path that gets a new crop, a skip or a moved file is vacated first: a
        live crop row there is retired (its file was rewritten) and a skip row
        dropped (a file once bad is now good, or bad again with a new reason).
        A move with ``old == new`` only refreshes the stat of unchanged bytes.
        """
        at = time.time() if now is None else now
        rows = [_crop_row(c, batch, at) for c in crops]
        targets = [c.item.crop.name for c in crops] + [s.name for s in skipped]
        with self._db:
            # Moves first: a moved-and-rewritten row moves, then its new content retires it.
            retired = self._vacate([m.new for m in moved if m.new != m.old])
            for m in moved:
                table, live = ("crops", " AND retired = 0") if m.kind == "crop" else ("skipped", "")
                self._db.execute(
                    f"UPDATE {table} SET path = ?, size = ?, mtime_ns = ?, inode = ?, "
                    f"content = coalesce(?, content) WHERE path = ?{live}",
                    (m.new, m.size, m.mtime_ns, m.inode, m.content, m.old),
                )
            retired += self._vacate(targets)
            self._db.executemany(
                "INSERT INTO crops(seq, path, size, mtime_ns, inode, content, frame, crop_index, "
                "time, cx, cy, batch, cluster, added, vector) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                rows,
            )
            self._db.executemany(
                "INSERT INTO merges(at, batch, from_cluster, into_cluster) VALUES (?,?,?,?)",
                [(at, batch, m.from_cluster, m.into_cluster) for m in merges],
            )
            self._db.executemany(
                "INSERT INTO skipped(path, reason, size, mtime_ns, at, inode, content) "
                "VALUES (?,?,?,?,?,?,?)",
                [(s.name, s.reason, s.size, s.mtime_ns, at, s.inode, s.content) for s in skipped],
            )
            if retired or any(m.old != m.new for m in moved):
                self._db.execute(
                    "INSERT INTO meta(key, value) VALUES ('paths', '1') ON CONFLICT(key) "
                    "DO UPDATE SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT)"
                )

    def _vacate(self, paths: Sequence[str]) -> int:
        """Retire live crop rows and drop skip rows at ``paths``; returns rows retired."""
        retired = 0
        for path in paths:
            retired += self._db.execute(
                "UPDATE crops SET retired = 1 WHERE path = ? AND retired = 0", (path,)
            ).rowcount
            self._db.execute("DELETE FROM skipped WHERE path = ?", (path,))
        return retired

    def set_runtime(self, values: Mapping[str, object]) -> None:
        """Publish the running daemon's figures for ``crop-clusterd status``."""
        with self._db:
            self._db.executemany(
                "INSERT INTO runtime(key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [(k, json.dumps(v)) for k, v in values.items()],
            )

    # -- readers -----------------------------------------------------------------------

    @contextmanager
    def read_transaction(self) -> Iterator[None]:
        """Run the readers called inside in one read transaction: one consistent view.

        For the snapshot writer and ``crop-clusterd status``; do not nest the
        readers that open their own (:meth:`counts`, :meth:`processed_paths`).
        """
        with self._read():
            yield

    def runtime(self) -> dict[str, object]:
        """What the daemon last published with :meth:`set_runtime`."""
        rows = self._db.execute("SELECT key, value FROM runtime").fetchall()
        return {str(k): json.loads(v) for k, v in rows}

    def registry_rows(self) -> list[tuple[str, EntryKind, Fingerprint | None, str | None]]:
        """Every file dealt with: (path, ``"crop"`` or ``"skip"``, fingerprint, content hash).

        Live crops and skips only (retired rows name content that is gone). A
        fingerprint is None when the row has no size or mtime; inode 0 when unknown.
        """
        rows: list[tuple[str, EntryKind, Fingerprint | None, str | None]] = []
        with self._read() as db:
            for kind_, table, where in (
                ("crop", "crops", "WHERE retired = 0"),
                ("skip", "skipped", ""),
            ):
                query = f"SELECT path, size, mtime_ns, inode, content FROM {table} {where}"
                for path, size, mtime_ns, inode, content in db.execute(query):
                    fp = (
                        None
                        if size is None or mtime_ns is None
                        else Fingerprint(int(size), int(mtime_ns), int(inode or 0))
                    )
                    rows.append((str(path), kind_, fp, content))  # type: ignore[arg-type]
        return rows

    def processed_paths(self) -> set[str]:
        """Paths that are done: clustered (live) or recorded as skipped."""
        return {row[0] for row in self.registry_rows()}

    def live_seqs(self, paths: Sequence[str]) -> list[int]:
        """Sequence numbers of the live crops at ``paths`` (the rows a commit would retire)."""
        seqs: list[int] = []
        for start in range(0, len(paths), 500):
            chunk = list(paths[start : start + 500])
            marks = ",".join("?" * len(chunk))
            seqs.extend(
                int(r[0])
                for r in self._db.execute(
                    f"SELECT seq FROM crops WHERE retired = 0 AND path IN ({marks})", chunk
                )
            )
        return seqs

    def retired_seqs(self) -> frozenset[int]:
        """Sequence numbers of retired crops (rewritten since; not in the outputs)."""
        rows = self._db.execute("SELECT seq FROM crops WHERE retired = 1").fetchall()
        return frozenset(int(r[0]) for r in rows)

    def paths_version(self) -> int:
        """How many commits moved or retired crops so far (readers caching paths re-read)."""
        return int(self.get_meta("paths") or 0)

    def counts(self) -> Counts:
        """Totals of live crops, skipped files, merges and committed batches."""
        with self._read() as db:
            crops, batches = db.execute(
                "SELECT count(*) - coalesce(sum(retired), 0), coalesce(max(batch) + 1, 0) "
                "FROM crops"
            ).fetchone()
            (skipped,) = db.execute("SELECT count(*) FROM skipped").fetchone()
            (merges,) = db.execute("SELECT count(*) FROM merges").fetchone()
        return Counts(int(crops), int(skipped), int(merges), int(batches))

    def last_batch(self) -> int:
        """The highest committed batch number, -1 when none."""
        row = self._db.execute(
            "SELECT max(b) FROM (SELECT max(batch) AS b FROM crops "
            "UNION ALL SELECT max(batch) FROM merges)"
        ).fetchone()
        return -1 if row[0] is None else int(row[0])

    def crops_added_since(self, t: float) -> int:
        """How many crops were committed at or after wall-clock time ``t``."""
        (n,) = self._db.execute("SELECT count(*) FROM crops WHERE added >= ?", (t,)).fetchone()
        return int(n)

    def load_crops(self, since_seq: int = 0, *, dim: int | None = None) -> StoredCrops:
        """Stored crops with ``seq >= since_seq`` in sequence order, as columns.

        Rows are streamed into preallocated arrays, so the embeddings are held
        once (not once as blobs and again as an array). ``dim`` sizes the
        vectors of an empty result.
        """
        n, dim_bytes = self._db.execute(
            "SELECT count(*), max(length(vector)) FROM crops WHERE seq >= ?", (since_seq,)
        ).fetchone()
        n = int(n)
        dim = int(dim_bytes) // 4 if dim_bytes else (dim or 0)
        vectors = np.empty((n, dim), dtype=np.float32)
        scalars: list[tuple[Any, ...]] = []
        cursor = self._db.execute(
            "SELECT seq, path, frame, crop_index, time, cx, cy, batch, cluster, vector "
            "FROM crops WHERE seq >= ? ORDER BY seq",
            (since_seq,),
        )
        for i, row in enumerate(cursor):
            blob = row[9]
            if i >= n or len(blob) != 4 * dim:
                raise StateError(
                    f"crop {row[1]!r} (seq {row[0]}) has a {len(blob) // 4}-d embedding, "
                    f"expected {dim}"
                )
            vectors[i] = np.frombuffer(blob, dtype=np.float32)
            scalars.append(row[:9])
        if len(scalars) != n:
            raise StateError(f"state database {self.path} changed while it was read")
        nan = float("nan")
        return StoredCrops(
            seqs=np.array([r[0] for r in scalars], dtype=np.int64),
            paths=tuple(r[1] for r in scalars),
            frames=tuple(r[2] for r in scalars),
            crop_indexes=tuple(r[3] for r in scalars),
            times=np.array([nan if r[4] is None else r[4] for r in scalars], dtype=np.float64),
            centers=np.array(
                [(nan, nan) if r[5] is None else (r[5], r[6]) for r in scalars], dtype=np.float64
            ).reshape(n, 2),
            batches=np.array([r[7] for r in scalars], dtype=np.int64),
            clusters=np.array([r[8] for r in scalars], dtype=np.int64),
            vectors=vectors,
        )

    def load_cluster_column(self) -> npt.NDArray[np.int64]:
        """Every crop's cluster id at commit, indexed by seq (no embeddings read)."""
        rows = self._db.execute("SELECT cluster FROM crops ORDER BY seq").fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64)

    def load_merges(self, since_id: int = 0) -> list[StoredMerge]:
        """Merges with ``id > since_id`` in the order they happened."""
        rows = self._db.execute(
            "SELECT id, at, batch, from_cluster, into_cluster FROM merges WHERE id > ? ORDER BY id",
            (since_id,),
        ).fetchall()
        return [
            StoredMerge(int(r[0]), float(r[1]), int(r[2]), Merge(int(r[3]), int(r[4])))
            for r in rows
        ]

    def load_skipped(self) -> list[StoredSkip]:
        """Every skipped file, in path order."""
        rows = self._db.execute("SELECT path, reason, at FROM skipped ORDER BY path").fetchall()
        return [StoredSkip(str(r[0]), str(r[1]), float(r[2])) for r in rows]


def index_path(folder: Path) -> Path:
    """Where the HNSW index is saved inside a state folder."""
    return folder / INDEX_NAME


def _crop_row(c: CommittedCrop, batch: int, at: float) -> tuple[object, ...]:
    """One crops-table row of a committed crop (see the INSERT in ``commit_batch``)."""
    crop = c.item.crop
    center = crop.center if crop.center is not None else (None, None)
    return (
        c.seq,
        crop.name,
        crop.size,
        crop.mtime_ns,
        crop.inode,
        crop.content,
        crop.frame.name if crop.frame is not None else None,
        crop.crop_index,
        crop.time,
        center[0],
        center[1],
        batch,
        c.cluster,
        at,
        np.ascontiguousarray(c.item.vector, dtype=np.float32).tobytes(),
    )
