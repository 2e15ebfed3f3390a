"""Snapshots of the daemon's state as the batch tool's output files.

The daemon's truth is the state database; the output folder is a view of it that
other programs poll. :class:`SnapshotWriter` reads the database through its own
read-only connection (so it never blocks the link stage's commits) and writes
``clusters.csv``, ``embeddings.pkl``, ``merges.csv``, ``errors.csv`` and the
optional cluster folders. Each file is replaced atomically, and all of them are
built from one read transaction, so they describe the same committed batch.

The writer is incremental: crop names, stored cluster ids and (when a file needs
them) embeddings are cached, and each call reads only crops and merges committed
since the previous one. Current cluster ids are recomputed from the cached
columns with :func:`~crop_clusterd.store.current_clusters`.

A write that fails (disk full, read-only file system, permissions) leaves the
previous files in place, is logged as ``snapshot_failed`` and raised as
:class:`SnapshotError`; the next call writes again even when nothing changed,
and logs ``snapshot_recovered`` once it succeeds.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import numpy.typing as npt

from .atomic import remove_stale_temp_files
from .clusterdirs import CLUSTER_DIRS, DEDUP_DIRS, cluster_folder_plan, pick_representatives
from .config import OutputConfig
from .csvfiles import (
    CLUSTERS_CSV,
    ERRORS_CSV,
    MERGES_CSV,
    write_clusters_csv,
    write_errors_csv,
    write_merges_csv,
)
from .embfile import EMBEDDINGS_PKL, write_embeddings_pickle
from .linktree import SyncStats, sync_link_tree
from .log import get_logger
from .records import Assignment, Merge, Skipped
from .store import DB_NAME, StateError, StateStore, StoredMerge, StoredSkip, current_clusters

__all__ = [
    "OutputFiles",
    "SnapshotError",
    "SnapshotReport",
    "SnapshotWriter",
]

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class SnapshotReport:
    """What one successful snapshot wrote.

    ``at`` is the wall-clock time the snapshot was taken (the ``now`` given),
    ``seconds`` how long reading and writing took.
    """

    crops: int
    clusters: int
    merges: int
    skipped: int
    at: float
    seconds: float


class SnapshotError(Exception):
    """A snapshot file could not be written; the previous version of every file is intact.

    ``file`` is the file or folder that failed and ``errno_name`` the symbolic
    errno (``"ENOSPC"``) when the cause was an ``OSError``. ``str()`` of the
    error is a one-line message suitable for ``crop-clusterd status``.
    """

    def __init__(self, file: Path, cause: BaseException) -> None:
        self.file = file
        self.cause = cause
        code = cause.errno if isinstance(cause, OSError) else None
        self.errno_name: str | None = errno.errorcode.get(code) if code else None
        if isinstance(cause, OSError) and cause.strerror:
            detail = f"{self.errno_name or 'error'}: {cause.strerror}"
        else:
            detail = f"{type(cause).__name__}: {cause}"
        super().__init__(f"cannot write {file}: {detail}")


class OutputFiles:
    """How the snapshot files are written (all atomic, see :mod:`crop_clusterd.atomic`).

    A seam for tests: a subclass can make one file fail the way a full disk
    would, without touching the file system or patching builtins.
    """

    def embeddings(
        self, path: Path, names: Sequence[str], vectors: npt.NDArray[np.float32]
    ) -> None:
        """Write ``embeddings.pkl``."""
        write_embeddings_pickle(path, names, vectors)

    def merges(self, path: Path, merges: Iterable[tuple[float, Merge]]) -> None:
        """Write ``merges.csv``."""
        write_merges_csv(path, merges)

    def errors(self, path: Path, skipped: Iterable[Skipped]) -> None:
        """Write ``errors.csv``."""
        write_errors_csv(path, skipped)

    def clusters(self, path: Path, rows: Iterable[Assignment]) -> None:
        """Write ``clusters.csv``."""
        write_clusters_csv(path, rows)

    def tree(self, root: Path, plan: Mapping[PurePosixPath, Path]) -> SyncStats:
        """Bring a folder of hard links up to date with ``plan``."""
        return sync_link_tree(root, plan)


class _SnapshotColumns:
    """Cached columns of the stored crops, grown in place as batches are committed."""

    def __init__(self, keep_vectors: bool) -> None:
        self.keep_vectors = keep_vectors
        self.names: list[str] = []
        self._stored = np.empty(0, dtype=np.int64)
        self._vectors = np.empty((0, 0), dtype=np.float32)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def dim(self) -> int | None:
        """Embedding size seen so far (None before the first crop with vectors kept)."""
        return self._vectors.shape[1] if len(self.names) and self.keep_vectors else None

    @property
    def stored(self) -> npt.NDArray[np.int64]:
        """Each crop's cluster id at commit, indexed by seq."""
        return self._stored[: len(self.names)]

    @property
    def vectors(self) -> npt.NDArray[np.float32]:
        """Embeddings in seq order (a view: no copy); empty when not kept."""
        if not self.keep_vectors:
            return np.empty((len(self.names), 0), dtype=np.float32)
        return self._vectors[: len(self.names)]

    def append(
        self,
        names: Sequence[str],
        stored: npt.NDArray[np.int64],
        vectors: npt.NDArray[np.float32],
    ) -> None:
        """Add rows; capacity doubles so a long run copies each row O(1) times."""
        n, k = len(self.names), len(names)
        if k == 0:
            return
        need = n + k
        if self.keep_vectors and n and vectors.shape[1] != self._vectors.shape[1]:
            raise StateError(
                f"stored embeddings changed size from {self._vectors.shape[1]} "
                f"to {vectors.shape[1]}"
            )
        if need > len(self._stored) or (self.keep_vectors and n == 0):
            capacity = max(need, 2 * len(self._stored), 1024)
            grown = np.empty(capacity, dtype=np.int64)
            grown[:n] = self._stored[:n]
            self._stored = grown
            if self.keep_vectors:
                grown_v = np.empty((capacity, vectors.shape[1]), dtype=np.float32)
                if n:
                    grown_v[:n] = self._vectors[:n]
                self._vectors = grown_v
        self._stored[n:need] = stored
        if self.keep_vectors:
            self._vectors[n:need] = vectors
        self.names.extend(names)


@dataclass(frozen=True, slots=True)
class _View:
    """Everything one snapshot writes, read in one transaction."""

    names: Sequence[str]
    current: npt.NDArray[np.int64]
    vectors: npt.NDArray[np.float32]
    merges: Sequence[StoredMerge]
    skipped: Sequence[StoredSkip]
    live: npt.NDArray[np.int64]


class SnapshotWriter:
    """Writes the output folder from the state database; incremental and atomic.

    ``state_folder`` is the daemon's state folder, opened read-only and lazily
    (the database may not exist yet when the daemon is starting).
    ``output`` says where and what: ``folder``, ``save_embeddings``,
    ``gen_cluster_dirs`` (``clusters/``) and ``dedup`` (``dedup/``). ``files``
    is the seam that writes each file. Not thread-safe: call from one thread.
    """

    def __init__(
        self,
        state_folder: Path,
        output: OutputConfig,
        *,
        files: OutputFiles | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.state_folder = Path(state_folder)
        self.out = Path(output.folder)
        self.save_embeddings = output.save_embeddings
        self.gen_cluster_dirs = output.gen_cluster_dirs
        self.dedup = output.dedup
        self._files = files if files is not None else OutputFiles()
        self._clock = clock
        self._store: StateStore | None = None
        self._store_ino: tuple[int, int] | None = None
        self._cols = _SnapshotColumns(keep_vectors=self.save_embeddings or self.dedup)
        self._merges: list[StoredMerge] = []
        self._skipped: list[StoredSkip] = []
        self._written: tuple[int, int, tuple[StoredSkip, ...], int] | None = None
        self._retired: frozenset[int] = frozenset()
        self._paths_version = 0
        self._failures = 0
        self._failed_since: float | None = None
        self._last_error: str | None = None
        # A kill mid-write leaves hidden temporary files; this writer owns them.
        for name in (CLUSTERS_CSV, EMBEDDINGS_PKL, MERGES_CSV, ERRORS_CSV):
            if removed := remove_stale_temp_files(self.out / name):
                log.info("stale_temp_files_removed", file=str(self.out / name), count=removed)

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
        """Write a snapshot when crops, merges or skipped files changed since the last one.

        Also writes when the previous attempt failed, and on the first call.
        Returns None when nothing was written (no change, or no database yet).
        Raises :class:`SnapshotError` when a file cannot be written and
        :class:`~crop_clusterd.store.StateError` when the database cannot be read.
        """
        store = self._open(required=False)
        if store is None:
            return None
        return self._snapshot(store, now, force=False)

    def write(self, now: float | None = None) -> SnapshotReport:
        """Write a snapshot whatever changed (used at shutdown).

        Raises :class:`SnapshotError` when a file cannot be written and
        :class:`~crop_clusterd.store.StateError` when there is no readable database.
        """
        store = self._open(required=True)
        assert store is not None  # required=True raises instead
        report = self._snapshot(store, now, force=True)
        assert report is not None  # force=True always writes
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
        self._cols = _SnapshotColumns(keep_vectors=self._cols.keep_vectors)
        self._merges = []
        self._skipped = []
        self._retired = frozenset()
        self._written = None

    def _read(self, store: StateStore) -> None:
        """Bring the cached columns, merges and skips up to the latest commit."""
        try:
            with store.read_transaction():
                n = len(self._cols)
                paths_version = store.paths_version()
                if paths_version != self._paths_version:
                    # Crops moved or were retired: cached paths are stale, read afresh.
                    self._reset_cache()
                    self._paths_version = paths_version
                    n = 0
                # Re-read the last cached row too: if it is gone or different the
                # database is not the one cached (it was rebuilt), so start over.
                since = n - 1 if n else 0
                rows = store.load_crops(since, dim=self._cols.dim)
                if n and (len(rows) == 0 or rows.paths[0] != self._cols.names[-1]):
                    log.info("snapshot_cache_reset", cached=n)
                    self._reset_cache()
                    rows = store.load_crops(0)
                    n = since = 0
                skip = n - since
                new_seqs = rows.seqs[skip:]
                expected = np.arange(n, n + len(new_seqs), dtype=np.int64)
                if not np.array_equal(new_seqs, expected):
                    raise StateError(
                        f"crop sequence numbers in {store.path} are not contiguous "
                        f"(expected {n}.., got {new_seqs[:3].tolist()}..)"
                    )
                last_id = self._merges[-1].id if self._merges else 0
                new_merges = store.load_merges(last_id)
                skipped = store.load_skipped()
                if n == 0:
                    # Retiring bumps the paths version, which empties the cache: the
                    # retired set can only change when the cache is read afresh, so
                    # a snapshot does not scan the whole crops table each time.
                    self._retired = store.retired_seqs()
        except sqlite3.Error as exc:
            raise StateError(f"cannot read state database {store.path}: {exc}") from exc
        self._cols.append(
            rows.paths[skip:],
            rows.clusters[skip:],
            rows.vectors[skip:] if self._cols.keep_vectors else rows.vectors[:0],
        )
        self._merges.extend(new_merges)
        self._skipped = skipped

    # -- writing -----------------------------------------------------------------------

    def _snapshot(
        self, store: StateStore, now: float | None, *, force: bool
    ) -> SnapshotReport | None:
        started = self._clock()
        at = time.time() if now is None else now
        self._read(store)
        key = (
            len(self._cols),
            self._merges[-1].id if self._merges else 0,
            tuple(self._skipped),
            self._paths_version,
        )
        if not force and self._failures == 0 and key == self._written:
            return None
        try:
            current = current_clusters(self._cols.stored, (m.merge for m in self._merges))
        except IndexError:
            raise StateError(
                f"state database {store.path} is inconsistent: "
                "a cluster id is not a crop's sequence number"
            ) from None
        view = _View(
            names=self._cols.names,
            current=current,
            vectors=self._cols.vectors,
            merges=self._merges,
            skipped=self._skipped,
            # Retired crops (rewritten since) keep their seq but leave the outputs.
            live=np.setdiff1d(
                np.arange(len(self._cols), dtype=np.int64),
                np.fromiter(self._retired, dtype=np.int64, count=len(self._retired)),
                assume_unique=True,
            ),
        )
        try:
            clusters = self._write_files(view)
        except SnapshotError as exc:
            self._failed(exc, at)
            raise
        seconds = self._clock() - started
        report = SnapshotReport(
            crops=len(view.live),
            clusters=clusters,
            merges=len(view.merges),
            skipped=len(view.skipped),
            at=at,
            seconds=seconds,
        )
        if self._failures:
            log.info(
                "snapshot_recovered",
                attempts=self._failures,
                failed_for_s=round(at - (self._failed_since or at), 3),
            )
        self._failures = 0
        self._failed_since = None
        self._last_error = None
        self._written = key
        log.info(
            "snapshot_written",
            crops=report.crops,
            clusters=report.clusters,
            merges=report.merges,
            skipped=report.skipped,
            seconds=round(seconds, 3),
        )
        return report

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

    def _step(self, target: Path, action: Callable[[], object]) -> None:
        """Run one file's write, turning its failure into :class:`SnapshotError`."""
        try:
            action()
        except (OSError, ValueError) as exc:
            # ValueError: sync_link_tree refusing a folder it does not own.
            raise SnapshotError(target, exc) from exc

    def _write_files(self, view: _View) -> int:
        """Write every output; returns the number of clusters."""
        out = self.out
        self._step(out, lambda: out.mkdir(parents=True, exist_ok=True))
        live = view.live.tolist()
        names = [view.names[i] for i in live]
        vectors = view.vectors[view.live] if len(live) != len(view.names) else view.vectors
        current = view.current[view.live].tolist()
        files = self._files
        # clusters.csv goes last among the files: a reader that sees it change
        # finds the other files already at least as new.
        if self.save_embeddings:
            self._step(
                out / EMBEDDINGS_PKL,
                lambda: files.embeddings(out / EMBEDDINGS_PKL, names, vectors),
            )
        self._step(
            out / MERGES_CSV,
            lambda: files.merges(out / MERGES_CSV, ((m.at, m.merge) for m in view.merges)),
        )
        self._step(
            out / ERRORS_CSV,
            lambda: files.errors(
                out / ERRORS_CSV, (Skipped(s.path, s.reason) for s in view.skipped)
            ),
        )
        assignments = [Assignment(i, names[k], current[k]) for k, i in enumerate(live)]
        self._step(out / CLUSTERS_CSV, lambda: files.clusters(out / CLUSTERS_CSV, assignments))
        if self.gen_cluster_dirs or self.dedup:
            sources = {name: Path(name) for name in names}
            if self.gen_cluster_dirs:
                plan = cluster_folder_plan(assignments, sources)
                self._tree(out / CLUSTER_DIRS, plan)
            if self.dedup:
                reps = pick_representatives(assignments, vectors)
                plan = cluster_folder_plan(assignments, sources, representatives=reps)
                self._tree(out / DEDUP_DIRS, plan)
        return len(set(current))

    def _tree(self, root: Path, plan: Mapping[PurePosixPath, Path]) -> None:
        stats: SyncStats | None = None

        def sync() -> None:
            nonlocal stats
            stats = self._files.tree(root, plan)

        self._step(root, sync)
        if stats is not None and (stats.linked or stats.copied or stats.removed or stats.missing):
            log.debug(
                "snapshot_folders_synced",
                folder=str(root),
                linked=stats.linked,
                copied=stats.copied,
                removed=stats.removed,
                missing=len(stats.missing),
            )
