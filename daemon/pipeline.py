"""The daemon's pipeline plumbing and its embed and link stages.

Stages are threads joined by bounded queues (so a burst of files never holds
more than a few batches of decoded images) and stopped by a sentinel that each
stage passes on after its last item, like watchdog's emitter and dispatcher:

    watch -> intake (settle, metadata, decode) -> embed (micro-batches, model)
          -> link (assign, commit to the state store) ; snapshot reads the store

Records between stages are frozen dataclasses. The link stage owns the linker
and the state store's writer connection; nothing else mutates them.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .embed import Embedder
from .intake import IntakeUnit
from .linking import LinkBatch, Linker
from .log import get_logger
from .notify import Progress
from .queues import STOP, Stop, drain_until_stop, put_until
from .records import Embedded, Merge
from .store import CommittedCrop, SkippedFile, StateStore

log = get_logger(__name__)


@dataclass(frozen=True)
class EmbeddedBatch:
    """One micro-batch after the model: what the link stage assigns and commits."""

    embedded: tuple[Embedded, ...]
    ready_at: tuple[float, ...]
    skipped: tuple[SkippedFile, ...]


@dataclass(frozen=True, slots=True)
class BatchCommitted:
    """What the link stage reports after each commit (for STATUS and tests)."""

    batch: int
    crops: int
    skipped: int
    merges: int
    total_crops: int
    latency_ms_max: float


class EmbedStage(threading.Thread):
    """Groups intake units into micro-batches and runs the model on them.

    A micro-batch is flushed when it holds ``batch_size`` crops or when its
    first unit has waited ``max_wait_s``, whichever comes first (watchdog's
    debouncer pattern). Units are kept whole; the model is called in chunks of
    at most ``batch_size``.
    """

    def __init__(
        self,
        embedder: Embedder,
        inbox: queue.Queue[IntakeUnit | Stop],
        outbox: queue.Queue[EmbeddedBatch | Stop],
        stopping: threading.Event,
        progress: Progress,
        *,
        batch_size: int,
        max_wait_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name="embed", daemon=True)
        self.embedder = embedder
        self.inbox = inbox
        self.outbox = outbox
        self.stopping = stopping
        self.progress = progress
        self.batch_size = batch_size
        self.max_wait_s = max_wait_s
        self.clock = clock
        self.error: BaseException | None = None

    def run(self) -> None:
        """Batch and embed until the sentinel arrives; then pass it on."""
        try:
            self._loop()
        except BaseException as exc:  # a bug: make the daemon exit loudly
            self.error = exc
            log.exception("stage_failed", stage="embed")
            self.stopping.set()
            drain_until_stop(self.inbox)  # type: ignore[arg-type]
        finally:
            put_until(self.outbox, STOP, threading.Event())

    def _loop(self) -> None:
        units: list[IntakeUnit] = []
        first_at = 0.0
        while True:
            timeout = None
            if units:
                timeout = max(0.0, first_at + self.max_wait_s - self.clock())
            try:
                item = self.inbox.get(timeout=timeout)
            except queue.Empty:
                item = None
            if isinstance(item, Stop):
                if units:
                    self._flush(units)
                return
            if item is not None:
                if not units:
                    first_at = self.clock()
                units.append(item)
            size = sum(len(u) for u in units)
            waited = self.clock() - first_at
            if units and (size >= self.batch_size or waited >= self.max_wait_s or item is None):
                self._flush(units)
                units = []

    def _flush(self, units: list[IntakeUnit]) -> None:
        prepared = [p for u in units for p in u.prepared]
        ready_at = tuple(t for u in units for t in u.ready_at)
        skipped = tuple(s for u in units for s in u.skipped)
        embedded: list[Embedded] = []
        for start in range(0, len(prepared), self.batch_size):
            chunk = prepared[start : start + self.batch_size]
            self.progress.begin("embed")
            try:
                vectors = self.embedder.embed(torch.stack([p.tensor for p in chunk]))
            finally:
                self.progress.end("embed")
            embedded.extend(
                Embedded(p.crop, np.array(vectors[i], dtype=np.float32))
                for i, p in enumerate(chunk)
            )
        put_until(self.outbox, EmbeddedBatch(tuple(embedded), ready_at, skipped), self.stopping)


class LinkStage(threading.Thread):
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
        inbox: queue.Queue[EmbeddedBatch | Stop],
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
        super().__init__(name="link", daemon=True)
        self.linker = linker
        self.store = store
        self.inbox = inbox
        self.stopping = stopping
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
        self.error: BaseException | None = None
        self.commit_error: str | None = None
        self._index_saved_at = clock()
        self._index_saved_n = len(linker)

    def run(self) -> None:
        """Assign and commit until the sentinel arrives; save the index at the end."""
        try:
            while True:
                item = self.inbox.get()
                if isinstance(item, Stop):
                    break
                self._handle(item)
                if self.clock() - self._index_saved_at >= self.index_save_s:
                    self.save_index()
            self.save_index()
        except BaseException as exc:
            self.error = exc
            log.exception("stage_failed", stage="link")
            self.stopping.set()
            drain_until_stop(self.inbox)  # type: ignore[arg-type]

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
        log.info("index_saved", crops=covers, seconds=round(time.perf_counter() - t0, 2))

    def _handle(self, item: EmbeddedBatch) -> None:
        self.progress.begin("link")
        try:
            result_seqs: range = range(0)
            merges: tuple[Merge, ...] = ()
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
        self._commit(committed, merges, item.skipped)
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
            log.warning("file_skipped", file=s.path, reason=s.skipped.reason)
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
        skipped: tuple[SkippedFile, ...],
    ) -> None:
        backoff = 1.0
        give_up_at: float | None = None
        while True:
            self.progress.begin("commit")
            try:
                self.store.commit_batch(self.batch_no, committed, merges, skipped, now=self.wall())
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
            if self.shutdown.is_set() or self.stopping.is_set():
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
        while not (self.shutdown.is_set() or self.stopping.is_set()):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.shutdown.wait(min(left, 0.1))
