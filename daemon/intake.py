"""Decode and preprocess crops in worker threads while the model embeds on this one.

Pillow decoding and resizing release the GIL, so a small thread pool keeps the model
fed. Only a bounded window of crops is in flight at any time (inputs can be a night's
million files) and results come back in input order.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .embed import RGB, Embedder
from .flatbug import (
    BOX_MISSING,
    MetadataIndex,
    ProblemTally,
    TimeFormat,
    describe_crop,
    parse_crop_name,
)
from .images import DEFAULT_MAX_PIXELS, DecodeError, load_rgb
from .log import get_logger
from .queues import STOP, put_until
from .records import Crop, Embedded, Skipped
from .store import SkippedFile
from .watch import FileSeen, Settler, kind, scan_tree

log = get_logger(__name__)

# Batches' worth of crops decoded ahead of the model; a third batch is being assembled.
_BATCHES_AHEAD = 2


def record_name(path: Path) -> str:
    """The name a file is known, stored and reported under: its path as text.

    Linux file names are bytes; one that is not valid UTF-8 would decode to lone
    surrogates, which SQLite, JSON logs and UTF-8 CSV readers all reject. Such
    bytes are written as ``\\xNN`` escapes instead (``crop_\\xff.png``), so the
    crop is still clustered and the same file always gets the same name.
    """
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    return text


@dataclass(frozen=True)
class Prepared:
    """A decoded crop, preprocessed into the embedder's input tensor (C x H x W)."""

    crop: Crop
    tensor: torch.Tensor


@dataclass(frozen=True)
class EmbedBatch:
    """One model batch worth of results: embedded crops and the ones skipped meanwhile."""

    embedded: tuple[Embedded, ...]
    skipped: tuple[Skipped, ...]


def prepare(
    crop: Crop,
    embedder: Embedder,
    *,
    background: RGB | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Prepared | Skipped:
    """Decode and preprocess one crop; an undecodable file becomes ``Skipped``.

    ``background`` defaults to the embedder's own, so transparency and letterbox
    padding share one colour.
    """
    colour = embedder.options.background if background is None else background
    try:
        image = load_rgb(crop.path, background=colour, max_pixels=max_pixels)
    except DecodeError as exc:
        return Skipped(crop.name, exc.reason)
    return Prepared(crop, embedder.preprocess(image))


def embed_crops(
    crops: Iterable[Crop],
    embedder: Embedder,
    *,
    batch_size: int = 32,
    workers: int = 2,
    background: RGB | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[EmbedBatch]:
    """Embed ``crops`` in order, decoding in ``workers`` threads, ``batch_size`` at a time.

    A batch is yielded once it has ``batch_size`` prepared crops (or ``batch_size``
    skipped ones, so a run of bad files cannot pile up), and at the end. Undecodable
    files come back as ``Skipped``; any other error propagates. At most about three
    batches of crops are held at once, however long ``crops`` is.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    # Load here so a missing model fails at once, on this thread, not inside a worker.
    embedder.load()
    limit = batch_size * _BATCHES_AHEAD
    source = iter(crops)
    pending: deque[Future[Prepared | Skipped]] = deque()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="crop-decode")

    def top_up() -> None:
        while len(pending) < limit:
            crop = next(source, None)
            if crop is None:
                return
            pending.append(
                pool.submit(prepare, crop, embedder, background=background, max_pixels=max_pixels)
            )

    prepared: list[Prepared] = []
    skipped: list[Skipped] = []
    try:
        top_up()
        while pending:
            result = pending.popleft().result()
            top_up()
            if isinstance(result, Skipped):
                skipped.append(result)
            else:
                prepared.append(result)
            if len(prepared) >= batch_size or len(skipped) >= batch_size:
                yield _embed_batch(embedder, prepared, skipped)
                prepared, skipped = [], []
        if prepared or skipped:
            yield _embed_batch(embedder, prepared, skipped)
    finally:
        # On an error or an abandoned generator, drop queued work instead of finishing it.
        pool.shutdown(wait=True, cancel_futures=True)


def _embed_batch(
    embedder: Embedder, prepared: list[Prepared], skipped: list[Skipped]
) -> EmbedBatch:
    if not prepared:
        return EmbedBatch(embedded=(), skipped=tuple(skipped))
    vectors = embedder.embed(torch.stack([p.tensor for p in prepared]))
    if vectors.shape[0] != len(prepared):
        raise RuntimeError(
            f"{embedder.name} returned {vectors.shape[0]} vectors for {len(prepared)} crops"
        )
    embedded = tuple(
        Embedded(p.crop, np.array(vectors[i], dtype=np.float32)) for i, p in enumerate(prepared)
    )
    return EmbedBatch(embedded=embedded, skipped=tuple(skipped))


# --- the daemon's intake stage ---------------------------------------------------------


@dataclass(frozen=True)
class IntakeUnit:
    """Crops released together by intake: one frame's ready crops, decoded.

    A unit is never split across link batches, so a frame's crops are matched
    together (what ``track`` needs to equal the batch result). ``ready_at`` is
    the monotonic time each crop's file was found ready, for latency figures.
    """

    prepared: tuple[Prepared, ...]
    ready_at: tuple[float, ...]
    skipped: tuple[SkippedFile, ...] = ()

    def __len__(self) -> int:
        return len(self.prepared)


# flat-bug writes a frame's crops in one burst, so once one of them has settled
# the rest settle within moments; a frame goes to the linker this long after its
# latest crop became ready (or at once, with metadata, when every box has its crop).
FRAME_QUIET_S = 0.25


@dataclass(frozen=True)
class IntakeOptions:
    """What the intake stage needs from the configuration."""

    root: Path
    recursive: bool = True
    settle_s: float = 0.5
    rescan_s: float = 60.0
    decode_retries: int = 3
    retry_backoff_s: float = 1.0
    metadata: bool = False
    metadata_wait_s: float = 10.0
    time_format: TimeFormat | None = None
    workers: int = 2
    batch_size: int = 32
    background: RGB | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass
class _Waiting:
    """Ready crops of one frame, held until the frame is complete or quiet."""

    files: list[FileSeen] = field(default_factory=list)
    ready_at: list[float] = field(default_factory=list)
    last_ready: float = 0.0
    metadata_logged: bool = False


@dataclass
class _Decoding:
    """A unit being decoded; units leave intake in the order they were released."""

    crops: list[Crop]
    ready_at: list[float]
    attempts: list[int]
    futures: list[Future[Prepared | Skipped]] = field(default_factory=list)


class IntakeStage(threading.Thread):
    """Turns file hints into decoded crops, ready for the model.

    Owns the record of which files are known (processed, in flight, or waiting
    for a retry), the settler and the metadata index. Every ``rescan_s`` (and
    at start, and after lost hints) it walks the tree, because observers drop
    events. A ready crop waits for its frame's metadata JSON (with metadata on)
    up to ``metadata_wait_s``, and for the frame to go quiet for ``settle_s``,
    so a frame's crops reach the linker together. Decode failures are retried
    with doubling backoff, then recorded as skipped; a file that vanished is
    logged, not recorded.
    """

    def __init__(
        self,
        options: IntakeOptions,
        embedder: Embedder,
        outbox: queue.Queue[Any],
        stopping: threading.Event,
        *,
        known: set[str],
        clock: Callable[[], float] = time.monotonic,
        tick_s: float = 0.05,
    ) -> None:
        super().__init__(name="intake", daemon=True)
        self.options = options
        self.embedder = embedder
        self.outbox = outbox
        self.stopping = stopping
        self.clock = clock
        self.tick_s = tick_s
        self.hints: queue.Queue[Path] = queue.Queue(maxsize=100_000)
        self.settler = Settler(options.root, options.settle_s, clock=clock)
        self.metadata_index = MetadataIndex() if options.metadata else None
        self.tally = ProblemTally()
        self.error: BaseException | None = None
        self._known = known
        self._settling: set[str] = set()
        self._waiting: dict[str, _Waiting] = {}
        self._to_decode: deque[_Decoding] = deque()
        self._decoding: deque[_Decoding] = deque()
        self._retries: list[tuple[float, int, Crop, float, int]] = []  # heap
        self._retry_counter = 0
        self._rescan_due = 0.0  # at once
        self._hints_lost = threading.Event()
        self._late_frames = 0
        self.scans = 0

    # -- called from other threads -----------------------------------------------------

    def hint(self, path: Path) -> None:
        """A file or folder may have appeared (the watcher's callback; never blocks)."""
        try:
            self.hints.put_nowait(path)
        except queue.Full:
            # Nothing is lost: the next rescan finds whatever these hints named.
            self._hints_lost.set()

    def request_rescan(self) -> None:
        """Walk the whole tree at the next tick (e.g. after the observer restarted)."""
        self._hints_lost.set()

    def backlog(self) -> int:
        """Files found but not yet handed to the model (for STATUS and idleness)."""
        decoding = sum(len(u.crops) for u in self._decoding) + sum(
            len(u.crops) for u in self._to_decode
        )
        waiting = sum(len(w.files) for w in self._waiting.values())
        return len(self._settling) + waiting + decoding + len(self._retries) + self.hints.qsize()

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> None:
        """Work until ``stopping`` is set; then pass the sentinel on."""
        pool = ThreadPoolExecutor(max_workers=self.options.workers, thread_name_prefix="decode")
        try:
            while not self.stopping.is_set():
                self._tick(pool)
                self._wait_for_hint()
        except BaseException as exc:  # a bug: make the daemon exit loudly
            self.error = exc
            log.exception("stage_failed", stage="intake")
            self.stopping.set()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            # The embed stage drains its inbox until the sentinel, so this returns.
            self.outbox.put(STOP)

    def _wait_for_hint(self) -> None:
        try:
            path = self.hints.get(timeout=self.tick_s)
        except queue.Empty:
            return
        self._route(path)

    def _tick(self, pool: ThreadPoolExecutor) -> None:
        now = self.clock()
        for _ in range(10_000):
            try:
                self._route(self.hints.get_nowait())
            except queue.Empty:
                break
        if now >= self._rescan_due or self._hints_lost.is_set():
            self._hints_lost.clear()
            self._scan(self.options.root)
            self._rescan_due = now + self.options.rescan_s
        self._settle(now)
        self._release_frames(now)
        self._release_retries(now)
        self._submit(pool)
        self._emit(now)

    def _route(self, path: Path) -> None:
        if os.path.isdir(path) and not os.path.islink(path):
            if self.options.recursive:
                self._scan(Path(path))
            return
        if kind(path) is None:
            return
        name = record_name(path)
        if name in self._known or name in self._settling:
            return
        self._settling.add(name)
        self.settler.offer(Path(path))

    def _scan(self, folder: Path) -> None:
        found = 0
        try:
            for seen in scan_tree(folder, recursive=self.options.recursive):
                name = record_name(seen.path)
                if name in self._known or name in self._settling:
                    continue
                self._settling.add(name)
                self.settler.offer(seen.path, seen)
                found += 1
        except OSError as exc:
            # The watched folder itself is unreachable (a mount away): try again later.
            log.warning("scan_failed", folder=str(folder), reason=str(exc))
            return
        if folder == self.options.root:
            self.scans += 1
            log.debug("rescanned", folder=str(folder), new_files=found)
        elif found:
            log.debug("folder_scanned", folder=str(folder), new_files=found)

    def _settle(self, now: float) -> None:
        result = self.settler.poll()
        for path in result.vanished:
            self._settling.discard(record_name(path))
            log.info("file_vanished", file=record_name(path))
        for path in result.not_regular:
            self._settling.discard(record_name(path))
            self._known.add(record_name(path))
            log.info("not_a_regular_file", file=record_name(path))
        for path, reason in result.failed:
            self._settling.discard(record_name(path))
            log.warning("stat_failed", file=record_name(path), reason=reason)
        for seen in result.ready:
            name = record_name(seen.path)
            self._settling.discard(name)
            if kind(seen.path) == "metadata":
                self._metadata_ready(seen)
                continue
            parsed = parse_crop_name(seen.path.name)
            frame = parsed.frame if parsed is not None else f"\0{name}"
            waiting = self._waiting.setdefault(frame, _Waiting())
            waiting.files.append(seen)
            waiting.ready_at.append(now)
            waiting.last_ready = now
            self._known.add(name)

    def _metadata_ready(self, seen: FileSeen) -> None:
        if self.metadata_index is None:
            return
        frame = self.metadata_index.add(seen.path)
        if frame is not None:
            self.metadata_index.invalidate(frame)

    def _release_frames(self, now: float) -> None:
        released: list[tuple[tuple[float, str], str, _Waiting, list[Crop]]] = []
        for frame, waiting in self._waiting.items():
            if now - waiting.last_ready < FRAME_QUIET_S and not self._frame_complete(
                frame, waiting
            ):
                continue  # more crops of this frame may still be settling
            index = self.metadata_index
            if index is not None and not frame.startswith("\0") and not index.has(frame):
                if now - waiting.ready_at[0] < self.options.metadata_wait_s:
                    continue
                self._late_frames += 1
                log.warning(
                    "metadata_missing",
                    frame=frame,
                    crops=len(waiting.files),
                    waited_s=self.options.metadata_wait_s,
                    frames_so_far=self._late_frames,
                )
            crops = [self._describe(seen) for seen in waiting.files]
            t = crops[0].time
            released.append(((math.inf if t is None else t, frame), frame, waiting, crops))
        released.sort(key=lambda r: r[0])
        cap = max(self.options.batch_size, 64)
        for _, frame, waiting, crops in released:
            del self._waiting[frame]
            for start in range(0, len(crops), cap):
                self._to_decode.append(
                    _Decoding(
                        crops[start : start + cap],
                        waiting.ready_at[start : start + cap],
                        [0] * len(crops[start : start + cap]),
                    )
                )

    def _frame_complete(self, frame: str, waiting: _Waiting) -> bool:
        """With metadata, a frame whose every box has a ready crop needs no quiet time."""
        if self.metadata_index is None or frame.startswith("\0"):
            return False
        for index in range(len(waiting.files) + 1):
            _, problem = self.metadata_index.center(frame, index)
            if problem is not None:
                return problem == BOX_MISSING and index == len(waiting.files)
        return False

    def _describe(self, seen: FileSeen) -> Crop:
        crop, problems = describe_crop(
            seen.path,
            record_name(seen.path),
            time_format=self.options.time_format,
            metadata=self.metadata_index,
        )
        if problems:
            self.tally.add(crop.name, problems)
        return dataclasses.replace(crop, size=seen.size, mtime_ns=seen.mtime_ns)

    def _release_retries(self, now: float) -> None:
        while self._retries and self._retries[0][0] <= now:
            _, _, crop, ready_at, attempts = heapq.heappop(self._retries)
            self._to_decode.append(_Decoding([crop], [ready_at], [attempts]))

    def _in_flight(self) -> int:
        return sum(len(u.futures) for u in self._decoding)

    def _submit(self, pool: ThreadPoolExecutor) -> None:
        limit = _BATCHES_AHEAD * self.options.batch_size
        while self._to_decode and self._in_flight() < limit:
            unit = self._to_decode.popleft()
            unit.futures = [
                pool.submit(
                    prepare,
                    crop,
                    self.embedder,
                    background=self.options.background,
                    max_pixels=self.options.max_pixels,
                )
                for crop in unit.crops
            ]
            self._decoding.append(unit)

    def _emit(self, now: float) -> None:
        while self._decoding and all(f.done() for f in self._decoding[0].futures):
            unit = self._decoding.popleft()
            prepared: list[Prepared] = []
            ready_at: list[float] = []
            skipped: list[SkippedFile] = []
            for crop, t, attempts, future in zip(
                unit.crops, unit.ready_at, unit.attempts, unit.futures, strict=True
            ):
                try:
                    result = future.result()
                except Exception as exc:  # an unforeseen decoder failure is a skip, not a crash
                    log.exception("decode_crashed", file=crop.name)
                    result = Skipped(crop.name, f"decoder error: {type(exc).__name__}: {exc}")
                if isinstance(result, Prepared):
                    prepared.append(result)
                    ready_at.append(t)
                elif not crop.path.exists() and not crop.path.is_symlink():
                    # Deleted or renamed between event and decode: not an error.
                    self._known.discard(crop.name)
                    log.info("file_vanished", file=crop.name)
                elif attempts < self.options.decode_retries:
                    delay = self.options.retry_backoff_s * 2**attempts
                    self._retry_counter += 1
                    heapq.heappush(
                        self._retries, (now + delay, self._retry_counter, crop, t, attempts + 1)
                    )
                    log.info(
                        "decode_retry",
                        file=crop.name,
                        reason=result.reason,
                        attempt=attempts + 1,
                        in_s=delay,
                    )
                else:
                    skipped.append(SkippedFile(result, crop.name, crop.size, crop.mtime_ns))
            unit_out = IntakeUnit(tuple(prepared), tuple(ready_at), tuple(skipped))
            if (prepared or skipped) and not put_until(self.outbox, unit_out, self.stopping):
                return  # stopping: whatever was not handed on is found again at restart
