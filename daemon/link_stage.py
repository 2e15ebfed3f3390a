"""The daemon's link stage: embedded micro-batches in, clusters committed.

The only owner of the linker and of the state store's writer connection;
nothing else mutates them. Each micro-batch is assigned and committed in one
transaction, so the store only ever holds whole batches.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .linking import LinkBatch, Linker
from .log import get_logger
from .notify import Progress
from .records import BatchCommitted, CommittedCrop, DecodeFailure, Merge, MicroBatch, Moved
from .stage import Stage, Stop
from .store import StateStore

log = get_logger(__name__)


def _vacated(item: MicroBatch) -> list[str]:
    """The paths where this batch's commit retires live crops (see ``commit_batch``):
    its crops' and skips' paths, and the old paths of rows moved onto them."""
    targets = [e.crop.name for e in item.embedded] + [s.name for s in item.skipped]
    onto = set(targets)
    return targets + [m.old for m in item.moved if m.new in onto and m.kind == "crop"]


class LinkStage(Stage[MicroBatch, None]):
    """Assigns each micro-batch to clusters and commits it to the state store.

    The only owner of the linker and of the store's writer connection. A
    commit that fails (a full disk, an I/O error) is retried with backoff (at
    most ``max_backoff_s`` apart) and nothing is marked processed until it
    succeeds. ``stopping`` is set when another stage failed; ``shutdown`` when
    the daemon is stopping: a commit still failing then is retried for
    ``shutdown_grace_s`` more and given up (the stage fails), since its crops
    are not marked processed and the next start finds them again.
    """

    def __init__(
        self,
        linker: Linker,
        store: StateStore,
        inbox: queue.Queue[MicroBatch | Stop],
        stopping: threading.Event,
        progress: Progress,
        *,
        next_batch: int,
        index_file: Path | None,
        index_save_s: float,
        on_commit: Callable[[BatchCommitted], None] = lambda _: None,
        shutdown: threading.Event | None = None,
        shutdown_grace_s: float = 5.0,
        max_backoff_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        super().__init__("link", inbox, None, stopping)
        self.linker = linker
        self.store = store
        self.progress = progress
        self.batch_no = next_batch
        self.index_file = index_file
        self.index_save_s = index_save_s
        self.on_commit = on_commit
        self.shutdown = shutdown if shutdown is not None else stopping
        self.shutdown_grace_s = shutdown_grace_s
        self.max_backoff_s = max_backoff_s
        self.clock = clock
        self.wall = wall
        self.commit_error: str | None = None
        self._index_saved_at = clock()
        self._index_saved_n = len(linker)

    def handle(self, item: MicroBatch) -> None:
        """Assign and commit one micro-batch; save the index when it is due."""
        self._handle(item)
        if self.clock() - self._index_saved_at >= self.index_save_s:
            self.save_index()

    def finish(self) -> None:
        """Save the index at the end of the stream."""
        self.save_index()

    def save_index(self) -> None:
        """Persist the HNSW index when it grew (only this thread touches it)."""
        self._index_saved_at = self.clock()
        if self.index_file is None or len(self.linker) == self._index_saved_n:
            return
        t0 = time.perf_counter()
        try:
            covers = self.linker.save(self.index_file)
        except OSError as exc:
            log.warning("index_save_failed", file=str(self.index_file), reason=str(exc))
            return
        if covers:
            try:
                self.store.set_meta("index_covers", str(covers))
            except sqlite3.Error as exc:
                # A full disk must not kill the stage: with the old count the
                # next start finds the file does not match and rebuilds the index.
                log.warning("index_save_failed", file=str(self.index_file), reason=str(exc))
                return
        self._index_saved_n = len(self.linker)
        if covers:  # track, and cosine below the index size, keep no file
            log.info("index_saved", crops=covers, seconds=round(time.perf_counter() - t0, 2))

    def _handle(self, item: MicroBatch) -> None:
        self.progress.begin("link")
        try:
            result_seqs: range = range(0)
            merges: tuple[Merge, ...] = ()
            # Crops whose files were rewritten stop linking before their new content
            # is added (it must not link to its own old embedding); the commit retires them.
            self.linker.retire(np.array(self.store.live_seqs(_vacated(item)), dtype=np.int64))
            if item.embedded:
                result = self.linker.add(LinkBatch.from_embedded(item.embedded))
                result_seqs, merges = result.seqs, result.merges
            seqs = np.arange(result_seqs.start, result_seqs.stop, dtype=np.int64)
            clusters = self.linker.cluster_of(seqs) if len(seqs) else seqs
        finally:
            self.progress.end("link")
        committed = [
            CommittedCrop(e, int(s), int(c))
            for e, s, c in zip(item.embedded, seqs.tolist(), clusters.tolist(), strict=True)
        ]
        self._commit(committed, merges, item.skipped, item.moved)
        now = self.clock()
        latencies = [1000.0 * (now - t) for t in item.ready_at]
        for c, latency in zip(committed, latencies, strict=True):
            log.info(
                "crop_assigned",
                file=c.item.crop.name,
                seq=c.seq,
                cluster=c.cluster,
                latency_ms=round(latency, 1),
            )
        for s in item.skipped:
            log.warning("file_skipped", file=s.name, reason=s.reason)
        for moved in item.moved:
            if moved.old != moved.new:
                log.info("crop_moved", file=moved.new, was=moved.old, kind=moved.kind)
        for m in merges:
            log.info("clusters_merged", from_cluster=m.from_cluster, into_cluster=m.into_cluster)
        report = BatchCommitted(
            batch=self.batch_no,
            crops=len(committed),
            skipped=len(item.skipped),
            merges=len(merges),
            total_crops=len(self.linker),
            latency_ms_max=round(max(latencies, default=0.0), 1),
        )
        log.info(
            "batch_committed",
            batch=report.batch,
            batch_size=report.crops,
            skipped=report.skipped,
            merges=report.merges,
            crops=report.total_crops,
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
    ) -> None:
        backoff = 1.0
        give_up_at: float | None = None
        while True:
            self.progress.begin("commit")
            try:
                self.store.commit_batch(
                    self.batch_no, committed, merges, skipped, moved=moved, now=self.wall()
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
