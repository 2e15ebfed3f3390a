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

from .defaults import ALL_SESSION
from .identity import EntryKind, Fingerprint
from .log import get_logger
from .records import CommittedCrop, DecodeFailure, Merge, Moved
from .storeschema import INDEXES, MIGRATIONS, SCHEMA, SCHEMA_VERSION

log = get_logger(__name__)

DB_NAME = "state.sqlite3"
INDEX_NAME = "index.hnsw"


# The tables and their migrations live in storeschema; applied by _check_schema.
class StateError(Exception):
    """The state folder cannot be used (locked, corrupt, or built with other settings)."""


@dataclass(frozen=True)
class StoredCrops:
    """Columns of stored crops in sequence order (see :meth:`StateStore.load_crops`)."""

    seqs: npt.NDArray[np.int64]
    locals: npt.NDArray[np.int64]
    paths: tuple[str, ...]
    frames: tuple[str | None, ...]
    crop_indexes: tuple[int | None, ...]
    times: npt.NDArray[np.float64]
    centers: npt.NDArray[np.float64]
    sizes: npt.NDArray[np.float64]
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
class StoredSession:
    """One row of the sessions table; ``opened`` and ``closed`` are wall-clock seconds.

    ``closed`` is None while the session is open; ``vectors_dropped`` when
    ``state.keep_sessions`` removed its stored embeddings (its outputs stay).
    """

    id: str
    opened: float
    closed: float | None
    vectors_dropped: bool


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
                self._db.executescript(SCHEMA)
                self._check_schema()
                self._db.executescript(INDEXES)
            self._db.execute("SELECT seq FROM crops LIMIT 1").fetchone()  # readable?
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
                self._db.execute("INSERT INTO meta(key, value) VALUES ('schema', '2')")
            version, fresh = "2", True
        else:
            version, fresh = str(row[0]), False
        while version in MIGRATIONS:
            # executescript commits first and runs the script in one transaction of
            # its own, so a crash mid-migration leaves the older database intact.
            self._db.executescript(f"BEGIN;{MIGRATIONS[version]}COMMIT;")
            version = str(int(version) + 1)
            if not fresh:
                log.info("state_migrated", path=str(self.path), schema=version)
        if version != str(SCHEMA_VERSION):
            raise StateError(
                f"state database {self.path} has schema version {version}, "
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
        # A state from before sessions is one session for everything.
        stored.setdefault("session.split", "none")
        changed = [
            f"{key}: state has {stored.get(key)!r}, config says {value!r}"
            for key, value in sorted(settings.items())
            if stored.get(key) != value
        ]
        if changed:
            hint = ""
            if stored.get("session.split") != settings.get("session.split", "none"):
                hint = (
                    f"\nTo keep using this state, set session.split = "
                    f'"{stored["session.split"]}" in the config (or --session-split).'
                )
            raise StateError(
                f"the state in {self.folder} was built with other settings:\n  "
                + "\n  ".join(changed)
                + hint
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
        session: str = ALL_SESSION,
    ) -> None:
        """Commit one micro-batch atomically: its crops, its merges, its skips, its moves.

        Crops, merges and skips belong to ``session``, which is opened (or
        reopened) in the same transaction.

        A path that gets a new crop, a skip or a moved file is vacated first: a
        live crop row there is retired (its file was rewritten) and a skip row
        dropped (a file once bad is now good, or bad again with a new reason).
        A move with ``old == new`` only refreshes the stat of unchanged bytes.
        """
        at = time.time() if now is None else now
        rows = [_crop_row(c, batch, at, session) for c in crops]
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
            if crops or merges or skipped:  # a night of bad files only still has its errors.csv
                self._db.execute(
                    "INSERT INTO sessions(id, opened) VALUES (?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET closed = NULL",
                    (session, at),
                )
            self._db.executemany(
                "INSERT INTO crops(seq, path, size, mtime_ns, inode, content, frame, crop_index, "
                "time, cx, cy, batch, cluster, added, vector, session, local, fw, fh) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                rows,
            )
            self._db.executemany(
                "INSERT INTO merges(at, batch, from_cluster, into_cluster, session) "
                "VALUES (?,?,?,?,?)",
                [(at, batch, m.from_cluster, m.into_cluster, session) for m in merges],
            )
            self._db.executemany(
                "INSERT INTO skipped(path, reason, size, mtime_ns, at, inode, content, session) "
                "VALUES (?,?,?,?,?,?,?,?)",
                [
                    (s.name, s.reason, s.size, s.mtime_ns, at, s.inode, s.content, session)
                    for s in skipped
                ],
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

    def live_crops(self, paths: Sequence[str]) -> list[tuple[str, int]]:
        """(session, local number) of the live crops at ``paths`` (rows a commit would retire)."""
        found: list[tuple[str, int]] = []
        for start in range(0, len(paths), 500):
            chunk = list(paths[start : start + 500])
            marks = ",".join("?" * len(chunk))
            found.extend(
                (str(r[0]), int(r[1]))
                for r in self._db.execute(
                    f"SELECT session, local FROM crops WHERE retired = 0 AND path IN ({marks})",
                    chunk,
                )
            )
        return found

    def retired_seqs(self) -> frozenset[int]:
        """Sequence numbers of retired crops (rewritten since; not in the outputs)."""
        rows = self._db.execute("SELECT seq FROM crops WHERE retired = 1").fetchall()  # indexed
        return frozenset(int(r[0]) for r in rows)

    def retired_locals(self, session: str) -> frozenset[int]:
        """Local numbers of the retired crops of ``session``."""
        rows = self._db.execute(
            "SELECT local FROM crops WHERE retired = 1 AND session = ?", (session,)
        ).fetchall()
        return frozenset(int(r[0]) for r in rows)

    def paths_version(self) -> int:
        """How many commits moved or retired crops so far (readers caching paths re-read)."""
        return int(self.get_meta("paths") or 0)

    def counts(self) -> Counts:
        """Totals of live crops, skipped files, merges and committed batches.

        Reads no crop rows (``status`` must not cost the season): sequence numbers
        are handed out without gaps (link_stage), so live crops are the next one
        less the retired, which a partial index lists; merges are never deleted.
        """
        with self._read() as db:
            (retired,) = db.execute("SELECT count(*) FROM crops WHERE retired = 1").fetchone()
            (merges,) = db.execute("SELECT coalesce(max(id), 0) FROM merges").fetchone()
            skipped = self.skipped_count()
            crops = self.next_seq() - int(retired)
            batches = self.last_batch() + 1
        return Counts(crops, skipped, int(merges), batches)

    def skipped_count(self) -> int:
        """How many files are recorded as skipped (reads no crop rows)."""
        (n,) = self._db.execute("SELECT count(*) FROM skipped").fetchone()
        return int(n)

    def last_batch(self) -> int:
        """The highest committed batch number, -1 when none."""
        # Batch numbers grow with seq and merge id: the last rows hold the highest,
        # found through the primary keys without reading the season's rows.
        row = self._db.execute(
            "SELECT max(b) FROM ("
            "SELECT (SELECT batch FROM crops ORDER BY seq DESC LIMIT 1) AS b "
            "UNION ALL SELECT (SELECT batch FROM merges ORDER BY id DESC LIMIT 1))"
        ).fetchone()
        return -1 if row[0] is None else int(row[0])

    def crops_added_since(self, t: float) -> int:
        """How many crops were committed at or after wall-clock time ``t``."""
        (n,) = self._db.execute("SELECT count(*) FROM crops WHERE added >= ?", (t,)).fetchone()
        return int(n)

    def load_crops(
        self,
        since_seq: int = 0,
        *,
        session: str | None = None,
        dim: int | None = None,
        vectors: bool = True,
    ) -> StoredCrops:
        """Stored crops with ``seq >= since_seq`` in sequence order, as columns.

        ``session``: that session's crops only (None: all). Rows are streamed
        into preallocated arrays, so the embeddings are held once (not once as
        blobs and again as an array). ``dim`` sizes the vectors of an empty
        result. ``vectors=False`` reads no embeddings (``vectors`` is n×0; the
        snapshot writer caching names). Raises :class:`StateError` when the
        session's vectors were dropped (``state.keep_sessions``) and are asked
        for, or a vector has the wrong size.
        """
        where, args = _session_filter("seq >= ?", since_seq, session)
        if vectors and session is not None and self._vectors_dropped(session):
            raise StateError(
                f"the embeddings of session {session} were dropped from {self.path} "
                "(state.keep_sessions); its output folder keeps them"
            )
        blob_column = "vector" if vectors else "X''"
        n, dim_bytes = self._db.execute(
            f"SELECT count(*), max(length({blob_column})) FROM crops WHERE {where}", args
        ).fetchone()
        n = int(n)
        if not vectors:
            dim = 0
        elif dim_bytes:
            dim = int(dim_bytes) // 4
        dim = dim or 0
        matrix = np.empty((n, dim), dtype=np.float32)
        scalars: list[tuple[Any, ...]] = []
        # Within a session local order is seq order; ordering by it walks the
        # (session, local) index, where ORDER BY seq would sort every row, blobs
        # and all, through a temporary file (as many bytes written as read).
        order = "seq" if session is None else "local"
        cursor = self._db.execute(
            "SELECT seq, local, path, frame, crop_index, time, cx, cy, batch, cluster, "
            f"{blob_column}, fw, fh FROM crops WHERE {where} ORDER BY {order}",
            args,
        )
        for i, row in enumerate(cursor):
            blob = row[10]
            if i >= n or len(blob) != 4 * dim:
                raise StateError(
                    f"crop {row[2]!r} (seq {row[0]}) has a {len(blob) // 4}-d embedding, "
                    f"expected {dim}"
                )
            if dim:
                matrix[i] = np.frombuffer(blob, dtype=np.float32)
            scalars.append((*row[:10], None, *row[11:]))  # not the blob
        if len(scalars) != n:
            raise StateError(f"state database {self.path} changed while it was read")
        return _stored_crops(scalars, matrix)

    def load_cluster_column(self, session: str | None = None) -> npt.NDArray[np.int64]:
        """Every crop's cluster id at commit, in seq order (no embeddings read).

        With ``session``, that session's crops, indexed by local number.
        """
        where, args = _session_filter("1", None, session)
        rows = self._db.execute(f"SELECT cluster FROM crops WHERE {where} ORDER BY seq", args)
        return np.array([r[0] for r in rows], dtype=np.int64)

    def load_merges(self, since_id: int = 0, *, session: str | None = None) -> list[StoredMerge]:
        """Merges with ``id > since_id`` in the order they happened (of ``session`` only)."""
        where, args = _session_filter("id > ?", since_id, session)
        rows = self._db.execute(
            f"SELECT id, at, batch, from_cluster, into_cluster FROM merges WHERE {where} "
            "ORDER BY id",
            args,
        ).fetchall()
        return [
            StoredMerge(int(r[0]), float(r[1]), int(r[2]), Merge(int(r[3]), int(r[4])))
            for r in rows
        ]

    def load_skipped(self, *, session: str | None = None) -> list[StoredSkip]:
        """Every skipped file (of ``session`` only), in path order."""
        where, args = _session_filter("1", None, session)
        rows = self._db.execute(
            f"SELECT path, reason, at FROM skipped WHERE {where} ORDER BY path", args
        ).fetchall()
        return [StoredSkip(str(r[0]), str(r[1]), float(r[2])) for r in rows]

    # -- sessions ----------------------------------------------------------------------

    def sessions(self) -> list[StoredSession]:
        """Every session, in id order (ids sort by time)."""
        rows = self._db.execute(
            "SELECT id, opened, closed, vectors_dropped FROM sessions ORDER BY id"
        ).fetchall()
        return [StoredSession(str(r[0]), float(r[1]), r[2], bool(r[3])) for r in rows]

    def session(self, session: str) -> StoredSession | None:
        """One session's row, or None when no crop was ever committed to it."""
        found = [s for s in self.sessions() if s.id == session]
        return found[0] if found else None

    def open_sessions(self) -> list[StoredSession]:
        """Sessions not closed yet (one, except after a crash while one was closing)."""
        return [s for s in self.sessions() if s.closed is None]

    def capture_span(self, session: str) -> tuple[float, float]:
        """Earliest and latest capture time (seconds) of the session's live crops; NaN if none."""
        row = self._db.execute(
            "SELECT min(time), max(time) FROM crops WHERE session = ? AND retired = 0", (session,)
        ).fetchone()
        return (
            float("nan") if row[0] is None else float(row[0]),
            float("nan") if row[1] is None else float(row[1]),
        )

    def next_seq(self) -> int:
        """The sequence number the next committed crop gets."""
        (n,) = self._db.execute("SELECT coalesce(max(seq) + 1, 0) FROM crops").fetchone()
        return int(n)

    def close_session(self, session: str, now: float) -> None:
        """Mark ``session`` closed at wall-clock ``now`` (its own transaction)."""
        with self._db:
            self._db.execute(
                "UPDATE sessions SET closed = ? WHERE id = ? AND closed IS NULL", (now, session)
            )

    def drop_vectors(self, session: str) -> int:
        """Drop the stored embeddings of a closed session; returns how many crops had them.

        Raises :class:`StateError` for an open session (its linker still needs them).
        """
        row = self.session(session)
        if row is None or row.closed is None:
            raise StateError(f"session {session} is open or unknown; only closed ones drop vectors")
        with self._db:
            n = self._db.execute(
                "UPDATE crops SET vector = X'' WHERE session = ? AND length(vector) > 0", (session,)
            ).rowcount
            self._db.execute("UPDATE sessions SET vectors_dropped = 1 WHERE id = ?", (session,))
        return int(n)

    def _vectors_dropped(self, session: str) -> bool:
        row = self._db.execute(
            "SELECT vectors_dropped FROM sessions WHERE id = ?", (session,)
        ).fetchone()
        return bool(row and row[0])


def _session_filter(
    condition: str, value: object, session: str | None
) -> tuple[str, tuple[object, ...]]:
    """A WHERE clause of ``condition`` (with ``value`` for its ``?``), of one session or all."""
    args: tuple[object, ...] = () if value is None else (value,)
    if session is None:
        return condition, args
    return f"{condition} AND session = ?", (*args, session)


def _stored_crops(scalars: list[tuple[Any, ...]], vectors: npt.NDArray[np.float32]) -> StoredCrops:
    """Columns of the rows read by :meth:`StateStore.load_crops` (see its SELECT)."""
    n = len(scalars)
    nan = float("nan")
    return StoredCrops(
        seqs=np.array([r[0] for r in scalars], dtype=np.int64),
        locals=np.array([r[1] for r in scalars], dtype=np.int64),
        paths=tuple(r[2] for r in scalars),
        frames=tuple(r[3] for r in scalars),
        crop_indexes=tuple(r[4] for r in scalars),
        times=np.array([nan if r[5] is None else r[5] for r in scalars], dtype=np.float64),
        centers=np.array(
            [(nan, nan) if r[6] is None else (r[6], r[7]) for r in scalars], dtype=np.float64
        ).reshape(n, 2),
        sizes=np.array(
            [(nan, nan) if r[11] is None or r[12] is None else (r[11], r[12]) for r in scalars],
            dtype=np.float64,
        ).reshape(n, 2),
        batches=np.array([r[8] for r in scalars], dtype=np.int64),
        clusters=np.array([r[9] for r in scalars], dtype=np.int64),
        vectors=vectors,
    )


def session_cluster_sizes(store: StateStore, session: str) -> npt.NDArray[np.int64]:
    """The size of every cluster of a session's live crops (no embeddings read)."""
    with store.read_transaction():
        stored = store.load_cluster_column(session)
        merges = [m.merge for m in store.load_merges(session=session)]
        retired = store.retired_locals(session)
    if len(stored) == 0:
        return np.zeros(0, dtype=np.int64)
    ids = current_clusters(stored, merges)
    live = np.ones(len(ids), dtype=bool)
    live[list(retired)] = False
    sizes = np.bincount(ids[live], minlength=len(ids))
    return sizes[sizes > 0]


def index_path(folder: Path, session: str = ALL_SESSION) -> Path:
    """Where a session's saved index (or ``track`` checkpoint) lives in a state folder.

    The one session of ``split = "none"`` keeps the name from before sessions.
    """
    if session == ALL_SESSION:
        return folder / INDEX_NAME
    return folder / f"index-{session}.hnsw"


def index_covers_key(session: str) -> str:
    """The meta key holding how many crops a session's saved index covers."""
    return "index_covers" if session == ALL_SESSION else f"index_covers:{session}"


def _crop_row(c: CommittedCrop, batch: int, at: float, session: str) -> tuple[object, ...]:
    """One crops-table row of a committed crop (see the INSERT in ``commit_batch``)."""
    crop = c.item.crop
    center = crop.center if crop.center is not None else (None, None)
    size = crop.frame_size if crop.frame_size is not None else (None, None)
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
        session,
        c.seq if c.local is None else c.local,
        size[0],
        size[1],
    )
