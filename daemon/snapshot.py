"""Snapshots of the daemon's state as the batch tool's output files, per session.

The daemon's truth is the state database; the output folder is a view of it that
other programs poll. :class:`SnapshotWriter` reads the database through its own
read-only connection (so it never blocks the link stage's commits) and writes
each session's folder (:func:`~crop_clusterd.sessionfiles.session_folder`):
``clusters.csv``, ``merges.csv``, ``errors.csv``, ``activity.csv`` and
``activity.png``, the gallery (``index.html``, ``gallery/``; thumbnails are
the link stage's), the ``embeddings/`` Parquet parts, the optional cluster
folders, and when the session closes
``embeddings.pkl`` and ``summary.json`` (last, so its presence means final).
``OUT/current`` links to the newest session's folder. Every file is replaced
atomically.

A snapshot's cost follows the open session, not the season: only the open
session's crop names and stored cluster ids are cached (no vectors), each call
reads the crops and merges committed since the previous one, new embeddings are
appended as one part (never rewritten), and a closed session whose
``summary.json`` exists is never written again. Vectors are read from the
database only for a new part, for ``embeddings.pkl`` (at close, and for the
open session at daemon stop) and for ``dedup``.

A write that fails (disk full, read-only file system, permissions) leaves the
previous files in place, is logged as ``snapshot_failed`` and raised as
:class:`SnapshotError`; the next call writes again even when nothing changed,
and logs ``snapshot_recovered`` once it succeeds.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from .activity import ACTIVITY_CSV, ActivityWriter
from .atomic import remove_stale_temp_files
from .config import OutputConfig
from .csvfiles import CLUSTERS_CSV
from .defaults import ALL_SESSION
from .embfile import EMBEDDINGS_PKL
from .gallery import INDEX_HTML, GalleryCrops, GalleryWriter
from .log import get_logger
from .outputfiles import FolderWriter, Listing, OutputFiles, SnapshotError
from .sessionfiles import CURRENT_LINK, check_locals, live_current, read_session, session_folder
from .store import DB_NAME, StateError, StateStore, StoredMerge, StoredSession, StoredSkip
from .summary import SUMMARY_JSON, SessionSummary, read_summary, summarize

if TYPE_CHECKING:
    from .sessions import SessionRule

# OutputFiles and SnapshotError live in outputfiles; imported from here by the daemon.
__all__ = [
    "OutputFiles",
    "SnapshotError",
    "SnapshotReport",
    "SnapshotWriter",
]

log = get_logger(__name__)

_NEVER = object()  # what was written before the first snapshot: nothing, so always write


@dataclass(frozen=True, slots=True)
class SnapshotReport:
    """What one successful snapshot wrote.

    ``session`` is the open session written (None when no session is open) and
    ``crops``/``clusters``/``merges``/``skipped`` its figures; ``closed`` the
    sessions whose final files this snapshot wrote. ``at`` is the wall-clock
    time the snapshot was taken (the ``now`` given), ``seconds`` how long
    reading and writing took (wall clock) and ``cpu_seconds`` the CPU time of
    the thread that took it (apart from waits for the disk, the GIL or other
    processes: the snapshot's own cost on a shared machine).
    """

    crops: int
    clusters: int
    merges: int
    skipped: int
    at: float
    seconds: float
    session: str | None = ALL_SESSION
    closed: tuple[str, ...] = ()
    cpu_seconds: float = 0.0


class _OpenCache:
    """The open session's cached columns, grown in place: names, seqs, stored cluster ids.

    No vectors: those are read from the database only when a file needs them.
    ``parts_last`` is the highest local number already in a Parquet part (None
    until the session's folder is looked at).
    """

    def __init__(self, session: str, folder: Path) -> None:
        self.id = session
        self.folder = folder
        self.parts_last: int | None = None
        self.paths_version = -1
        self.reset()

    def reset(self) -> None:
        """Forget the cached rows (kept: where the parts are)."""
        self.names: list[str] = []
        self.frames: list[str | None] = []
        self._seqs = np.empty(0, dtype=np.int64)
        self._stored = np.empty(0, dtype=np.int64)
        self._times = np.empty(0, dtype=np.float64)
        self._boxes = np.empty((0, 4), dtype=np.float64)
        self.merges: list[StoredMerge] = []
        self.skipped: list[StoredSkip] = []
        self.retired: frozenset[int] = frozenset()

    def __len__(self) -> int:
        return len(self.names)

    @property
    def seqs(self) -> npt.NDArray[np.int64]:
        """Each crop's global sequence number, indexed by local number."""
        return self._seqs[: len(self.names)]

    @property
    def stored(self) -> npt.NDArray[np.int64]:
        """Each crop's cluster id at commit, indexed by local number."""
        return self._stored[: len(self.names)]

    @property
    def times(self) -> npt.NDArray[np.float64]:
        """Each crop's capture time (seconds, NaN when unknown), indexed by local number."""
        return self._times[: len(self.names)]

    @property
    def boxes(self) -> npt.NDArray[np.float64]:
        """Each crop's box centre and frame size, n×4 (cx, cy, fw, fh; pixels, NaN
        when unknown), indexed by local number."""
        return self._boxes[: len(self.names)]

    def append(
        self,
        seqs: npt.NDArray[np.int64],
        names: Sequence[str],
        stored: npt.NDArray[np.int64],
        times: npt.NDArray[np.float64],
        frames: Sequence[str | None],
        boxes: npt.NDArray[np.float64],
    ) -> None:
        """Add rows; capacity doubles so a long session copies each row O(1) times."""
        n, k = len(self.names), len(names)
        if n + k > len(self._stored):
            capacity = max(n + k, 2 * len(self._stored), 1024)
            for attr in ("_seqs", "_stored", "_times", "_boxes"):
                old = getattr(self, attr)
                grown = np.empty((capacity, *old.shape[1:]), dtype=old.dtype)
                grown[:n] = old[:n]
                setattr(self, attr, grown)
        self._seqs[n : n + k] = seqs
        self._stored[n : n + k] = stored
        self._times[n : n + k] = times
        self._boxes[n : n + k] = boxes
        self.names.extend(names)
        self.frames.extend(frames)


class SnapshotWriter:
    """Writes the output folder from the state database; incremental and atomic.

    ``state_folder`` is the daemon's state folder, opened read-only and lazily
    (the database may not exist yet when the daemon is starting).
    ``output`` says where and what: ``folder``, ``save_embeddings``
    (``embeddings/`` parts and ``embeddings.pkl``), ``gen_cluster_dirs``
    (``clusters/``) and ``dedup`` (``dedup/``). ``session`` is the session
    rule: with ``split = "none"`` (or None) the one session writes straight
    into ``folder``, else each session into ``folder/<id>/``. ``files`` is the
    seam that writes each file. ``plot_every_s`` limits how often the open
    session's ``activity.png`` is redrawn (wall-clock seconds; a closed
    session's is drawn at close). Not thread-safe: call from one thread.
    """

    def __init__(
        self,
        state_folder: Path,
        output: OutputConfig,
        *,
        session: SessionRule | None = None,
        files: OutputFiles | None = None,
        clock: Callable[[], float] = time.perf_counter,
        plot_every_s: float = 60.0,
    ) -> None:
        self.state_folder = Path(state_folder)
        self.out = Path(output.folder)
        self.single = session is None or session.single
        self.save_embeddings = output.save_embeddings
        self.dedup = output.dedup
        self.gallery = output.gallery
        self._folders = FolderWriter(
            files if files is not None else OutputFiles(),
            gen_cluster_dirs=output.gen_cluster_dirs,
            dedup=output.dedup,
        )
        self._clock = clock
        self._activity = ActivityWriter(plot_every_s=plot_every_s)
        self._gallery = GalleryWriter()
        self._store: StateStore | None = None
        self._store_ino: tuple[int, int] | None = None
        self._cache: _OpenCache | None = None
        # Closed sessions known to be final (summary.json of this close): id -> closed.
        self._final: dict[str, float] = {}
        self._written: object = _NEVER
        self._failures = 0
        self._failed_since: float | None = None
        self._last_error: str | None = None
        # A kill mid-replace leaves a hidden temporary link; this writer owns it.
        remove_stale_temp_files(self.out / CURRENT_LINK)

    # -- public ------------------------------------------------------------------------

    @property
    def last_error(self) -> str | None:
        """The message of the failure not yet recovered from, else None."""
        return self._last_error

    def close(self) -> None:
        """Close the read-only database connection (reopened on the next call)."""
        if self._store is not None:
            self._store.close()
            self._store = None
            self._store_ino = None

    def write_if_changed(self, now: float | None = None) -> SnapshotReport | None:
        """Write a snapshot when crops, merges, skipped files or sessions changed.

        Also writes when the previous attempt failed, and on the first call.
        Returns None when nothing was written (no change, or no database yet).
        Raises :class:`SnapshotError` when a file cannot be written and
        :class:`~crop_clusterd.store.StateError` when the database cannot be read.
        """
        store = self._open(required=False)
        if store is None:
            return None
        return self._snapshot(store, now, final=False)

    def write(self, now: float | None = None) -> SnapshotReport:
        """Write a snapshot whatever changed, with the open session's ``embeddings.pkl``
        (used at shutdown).

        Raises :class:`SnapshotError` when a file cannot be written and
        :class:`~crop_clusterd.store.StateError` when there is no readable database.
        """
        store = self._open(required=True)
        assert store is not None  # required=True raises instead
        report = self._snapshot(store, now, final=True)
        assert report is not None  # final=True always writes
        return report

    # -- reading -----------------------------------------------------------------------

    def _open(self, *, required: bool) -> StateStore | None:
        """The read-only store, reopened when the database file was replaced."""
        db = self.state_folder / DB_NAME
        try:
            st = os.stat(db)
        except FileNotFoundError:
            if required:
                raise StateError(f"no state database at {db}") from None
            if self._store is not None:
                # Moved away: whatever appears next is another database.
                self.close()
                self._reset_cache()
            return None
        ino = (st.st_dev, st.st_ino)
        if self._store is not None and ino != self._store_ino:
            # A new database (state moved away and restarted): the cache is of the old one.
            log.info("snapshot_state_replaced", path=str(db))
            self.close()
            self._reset_cache()
        if self._store is None:
            try:
                self._store = StateStore(self.state_folder, readonly=True)
            except StateError:
                if required:
                    raise
                # Created but not yet initialised by the daemon: try again next time.
                log.debug("snapshot_state_not_ready", path=str(db))
                return None
            self._store_ino = ino
        return self._store

    def _reset_cache(self) -> None:
        self._cache = None
        self._final = {}
        self._written = _NEVER

    def _sessions(self, store: StateStore) -> list[StoredSession]:
        try:
            sessions = store.sessions()
        except sqlite3.Error as exc:
            raise StateError(f"cannot read state database {store.path}: {exc}") from exc
        if self.single and not sessions:
            # Before the first crop: the one session still gets its (empty) files.
            sessions.append(StoredSession(ALL_SESSION, 0.0, None, False))
        return sessions

    def _read_open(self, store: StateStore, session: StoredSession) -> _OpenCache:
        """Bring the open session's cache up to the latest commit (names only, no vectors)."""
        cache = self._cache
        if cache is None or cache.id != session.id:
            cache = self._cache = _OpenCache(session.id, session_folder(self.out, session.id))
        try:
            with store.read_transaction():
                paths_version = store.paths_version()
                if paths_version != cache.paths_version:
                    # Crops moved or were retired: cached paths are stale, read afresh.
                    # (Retiring bumps the version, so retired locals change only then.)
                    cache.reset()
                    cache.paths_version = paths_version
                    cache.retired = store.retired_locals(session.id)
                n = len(cache)
                # Re-read the last cached row too: if it is gone or different the
                # database is not the one cached (it was rebuilt), so start over.
                since = int(cache.seqs[-1]) if n else 0
                rows = store.load_crops(since, session=session.id, vectors=False)
                if n and (len(rows) == 0 or rows.paths[0] != cache.names[-1]):
                    log.info("snapshot_cache_reset", session=session.id, cached=n)
                    cache.reset()
                    cache.retired = store.retired_locals(session.id)
                    rows = store.load_crops(0, session=session.id, vectors=False)
                    n = 0
                last_id = cache.merges[-1].id if cache.merges else 0
                new_merges = store.load_merges(last_id, session=session.id)
                skipped = store.load_skipped(session=session.id)
        except sqlite3.Error as exc:
            raise StateError(f"cannot read state database {store.path}: {exc}") from exc
        skip = 1 if n else 0
        check_locals(store, session.id, rows.locals[skip:], n)
        cache.append(
            rows.seqs[skip:],
            rows.paths[skip:],
            rows.clusters[skip:],
            rows.times[skip:],
            rows.frames[skip:],
            np.hstack([rows.centers, rows.sizes])[skip:],
        )
        cache.merges.extend(new_merges)
        cache.skipped = skipped
        return cache

    # -- one snapshot --------------------------------------------------------------------

    def _snapshot(
        self, store: StateStore, now: float | None, *, final: bool
    ) -> SnapshotReport | None:
        started, started_cpu = self._clock(), time.thread_time()
        at = time.time() if now is None else now
        sessions = self._sessions(store)
        pending = [s for s in sessions if s.closed is not None and not self._is_final(s)]
        opened = [s for s in sessions if s.closed is None]
        # After a crash while one was closing two may be open; the link stage resumes
        # the last by id (and closes the others), so that is the one written.
        open_ = opened[-1] if opened else None
        cache = self._read_open(store, open_) if open_ is not None else None
        key = (
            None
            if cache is None
            else (
                cache.id,
                len(cache),
                cache.merges[-1].id if cache.merges else 0,
                tuple(cache.skipped),
                cache.paths_version,
            )
        )
        if not final and not pending and self._failures == 0 and key == self._written:
            return None
        try:
            closed = [self._finalise(store, s) for s in pending]
            clusters = 0
            if cache is not None:
                clusters = self._write_open(store, cache, final=final)
            self._point_current(sessions)
        except SnapshotError as exc:
            self._failed(exc, at)
            raise
        report = SnapshotReport(
            crops=0 if cache is None else len(cache) - len(cache.retired),
            clusters=clusters,
            merges=0 if cache is None else len(cache.merges),
            skipped=0 if cache is None else len(cache.skipped),
            at=at,
            seconds=self._clock() - started,
            cpu_seconds=time.thread_time() - started_cpu,
            session=None if cache is None else cache.id,
            closed=tuple(closed),
        )
        self._succeeded(report, key)
        return report

    def _succeeded(self, report: SnapshotReport, key: tuple[object, ...] | None) -> None:
        if self._failures:
            log.info(
                "snapshot_recovered",
                attempts=self._failures,
                failed_for_s=round(report.at - (self._failed_since or report.at), 3),
            )
        self._failures = 0
        self._failed_since = None
        self._last_error = None
        self._written = key
        log.info(
            "snapshot_written",
            session=report.session,
            crops=report.crops,
            clusters=report.clusters,
            merges=report.merges,
            skipped=report.skipped,
            closed=list(report.closed),
            seconds=round(report.seconds, 3),
            cpu_s=round(report.cpu_seconds, 3),
        )

    def _failed(self, exc: SnapshotError, at: float) -> None:
        message = str(exc)
        fields = {"file": str(exc.file), "errno": exc.errno_name, "error": message}
        if self._failures == 0 or message != self._last_error:
            log.error("snapshot_failed", attempt=self._failures + 1, **fields)
        else:
            # The same failure every interval (a full disk) would flood the journal.
            log.debug("snapshot_failed", attempt=self._failures + 1, **fields)
        if self._failures == 0:
            self._failed_since = at
        self._failures += 1
        self._last_error = message

    # -- sessions ------------------------------------------------------------------------

    def _is_final(self, session: StoredSession) -> bool:
        """Whether a closed session's folder holds the summary.json of this very close."""
        if self._final.get(session.id) == session.closed:
            return True
        path = session_folder(self.out, session.id) / SUMMARY_JSON
        try:
            written = read_summary(path).closed
        except (OSError, ValueError):
            return False
        if written is None or written != session.closed:
            return False  # a summary of an earlier close: the session was reopened since
        self._final[session.id] = written
        return True

    def _finalise(self, store: StateStore, session: StoredSession) -> str:
        """Write a closed session's final files, ``summary.json`` last; returns its id."""
        assert session.closed is not None  # only closed sessions are finalised
        w = self._folders
        folder = w.prepare(session_folder(self.out, session.id))
        with_vectors = not session.vectors_dropped and (self.save_embeddings or self.dedup)
        rows = read_session(store, session, vectors=with_vectors)
        crops = rows.crops
        if session.vectors_dropped:
            log.warning("session_vectors_dropped", session=session.id, folder=str(folder))
        elif self.save_embeddings:
            new = slice(w.parts_start(folder, len(crops)), None)
            w.append(folder, crops.paths[new], crops.locals[new], crops.vectors[new])
        live, current = live_current(crops.clusters, rows.merges, rows.retired)
        vectors = crops.vectors[live] if with_vectors else None
        if vectors is not None and self.save_embeddings:
            w.pickle(folder, [crops.paths[i] for i in live.tolist()], vectors)
        w.listing(folder, Listing(crops.paths, live, current, rows.merges, rows.skipped), vectors)
        names = [crops.paths[i] for i in live.tolist()]
        self._write_activity(folder, session.id, current, crops.times[live], final=True)
        summary = summarize(session.id, current, crops.times[live], closed=session.closed)
        if self.gallery:
            frames = [crops.frames[i] for i in live.tolist()]
            boxes = np.hstack([crops.centers, crops.sizes])[live]
            gallery = GalleryCrops(names, current, crops.times[live], frames, boxes)
            self._write_gallery(folder, summary, gallery)
            self._gallery.forget(folder)
        w.summary(folder, summary)
        self._final[session.id] = session.closed
        if self._cache is not None and self._cache.id == session.id:
            self._cache = None  # closed: its columns leave memory
        log.info(
            "session_outputs_final",
            session=session.id,
            folder=str(folder),
            crops=summary.crops,
            clusters=summary.clusters,
            clusters_2plus=summary.clusters_2plus,
            singletons=summary.singletons,
        )
        return session.id

    def _write_open(self, store: StateStore, cache: _OpenCache, *, final: bool) -> int:
        """Write the open session's folder; returns its number of clusters.

        ``final`` (daemon stop) adds its ``embeddings.pkl``.
        """
        w = self._folders
        folder = w.prepare(cache.folder)
        w.withdraw(folder, SUMMARY_JSON, cache.id)
        n = len(cache)
        if self.save_embeddings:
            if cache.parts_last is None:
                cache.parts_last = w.parts_start(folder, n) - 1
            if cache.parts_last < n - 1:
                self._append_open(store, cache)
                if not final:
                    # Written at the last stop or close; it lacks the new crops now.
                    w.withdraw(folder, EMBEDDINGS_PKL, cache.id)
        live, current = live_current(cache.stored, cache.merges, cache.retired)
        vectors = None
        if self.dedup or (final and self.save_embeddings):
            vectors = self._open_vectors(store, cache)[live]
            if final and self.save_embeddings:
                w.pickle(folder, [cache.names[i] for i in live.tolist()], vectors)
        listing = Listing(cache.names, live, current, cache.merges, cache.skipped)
        clusters = w.listing(folder, listing, vectors)
        times = cache.times[live]
        self._write_activity(folder, cache.id, current, times, final=final)
        if self.gallery:
            ids = live.tolist()
            names = [cache.names[i] for i in ids]
            frames = [cache.frames[i] for i in ids]
            crops = GalleryCrops(names, current, times, frames, cache.boxes[live])
            self._write_gallery(folder, summarize(cache.id, current, times), crops)
        return clusters

    def _write_gallery(self, folder: Path, summary: SessionSummary, crops: GalleryCrops) -> None:
        """The session's ``index.html`` and the data blocks that changed."""
        title = "" if summary.session == ALL_SESSION else f"session {summary.session}"
        self._folders.step(
            folder / INDEX_HTML,
            lambda: self._gallery.write(folder, crops, summary, title=title),
        )

    def _write_activity(
        self,
        folder: Path,
        session: str,
        current: npt.NDArray[np.int64],
        times: npt.NDArray[np.float64],
        *,
        final: bool,
    ) -> None:
        """``activity.csv`` and (when due) ``activity.png`` of one session's live crops."""
        target = folder / ACTIVITY_CSV
        title = "" if session == ALL_SESSION else f"session {session}"
        self._folders.step(
            target,
            lambda: self._activity.write(folder, current, times, final=final, title=title),
        )
        if final:
            self._activity.forget(folder)

    def _open_vectors(self, store: StateStore, cache: _OpenCache) -> npt.NDArray[np.float32]:
        """The open session's vectors in local order, for the rows cached."""
        try:
            with store.read_transaction():
                rows = store.load_crops(0, session=cache.id)
        except sqlite3.Error as exc:
            raise StateError(f"cannot read state database {store.path}: {exc}") from exc
        if len(rows) < len(cache):
            raise StateError(f"state database {store.path} changed while it was read")
        return rows.vectors[: len(cache)]

    def _append_open(self, store: StateStore, cache: _OpenCache) -> None:
        """Append the open session's rows not yet in a part (and only those) as one part."""
        assert cache.parts_last is not None
        first = cache.parts_last + 1
        try:
            with store.read_transaction():
                rows = store.load_crops(int(cache.seqs[first]), session=cache.id)
        except sqlite3.Error as exc:
            raise StateError(f"cannot read state database {store.path}: {exc}") from exc
        # Rows committed after the cache was read wait for the next snapshot.
        k = min(len(rows), len(cache) - first)
        check_locals(store, cache.id, rows.locals[:k], first)
        self._folders.append(cache.folder, rows.paths[:k], rows.locals[:k], rows.vectors[:k])
        cache.parts_last = first + k - 1

    def _point_current(self, sessions: Sequence[StoredSession]) -> None:
        """Point ``OUT/current`` at the newest session's folder once it has been written."""
        if self.single or not sessions:
            return
        newest = max(sessions, key=lambda s: (s.opened, s.id))
        if newest.id == ALL_SESSION or not (self.out / newest.id / CLUSTERS_CSV).exists():
            return
        self._folders.link(self.out / CURRENT_LINK, newest.id)
