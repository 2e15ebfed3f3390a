"""Writing one session's output folder: the file seam and the folder writer.

:class:`OutputFiles` is how each file is written (a seam for fault tests);
:class:`FolderWriter` writes a session folder's files through it, turning any
failure into :class:`SnapshotError` with the previous files intact. What goes
into the files, and when, is :class:`~crop_clusterd.snapshot.SnapshotWriter`'s.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final

import numpy as np
import numpy.typing as npt

from .atomic import remove_stale_temp_files, replace_symlink
from .clusterdirs import CLUSTER_DIRS, DEDUP_DIRS, cluster_folder_plan, pick_representatives
from .csvfiles import (
    CLUSTERS_CSV,
    ERRORS_CSV,
    MERGES_CSV,
    write_clusters_csv,
    write_errors_csv,
    write_merges_csv,
)
from .embfile import EMBEDDINGS_PKL, write_embeddings_pickle
from .embparts import EMBEDDINGS_DIR, last_written, list_parts, remove_stale_parts, write_part
from .linktree import SyncStats, sync_link_tree
from .log import get_logger
from .records import Assignment, Merge, Skipped
from .store import StoredMerge, StoredSkip
from .summary import SUMMARY_JSON, SessionSummary, write_summary

__all__ = ["FolderWriter", "Listing", "OutputFiles", "SnapshotError"]

log = get_logger(__name__)

_FILES: Final = (CLUSTERS_CSV, MERGES_CSV, ERRORS_CSV, EMBEDDINGS_PKL, SUMMARY_JSON)


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

    def part(
        self,
        folder: Path,
        names: Sequence[str],
        locals_: npt.NDArray[np.int64],
        vectors: npt.NDArray[np.float32],
    ) -> None:
        """Append one Parquet part of embeddings to ``folder``."""
        write_part(folder, names, locals_, vectors)

    def merges(self, path: Path, merges: Iterable[tuple[float, Merge]]) -> None:
        """Write ``merges.csv``."""
        write_merges_csv(path, merges)

    def errors(self, path: Path, skipped: Iterable[Skipped]) -> None:
        """Write ``errors.csv``."""
        write_errors_csv(path, skipped)

    def clusters(self, path: Path, rows: Iterable[Assignment]) -> None:
        """Write ``clusters.csv``."""
        write_clusters_csv(path, rows)

    def summary(self, path: Path, summary: SessionSummary) -> None:
        """Write ``summary.json``."""
        write_summary(path, summary)

    def link(self, link: Path, target: str) -> None:
        """Point the symlink ``link`` at ``target``."""
        replace_symlink(link, target)

    def tree(self, root: Path, plan: Mapping[PurePosixPath, Path]) -> SyncStats:
        """Bring a folder of hard links up to date with ``plan``."""
        return sync_link_tree(root, plan)


@dataclass(frozen=True, slots=True)
class Listing:
    """What one session folder lists: its live crops' local numbers (``live``) with
    their current cluster ids (``current``), ``names`` indexed by local number, the
    session's merges and its skipped files."""

    names: Sequence[str]
    live: npt.NDArray[np.int64]
    current: npt.NDArray[np.int64]
    merges: Sequence[StoredMerge]
    skipped: Sequence[StoredSkip]


class FolderWriter:
    """Writes session folders through ``files``; every failure is a :class:`SnapshotError`.

    ``gen_cluster_dirs`` and ``dedup`` say which cluster folders are kept.
    """

    def __init__(self, files: OutputFiles, *, gen_cluster_dirs: bool, dedup: bool) -> None:
        self.files = files
        self.gen_cluster_dirs = gen_cluster_dirs
        self.dedup = dedup
        self._prepared: set[Path] = set()

    def step(self, target: Path, action: Callable[[], object]) -> None:
        """Run one file's write, turning its failure into :class:`SnapshotError`."""
        try:
            action()
        except (OSError, ValueError) as exc:
            # ValueError: sync_link_tree refusing a folder it does not own.
            raise SnapshotError(target, exc) from exc

    def prepare(self, folder: Path) -> Path:
        """Create a session folder; the first time, clear what a killed write left there."""
        self.step(folder, lambda: folder.mkdir(parents=True, exist_ok=True))
        if folder not in self._prepared:
            for name in _FILES:
                if removed := remove_stale_temp_files(folder / name):
                    log.info("stale_temp_files_removed", file=str(folder / name), count=removed)
            parts = folder / EMBEDDINGS_DIR
            if removed := remove_stale_parts(parts):
                log.info("stale_temp_files_removed", file=str(parts), count=removed)
            self._prepared.add(folder)
        return folder

    def parts_start(self, folder: Path, n: int) -> int:
        """The first local number not yet in a part of ``folder``, for a session of ``n`` crops.

        Parts reaching past the session's crops belong to another state database
        (the state was replaced, the outputs kept): they are removed and rewritten.
        """
        parts = folder / EMBEDDINGS_DIR
        try:
            last = last_written(parts)
        except ValueError:
            last = n  # overlapping parts: not ours to append to
        if last >= n:
            log.warning("embedding_parts_reset", folder=str(parts), written=last + 1, crops=n)
            for part in _part_files(parts):
                self.step(part, part.unlink)
            last = -1
        return last + 1

    def append(
        self,
        folder: Path,
        names: Sequence[str],
        locals_: npt.NDArray[np.int64],
        vectors: npt.NDArray[np.float32],
    ) -> None:
        """Append these rows to the folder's embeddings as one part (nothing when empty)."""
        parts = folder / EMBEDDINGS_DIR
        if len(names):
            self.step(parts, lambda: self.files.part(parts, names, locals_, vectors))

    def pickle(self, folder: Path, names: Sequence[str], vectors: npt.NDArray[np.float32]) -> None:
        """Write the folder's ``embeddings.pkl``."""
        target = folder / EMBEDDINGS_PKL
        self.step(target, lambda: self.files.embeddings(target, names, vectors))

    def summary(self, folder: Path, summary: SessionSummary) -> None:
        """Write the folder's ``summary.json``: the session's files are final."""
        target = folder / SUMMARY_JSON
        self.step(target, lambda: self.files.summary(target, summary))

    def withdraw(self, folder: Path, name: str, session: str) -> None:
        """Remove a file that no longer describes an open session: its ``summary.json``
        (a late crop reopened it) or its ``embeddings.pkl`` (crops came after it)."""
        target = folder / name
        if target.exists():
            self.step(target, target.unlink)
            log.info("session_file_withdrawn", session=session, file=str(target))

    def link(self, link: Path, target: str) -> None:
        """Point the symlink ``link`` at ``target`` (a relative name)."""
        self.step(link, lambda: self.files.link(link, target))

    def listing(
        self, folder: Path, listing: Listing, vectors: npt.NDArray[np.float32] | None
    ) -> int:
        """Write a folder's CSV files and cluster folders; returns the number of clusters.

        ``vectors`` (one row per live crop) is needed for ``dedup``; without it
        the ``dedup/`` folder is left as it is.
        """
        files = self.files
        live = listing.live.tolist()
        names = [listing.names[i] for i in live]
        current = listing.current.tolist()
        merges = folder / MERGES_CSV
        self.step(merges, lambda: files.merges(merges, ((m.at, m.merge) for m in listing.merges)))
        errors = folder / ERRORS_CSV
        self.step(
            errors,
            lambda: files.errors(errors, (Skipped(s.path, s.reason) for s in listing.skipped)),
        )
        # clusters.csv goes last among the files: a reader that sees it change
        # finds the other files already at least as new.
        assignments = [Assignment(i, names[k], current[k]) for k, i in enumerate(live)]
        clusters = folder / CLUSTERS_CSV
        self.step(clusters, lambda: files.clusters(clusters, assignments))
        if self.gen_cluster_dirs or self.dedup:
            sources = {name: Path(name) for name in names}
            if self.gen_cluster_dirs:
                self._tree(folder / CLUSTER_DIRS, cluster_folder_plan(assignments, sources))
            if self.dedup and vectors is not None:
                reps = pick_representatives(assignments, vectors)
                plan = cluster_folder_plan(assignments, sources, representatives=reps)
                self._tree(folder / DEDUP_DIRS, plan)
        return len(set(current))

    def _tree(self, root: Path, plan: Mapping[PurePosixPath, Path]) -> None:
        stats: SyncStats | None = None

        def sync() -> None:
            nonlocal stats
            stats = self.files.tree(root, plan)

        self.step(root, sync)
        if stats is not None and (stats.linked or stats.copied or stats.removed or stats.missing):
            log.debug(
                "snapshot_folders_synced",
                folder=str(root),
                linked=stats.linked,
                copied=stats.copied,
                removed=stats.removed,
                missing=len(stats.missing),
            )


def _part_files(folder: Path) -> list[Path]:
    try:
        return [p.path for p in list_parts(folder)]
    except ValueError:
        # Overlapping parts: every file named like a part goes.
        return sorted(folder.glob("part-*.parquet"))
