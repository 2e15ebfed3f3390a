"""The link stage's sessions: the one open session's linker, opened, restored, closed.

A session's crops are numbered 0, 1, 2, ... within it (``local``), which is
the numbering its linker and its cluster ids use; the store also keeps a
sequence number over all sessions. Only the open session has a linker in
memory: closing a session drops its linker and deletes its saved index, so
memory and restart time are bounded by one session, not by the season
(issue 10). A crop of a closed session (a late file) reopens it from the
store, which costs that session, and is logged as ``session_reopened``.

Only the link stage's thread uses a :class:`SessionBook` (it owns the store's
writer connection).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .flatbug import frame_of_path
from .linking import LinkBatch, Linker, StoredLinks
from .linking.trackstate import checkpoint_path
from .log import get_logger
from .sessions import SessionAssigner, SessionRule
from .store import StateStore, current_clusters, index_covers_key, index_path

__all__ = ["OpenSession", "SessionBook", "restore_linker"]

log = get_logger(__name__)


@dataclass
class OpenSession:
    """The open session: its id, its linker, and where its index is saved.

    ``saved_n`` is how many crops the last saved index covered; ``crops`` how
    many crops the session holds (its next local number).
    """

    id: str
    linker: Linker
    index_file: Path | None
    saved_n: int = 0
    crops: int = field(default=0)


def restore_linker(linker: Linker, store: StateStore, session: str) -> int:
    """Bring a fresh linker to a stored session's state; return its number of crops.

    ``cosine`` takes the stored cluster ids plus the merges, and its saved HNSW
    index (new crops are added to it; nothing is linked again). ``track``
    loads its checkpoint and replays the micro-batches stored after it (all of
    the session's without a usable one); the replayed ids are checked against
    the stored ones. Raises
    ``RuntimeError`` when the session's local numbers have gaps, and
    :class:`~crop_clusterd.store.StateError` when its vectors were dropped.
    """
    stored = store.load_crops(session=session)
    n = len(stored)
    if n and not np.array_equal(stored.locals, np.arange(n)):
        raise RuntimeError(f"state database {store.path}: session {session} has gaps")
    if n == 0:
        return 0
    t0 = time.perf_counter()
    history = store.load_merges(session=session)
    merges = [m.merge for m in history]
    ids = current_clusters(stored.clusters, merges)
    used_index = linker.restore(
        StoredLinks(
            batch=LinkBatch(
                stored.vectors,
                stored.times,
                stored.centers,
                # The frame (name, identifier, trap folder) is derived from the stored
                # path the same way as at intake, so state folders written before
                # frames had a trap resume unchanged.
                tuple(frame_of_path(Path(p)) for p in stored.paths),
                stored.sizes,
            ),
            cluster_ids=ids,
            batch_numbers=stored.batches,
            index_file=index_path(store.folder, session),
            index_covers=int(store.get_meta(index_covers_key(session)) or 0),
            # track's checkpoint recorded the ids of its time; later stitches merged some.
            commit_ids=stored.clusters,
            merges=tuple((m.batch, m.merge) for m in history),
        )
    )
    # After the restore: track's replay must see the embeddings its stored ids came from.
    linker.retire(np.array(sorted(store.retired_locals(session)), dtype=np.int64))
    log.info(
        "state_restored",
        session=session,
        crops=n,
        clusters=len(np.unique(ids)),
        merges=len(merges),
        saved_index=used_index,
        seconds=round(time.perf_counter() - t0, 2),
    )
    return n


class SessionBook:
    """Which session is open, and its linker; the link stage's only way to one.

    ``new_linker`` builds a fresh linker (``factory.linker_from_config``);
    ``state_folder`` is where indexes are saved and where the open session's
    vectors are memory-mapped (None: never saved, vectors in memory);
    ``keep_sessions`` (``state.keep_sessions``, 0 = all) how many of the newest
    closed sessions keep their stored embeddings.
    """

    def __init__(
        self,
        store: StateStore,
        rule: SessionRule,
        new_linker: Callable[[], Linker],
        state_folder: Path | None,
        *,
        keep_sessions: int = 0,
    ) -> None:
        self.store = store
        self.keep_sessions = keep_sessions
        self.rule = rule
        self.assigner = SessionAssigner(rule)
        self._new_linker = new_linker
        self._folder = state_folder
        self.current: OpenSession | None = None

    def resume(self, now: float) -> OpenSession | None:
        """At start-up: restore the newest open session; close any older open one.

        Two open sessions are left only by a crash while one was closing.
        """
        open_ = self.store.open_sessions()
        for stale in open_[:-1]:
            self.store.close_session(stale.id, now)
            log.info("session_closed", session=stale.id, reason="superseded")
        if open_:
            self._open(open_[-1].id, how="resumed")
        return self.current

    def switch_to(self, session: str, now: float) -> OpenSession:
        """The open session ``session``: the current one, or opened after closing it."""
        if self.current is not None and self.current.id == session:
            return self.current
        self.close(now, reason="next session")
        known = self.store.session(session)
        return self._open(session, how="new" if known is None else "reopened")

    def close(self, now: float, *, reason: str) -> None:
        """Close the open session (if any): mark it closed, drop its linker and index."""
        s = self.current
        if s is None:
            return
        self.store.close_session(s.id, now)
        self.current = None
        if s.index_file is not None:
            # Closed for good (a late crop rebuilds from the store): free the disk.
            s.index_file.unlink(missing_ok=True)
            checkpoint_path(s.index_file).unlink(missing_ok=True)
        log.info("session_closed", session=s.id, crops=s.crops, reason=reason)
        self._drop_old_vectors()

    def _drop_old_vectors(self) -> None:
        """Drop the stored embeddings of closed sessions older than the newest ``keep_sessions``.

        Their outputs (embedding parts, embeddings.pkl) stay; the state keeps
        paths, clusters and merges, so the files are still recognised.
        """
        if self.keep_sessions <= 0:
            return
        closed = [s for s in self.store.sessions() if s.closed is not None]
        for old in closed[: max(0, len(closed) - self.keep_sessions)]:
            if not old.vectors_dropped:
                n = self.store.drop_vectors(old.id)
                log.info("session_vectors_dropped", session=old.id, crops=n)

    def session_of(self, capture_s: float) -> str:
        """The session of a crop captured at ``capture_s`` (seconds, NaN: unknown)."""
        return self.assigner.assign(capture_s)

    def _open(self, session: str, *, how: str) -> OpenSession:
        linker = self._new_linker()
        if self._folder is not None:
            # The state folder is on a disk (it holds the database): an ungated
            # cosine linker keeps its vectors mapped there, its index the one copy.
            linker.map_vectors(self._folder)
        n = restore_linker(linker, self.store, session)
        index_file = None if self._folder is None else index_path(self._folder, session)
        self.current = OpenSession(session, linker, index_file, saved_n=n, crops=n)
        if self.rule.split == "gap" and n:
            first, last = self.store.capture_span(session)
            if not (math.isnan(first) or math.isnan(last)):
                self.assigner.restore(session, first, last)
        if how == "reopened":
            # A closed session's final files are written again: worth a warning.
            log.warning("session_reopened", session=session, crops=n, reason="late crops")
        elif how == "resumed":
            log.info("session_resumed", session=session, crops=n)
        else:
            log.info("session_opened", session=session)
        return self.current
