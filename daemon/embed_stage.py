"""The daemon's embed stage: intake units in, embedded micro-batches out.

A micro-batch is the unit the link stage assigns and commits in one
transaction; batching trades a little latency (``max_wait_s``) for the model's
throughput on a batch. A forward that runs out of device memory is split
(:mod:`crop_clusterd.oomsplit`); a crop that runs out alone is committed as
skipped, with the reason, like an undecodable file.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import numpy as np

from .embed import Embedder
from .notify import Progress
from .oomsplit import OomSplitter
from .records import DecodeFailure, Embedded, IntakeUnit, MicroBatch
from .stage import Stage, Stop


class EmbedStage(Stage[IntakeUnit, MicroBatch]):
    """Groups intake units into micro-batches and runs the model on them.

    A micro-batch is flushed when it holds ``batch_size`` crops or when its
    first unit has waited ``max_wait_s``, whichever comes first (watchdog's
    debouncer pattern). Units are kept whole; the model is called in chunks of
    at most ``batch_size`` (fewer after an out-of-memory error, see
    :class:`~crop_clusterd.oomsplit.OomSplitter`). ``max_wait_s`` is in seconds
    of ``clock``. A failure sets ``stopping`` (the pipeline's failure event).
    """

    def __init__(
        self,
        embedder: Embedder,
        inbox: queue.Queue[IntakeUnit | Stop],
        outbox: queue.Queue[MicroBatch | Stop],
        stopping: threading.Event,
        progress: Progress,
        *,
        batch_size: int,
        max_wait_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__("embed", inbox, outbox, stopping)
        self.embedder = embedder
        self.splitter = OomSplitter(embedder)
        self.progress = progress
        self.batch_size = batch_size
        self.max_wait_s = max_wait_s
        self.clock = clock
        self._units: list[IntakeUnit] = []
        self._first_at = 0.0

    def handle(self, item: IntakeUnit) -> None:
        """Add a unit; flush when the batch is full or its first unit waited long enough."""
        if not self._units:
            self._first_at = self.clock()
        self._units.append(item)
        size = sum(len(u) for u in self._units)
        if size >= self.batch_size or self.clock() - self._first_at >= self.max_wait_s:
            self._flush()

    def timeout(self) -> float | None:
        """Until the held batch's first unit has waited ``max_wait_s``; for ever when empty."""
        if not self._units:
            return None
        return max(0.0, self._first_at + self.max_wait_s - self.clock())

    def idle(self) -> None:
        """The held batch waited ``max_wait_s``: flush it."""
        if self._units:
            self._flush()

    def finish(self) -> None:
        """Flush what is held at the end of the stream."""
        if self._units:
            self._flush()

    def _flush(self) -> None:
        units, self._units = self._units, []
        prepared = [p for u in units for p in u.prepared]
        ready_at = tuple(t for u in units for t in u.ready_at)
        skipped = [s for u in units for s in u.skipped]
        moved = tuple(m for u in units for m in u.moved)
        embedded: list[Embedded] = []
        kept_at: list[float] = []
        for start in range(0, len(prepared), self.batch_size):
            chunk = prepared[start : start + self.batch_size]
            self.progress.begin("embed")
            try:
                result = self.splitter.embed([p.tensor for p in chunk])
            finally:
                self.progress.end("embed")
            for row, vector in zip(result.rows, result.vectors, strict=True):
                embedded.append(Embedded(chunk[row].crop, np.array(vector, dtype=np.float32)))
                kept_at.append(ready_at[start + row])
            for row, reason in result.failed:
                c = chunk[row].crop
                skipped.append(
                    DecodeFailure(c.name, reason, c.size, c.mtime_ns, c.inode, c.content)
                )
        batch = MicroBatch(tuple(embedded), tuple(kept_at), tuple(skipped), moved)
        self.emit(batch, give_up=self.failed)
