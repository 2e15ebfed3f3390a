"""The daemon's link stage: embedded micro-batches in, clusters committed.

The only owner of the sessions' linkers (through its :class:`SessionBook`)
and of the state store's writer connection; nothing else mutates them. Each
micro-batch is split by session, and each part is assigned and committed in
one transaction, so the store only ever holds whole batches.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .identity import touched_paths
from .linking import LinkBatch
from .log import get_logger
from .notify import Progress
from .records import (
    BatchCommitted,
    CommittedCrop,
    DecodeFailure,
    Embedded,
    Merge,
    MicroBatch,
    Moved,
)
from .sessionbook import OpenSession, SessionBook
from .sessions import capture_seconds
from .stage import Stage, Stop
from .store import StateStore, index_covers_key

log = get_logger(__name__)


def _vacated(item: MicroBatch) -> list[str]:
    """The paths where this batch's commit retires live crops (see ``commit_batch``):
    its crops' and skips' paths, and the old paths of rows moved onto them."""
    targets = [e.crop.name for e in item.embedded] + [s.name for s in item.skipped]
    onto = set(targets)
    return targets + [m.old for m in item.moved if m.new in onto and m.kind == "crop"]


@dataclass(frozen=True, slots=True)
class _Part:
    """The crops of one micro-batch that belong to one session, in arrival order."""

    session: str
    rows: tuple[int, ...]


class LinkStage(Stage[MicroBatch, None]):
    """Assigns each micro-batch to clusters of its session and commits it.

    The only owner of the open session's linker (``book``) and of the store's
    writer connection. A commit that fails (a full disk, an I/O error) is
    retried with backoff (at most ``max_backoff_s`` apart) and nothing is
    marked processed until it succeeds. ``stopping`` is set when another stage
    failed; ``shutdown`` when the daemon is stopping: a commit still failing
    then is retried for ``shutdown_grace_s`` more and given up (the stage
    fails), since its crops are not marked processed and the next start finds
    them again. The open session is closed after ``book.rule.close_after_s``
    seconds (``clock``) without a commit. After each commit the paths whose
    rows it changed (:func:`~crop_clusterd.identity.touched_paths`) go to
    ``committed_paths``, so that the intake's registry lets them go.
    ``after_commit`` is called with the session id and its committed crops
    after each commit (the gallery's thumbnails); it must not raise.
    """

    def __init__(
        self,
        book: SessionBook,
        inbox: queue.Queue[MicroBatch | Stop],
        stopping: threading.Event,
        progress: Progress,
        *,
        next_batch: int,
        index_save_s: float,
        on_commit: Callable[[BatchCommitted], None] = lambda _: None,
        committed_paths: queue.SimpleQueue[tuple[str, ...]] | None = None,
        shutdown: threading.Event | None = None,
        shutdown_grace_s: float = 5.0,
        max_backoff_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        after_commit: Callable[[str, Sequence[CommittedCrop]], None] | None = None,
    ) -> None:
        super().__init__("link", inbox, None, stopping)
        self.book = book
        self.store: StateStore = book.store
        self.progress = progress
        self.batch_no = next_batch
        self.next_seq = self.store.next_seq()
        self.index_save_s = index_save_s
        self.on_commit = on_commit
        self.committed_paths = committed_paths
        self.shutdown = shutdown if shutdown is not None else stopping
        self.shutdown_grace_s = shutdown_grace_s
        self.max_backoff_s = max_backoff_s
        self.clock = clock
        self.wall = wall
        self.after_commit = after_commit
        self.commit_error: str | None = None
        self._index_saved_at = clock()
        self._last_commit = clock()

    def handle(self, item: MicroBatch) -> None:
        """Assign and commit one micro-batch; save the index when it is due."""
        self._handle(item)
        self._last_commit = self.clock()
        if self.clock() - self._index_saved_at >= self.index_save_s:
            self.save_index()

    def timeout(self) -> float:
        """Wake at least once a second to close a silent session."""
        return 1.0

    def idle(self) -> None:
        """Close the open session after ``close_after_s`` without a commit."""
        if (
            self.book.current is not None
            and self.clock() - self._last_commit >= self.book.rule.close_after_s
        ):
            self.save_index()
            self.book.close(self.wall(), reason="silence")

    def finish(self) -> None:
        """Save the index at the end of the stream."""
        self.save_index()

    def save_index(self) -> None:
        """Persist the open session's index when it grew (only this thread touches it)."""
        self._index_saved_at = self.clock()
        s = self.book.current
        if s is None or s.index_file is None or len(s.linker) == s.saved_n:
            return
        t0 = time.perf_counter()
        try:
            covers = s.linker.save(s.index_file)
        except OSError as exc:
            log.warning("index_save_failed", file=str(s.index_file), reason=str(exc))
            return
        if covers:
            try:
                self.store.set_meta(index_covers_key(s.id), str(covers))
            except sqlite3.Error as exc:
                # A full disk must not kill the stage: with the old count the
                # next start finds the file does not match and rebuilds the index.
                log.warning("index_save_failed", file=str(s.index_file), reason=str(exc))
                return
        s.saved_n = len(s.linker)
        if covers:  # track, and cosine below the index size, keep no file
            log.info(
                "index_saved",
                session=s.id,
                crops=covers,
                seconds=round(time.perf_counter() - t0, 2),
            )

    def _handle(self, item: MicroBatch) -> None:
        self._retire(item)
        parts = self._parts(item.embedded)
        if not parts:
            # Skips and moves only: they go with the open session (or the one
            # the rule names for the skipped files' time).
            parts = [_Part(self._session_for_skips(item.skipped), ())]
        for k, part in enumerate(parts):
            first = k == 0
            self._link_and_commit(
                part,
                item,
                skipped=item.skipped if first else (),
                moved=item.moved if first else (),
            )

    def _retire(self, item: MicroBatch) -> None:
        """Crops whose files were rewritten stop linking before their new content is
        added (it must not link to its own old embedding); the commit retires them."""
        vacated = self.store.live_crops(_vacated(item))
        s = self.book.current
        if s is not None and vacated:
            mine = [local for session, local in vacated if session == s.id]
            s.linker.retire(np.array(mine, dtype=np.int64))

    def _parts(self, embedded: tuple[Embedded, ...]) -> list[_Part]:
        """The batch's crops grouped by session, sessions in order of first appearance."""
        rows: dict[str, list[int]] = {}
        for i, e in enumerate(embedded):
            rows.setdefault(self.book.session_of(capture_seconds(e.crop)), []).append(i)
        return [_Part(session, tuple(r)) for session, r in rows.items()]

    def _session_for_skips(self, skipped: tuple[DecodeFailure, ...]) -> str:
        if self.book.current is not None:
            return self.book.current.id
        mtimes = [s.mtime_ns for s in skipped if s.mtime_ns is not None]
        t = max(mtimes) / 1e9 if mtimes else self.wall()
        return self.book.session_of(t + time.localtime(t).tm_gmtoff)

    def _link_and_commit(
        self,
        part: _Part,
        item: MicroBatch,
        *,
        skipped: tuple[DecodeFailure, ...],
        moved: tuple[Moved, ...],
    ) -> None:
        session = self.book.switch_to(part.session, self.wall())
        embedded = tuple(item.embedded[i] for i in part.rows)
        self.progress.begin("link")
        try:
            locals_, clusters, merges = self._link(session, embedded)
        finally:
            self.progress.end("link")
        committed = [
            CommittedCrop(e, self.next_seq + k, int(c), int(local))
            for k, (e, local, c) in enumerate(zip(embedded, locals_, clusters, strict=True))
        ]
        self._commit(committed, merges, skipped, moved, session.id)
        if self.committed_paths is not None:  # the intake's registry lets them go
            names = [c.item.crop.name for c in committed] + [s.name for s in skipped]
            self.committed_paths.put(tuple(touched_paths(names, moved)))
        self.next_seq += len(committed)
        session.crops = len(session.linker)
        if self.after_commit is not None:
            self.progress.begin("thumbs")
            try:
                self.after_commit(session.id, committed)
            finally:
                self.progress.end("thumbs")
        self._report(
            session, committed, merges, skipped, moved, [item.ready_at[i] for i in part.rows]
        )

    def _link(
        self, session: OpenSession, embedded: tuple[Embedded, ...]
    ) -> tuple[list[int], list[int], tuple[Merge, ...]]:
        """Add crops to the session's linker: their local numbers, clusters, the merges."""
        if not embedded:
            return [], [], ()
        result = session.linker.add(LinkBatch.from_embedded(embedded))
        seqs = np.arange(result.seqs.start, result.seqs.stop, dtype=np.int64)
        clusters = session.linker.cluster_of(seqs)
        return seqs.tolist(), clusters.tolist(), result.merges

    def _report(
        self,
        session: OpenSession,
        committed: list[CommittedCrop],
        merges: tuple[Merge, ...],
        skipped: tuple[DecodeFailure, ...],
        moved: tuple[Moved, ...],
        ready_at: list[float],
    ) -> None:
        """Log the commit (one info line; per-crop lines are debug) and report it."""
        now = self.clock()
        latencies = [1000.0 * (now - t) for t in ready_at]
        # At GPU rates a line per crop would trip journald's rate limit (issue 10).
        for c, latency in zip(committed, latencies, strict=True):
            log.debug(
                "crop_assigned",
                file=c.item.crop.name,
                session=session.id,
                local=c.local,
                cluster=c.cluster,
                latency_ms=round(latency, 1),
            )
        for s in skipped:
            log.warning("file_skipped", file=s.name, reason=s.reason)
        for m in moved:
            if m.old != m.new:
                log.debug("crop_moved", file=m.new, was=m.old, kind=m.kind)
        for merge in merges:
            log.debug(
                "clusters_merged",
                session=session.id,
                from_cluster=merge.from_cluster,
                into_cluster=merge.into_cluster,
            )
        report = BatchCommitted(
            batch=self.batch_no,
            crops=len(committed),
            skipped=len(skipped),
            merges=len(merges),
            total_crops=self.next_seq,
            latency_ms_max=round(max(latencies, default=0.0), 1),
            session=session.id,
            session_crops=session.crops,
            new_clusters=sum(c.cluster == c.local for c in committed),
        )
        log.info(
            "batch_committed",
            batch=report.batch,
            session=report.session,
            batch_size=report.crops,
            new_clusters=report.new_clusters,
            merges=report.merges,
            skipped=report.skipped,
            moved=sum(m.old != m.new for m in moved),
            crops=report.session_crops,
            latency_ms=report.latency_ms_max,
        )
        self.batch_no += 1
        self.on_commit(report)

    def _commit(
        self,
        committed: list[CommittedCrop],
        merges: tuple[Merge, ...],
        skipped: tuple[DecodeFailure, ...],
        moved: tuple[Moved, ...],
        session: str,
    ) -> None:
        backoff = 1.0
        give_up_at: float | None = None
        while True:
            self.progress.begin("commit")
            try:
                self.store.commit_batch(
                    self.batch_no,
                    committed,
                    merges,
                    skipped,
                    moved=moved,
                    now=self.wall(),
                    session=session,
                )
            except sqlite3.IntegrityError:
                raise  # a bug (a crop committed twice), not a full disk: retrying cannot help
            except sqlite3.Error as exc:
                self.commit_error = str(exc)
                log.error("state_commit_failed", batch=self.batch_no, reason=str(exc))
            else:
                if self.commit_error is not None:
                    log.info("state_commit_recovered", batch=self.batch_no)
                self.commit_error = None
                return
            finally:
                self.progress.end("commit")
            # The linker already holds this batch, so it cannot be dropped: wait
            # for the disk (the watchdog keeps the service alive meanwhile, since
            # nothing is busy between attempts). Waits are real time, not `clock`.
            if self.shutdown.is_set() or self.failed.is_set():
                if give_up_at is None:
                    give_up_at = time.monotonic() + self.shutdown_grace_s
                    backoff = min(backoff, 1.0)
                left = give_up_at - time.monotonic()
                if left <= 0:
                    raise RuntimeError(
                        f"state commit still failing at shutdown: {self.commit_error}"
                    )
                time.sleep(min(backoff, left))
            else:
                # Either event ends the wait: a stop must not sit out a 30 s backoff.
                self._wait_either(backoff)
            backoff = min(2 * backoff, self.max_backoff_s)

    def _wait_either(self, seconds: float) -> None:
        """Sleep ``seconds``, returning early when the daemon stops or a stage fails."""
        deadline = time.monotonic() + seconds
        while not (self.shutdown.is_set() or self.failed.is_set()):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.shutdown.wait(min(left, 0.1))
