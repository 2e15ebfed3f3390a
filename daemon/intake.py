"""The daemon's intake stage: file hints in, decoded frames of crops out.

The watcher's hints and a periodic rescan find files; the settler waits until
each has stopped changing; crops wait for their frame (its metadata JSON, its
other crops) and are then decoded in a small thread pool (:mod:`.decode`) and
handed to the embed stage as :class:`~crop_clusterd.records.IntakeUnit`.
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
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .decode import BATCHES_AHEAD, prepare, record_name
from .embed import RGB, Embedder
from .flatbug import (
    BOX_MISSING,
    MetadataIndex,
    ProblemTally,
    TimeFormat,
    describe_crop,
    frame_of_path,
)
from .identity import Entry, Fingerprint, Registry, changed_since, content_hash, touched_paths
from .log import get_logger
from .records import Crop, DecodeFailure, FrameId, IntakeUnit, Moved, Prepared, Skipped
from .scan import RACY_S, VerifyWalk
from .stage import Stage, Stop
from .watch import DirMtimes, FileSeen, Settler, kind, scan_tree

log = get_logger(__name__)


# flat-bug writes a frame's crops in one burst, so once one of them has settled
# the rest settle within moments; a frame goes to the linker this long after its
# latest crop became ready (or at once, with metadata, when every box has its crop).
FRAME_QUIET_S = 0.25

# Files of a scan looked up in the state database together (one query each batch).
_LOOKUP_BATCH = 256


@dataclass(frozen=True)
class IntakeOptions:
    """What the intake stage needs from the configuration (see :func:`.pipeline.intake_options`).

    Times are in seconds. No defaults here: the config schema holds them, once.
    """

    root: Path
    recursive: bool
    settle_s: float
    rescan_s: float
    decode_retries: int
    retry_backoff_s: float
    metadata: bool
    metadata_wait_s: float
    time_format: TimeFormat | None
    workers: int
    batch_size: int
    background: RGB | None
    max_pixels: int


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


def _release_order(
    item: tuple[float, FrameId | str, _Waiting, list[Crop]],
) -> tuple[float, str, str, str]:
    """Frames leave by time, then name, then trap; a lone crop by its file name."""
    t, frame, _, _ = item
    if isinstance(frame, str):
        return (t, frame, "", "")
    return (t, frame.name, frame.trap.place, frame.trap.identifier)


class IntakeStage(Stage[Path, IntakeUnit]):
    """Turns file hints into decoded crops, ready for the model.

    Owns the registry of known files (:mod:`.identity`: committed ones are
    looked up in the state database, in-flight ones held until the link stage
    reports them committed through ``committed``), the settler and the
    metadata index. A known path whose stat changed is looked at again: the
    same bytes only refresh its stat, other bytes make it a new crop (a
    skipped file is tried again, a clustered one is retired and embedded
    again). A new path holding a known file whose old path is gone is a move:
    the stored row follows it. Every ``rescan_s`` it walks the tree, because
    observers drop events, but lists only the directories whose mtime changed
    since the previous walk and enters none that is frozen (``dirs``, see
    :class:`~crop_clusterd.watch.DirMtimes`, kept across restarts when it has a
    cache; a hint thaws its folder); after lost hints (or an observer
    restart), or at a start without a stored walk, it lists every directory.
    Once the watcher's start is over (``watches_set``) it rescans once more,
    then a throttled verify walk (:class:`~crop_clusterd.scan.VerifyWalk`, one
    slice a tick, none in a tick that routed hints or rescanned) stats every
    file, for what no directory's mtime tells; ``verified`` says when it is over.
    A ready crop waits for its frame's metadata JSON (with metadata
    on) up to ``metadata_wait_s``, and for the frame to go quiet for
    ``settle_s``, so a frame's crops reach the linker together. Decode
    failures are retried with doubling backoff, then recorded as skipped; a
    file that vanished is logged, not recorded.

    A source stage: it works until ``stopping`` (the daemon's stop) is set, and
    a failure sets ``stopping`` too.
    """

    def __init__(
        self,
        options: IntakeOptions,
        embedder: Embedder,
        outbox: queue.Queue[IntakeUnit | Stop],
        stopping: threading.Event,
        *,
        known: Registry,
        committed: queue.SimpleQueue[tuple[str, ...]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        tick_s: float = 0.05,
        dirs: DirMtimes | None = None,
    ) -> None:
        # The inbox holds the watcher's hints, never STOP: the intake stops when
        # `stopping` is set, and its own failure stops the daemon (`failed` is `stopping`).
        hints: queue.Queue[Path | Stop] = queue.Queue(maxsize=100_000)
        super().__init__("intake", hints, outbox, stopping, until=stopping)
        self.options = options
        self.embedder = embedder
        self.clock = clock
        self.tick_s = tick_s
        self.settler = Settler(options.root, options.settle_s, clock=clock)
        self.metadata_index = MetadataIndex() if options.metadata else None
        self.tally = ProblemTally()
        self._pool = ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="decode")
        self._known = known
        # The link stage's reports of committed paths (see identity.touched_paths).
        self._committed = committed if committed is not None else queue.SimpleQueue()
        self._dirs = dirs if dirs is not None else DirMtimes()
        self._settling: set[str] = set()
        # Files hinted while pending (see _route); at most the files in flight.
        self._recheck: set[Path] = set()
        # Keyed by flat-bug frame (name, identifier, trap folder), or by the file's
        # name for a crop that has no frame (a frame of its own).
        self._waiting: dict[FrameId | str, _Waiting] = {}
        self._moved: list[Moved] = []
        self._to_decode: deque[_Decoding] = deque()
        self._decoding: deque[_Decoding] = deque()
        self._retries: list[tuple[float, int, Crop, float, int]] = []  # heap
        self._retry_counter = 0
        self._rescan_due = 0.0  # at once
        self._hints_lost = threading.Event()
        self._watches_set = threading.Event()
        self.first_scan_done = threading.Event()
        self._verify: VerifyWalk | None = None
        self._verify_done = False
        self._routed = 0  # hints routed since the last tick: the verify walk waits
        self._late_frames = 0
        self.scans = 0

    # -- called from other threads -----------------------------------------------------

    def hint(self, path: Path) -> None:
        """A file or folder may have appeared (the watcher's callback; never blocks)."""
        try:
            self.inbox.put_nowait(path)
        except queue.Full:
            # Nothing is lost: the next rescan finds whatever these hints named.
            self._hints_lost.set()

    def request_rescan(self) -> None:
        """Walk the whole tree at the next tick (e.g. after the observer restarted)."""
        self._hints_lost.set()

    def watches_set(self, running: bool) -> None:
        """The watcher's start is over (its callback, from its thread): the intake
        rescans the changed folders once more, then begins the verify walk."""
        self._watches_set.set()

    @property
    def verified(self) -> bool:
        """Whether the verify walk after the start is over (``verify_walk_done``)."""
        return self._verify_done

    def registry_held(self) -> int:
        """Paths the registry holds in memory: work in flight, not committed files."""
        return len(self._known)

    def backlog(self) -> int:
        """Files found but not yet handed to the model (for STATUS and idleness)."""
        decoding = sum(len(u.crops) for u in self._decoding) + sum(
            len(u.crops) for u in self._to_decode
        )
        waiting = sum(len(w.files) for w in self._waiting.values())
        queued = len(self._retries) + len(self._recheck) + self.inbox.qsize()
        return len(self._settling) + waiting + decoding + queued

    # -- the loop ----------------------------------------------------------------------

    def handle(self, item: Path) -> None:
        """Route one hint (a file or folder that may have appeared)."""
        self._routed += 1
        self._route(item)

    def timeout(self) -> float:
        """Wait for a hint at most one tick."""
        return self.tick_s

    def poll(self) -> None:
        """One tick: route queued hints, rescan when due, settle, release, decode, emit."""
        self._tick()

    def close(self) -> None:
        """Drop queued decodes; stop the decoder threads; close the registry's lookup;
        mark the folders of files still in flight to be listed at the next start."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._known.close()
        in_flight = [Path(name) for name in self._settling] + list(self._recheck)
        in_flight += [seen.path for w in self._waiting.values() for seen in w.files]
        in_flight += [c.path for u in (*self._to_decode, *self._decoding) for c in u.crops]
        in_flight += [retry[2].path for retry in self._retries]
        for path in in_flight:
            self._dirs.forget(path.parent)
        self._dirs.flush_forgotten()
        if self._dirs.cache is not None:
            self._dirs.cache.close()

    def _tick(self) -> None:
        now = self.clock()
        while True:
            try:
                paths = self._committed.get_nowait()
            except queue.Empty:
                break
            self._known.committed(paths)
        self._recheck_handed_on()
        for _ in range(10_000):
            try:
                hint = self.inbox.get_nowait()
            except queue.Empty:
                break
            if not isinstance(hint, Stop):
                self._routed += 1
                self._route(hint)
        watched = self._watches_set.is_set() and self._verify is None and not self._verify_done
        if now >= self._rescan_due or self._hints_lost.is_set() or watched:
            self._rescan(now)
            if watched:
                # The rescan began after the watches were set: a file that came
                # before them changed its folder's mtime and was found by it; one
                # rewritten in place before them is the verify walk's.
                root, recursive = self.options.root, self.options.recursive
                self._verify = VerifyWalk(root, recursive=recursive, clock=self.clock)
                log.info("verify_walk_started", folder=str(self.options.root))
        elif self._verify is not None and not self._routed and self.inbox.empty():
            self._verify_slice()  # new hints and changed folders go first
        self._routed = 0
        self._settle(now)
        self._release_frames(now)
        self._release_retries(now)
        self._submit()
        self._emit(now)

    def _rescan(self, now: float) -> None:
        """Walk the tree, listing the changed folders only unless events were lost
        (then rewrites in unchanged folders too) or no walk is stored to compare with."""
        first = self.scans == 0 and not self._dirs.restore()
        full = self._hints_lost.is_set() or first
        self._hints_lost.clear()
        self._scan(self.options.root, dirs=self._dirs, full=full)
        self._rescan_due = now + self.options.rescan_s
        self.first_scan_done.set()  # also when it failed: the watcher retries alone

    def _verify_slice(self) -> None:
        """Offer the changed files among the verify walk's next slice of files."""
        assert self._verify is not None
        try:
            if self._verify.step(self._offer_checked, _LOOKUP_BATCH):
                self._verify, self._verify_done = None, True
        finally:
            self._known.prefetch(())

    def _offer_checked(self, batch: list[FileSeen]) -> int:
        """A walk's offer. Metadata is not in the state, so each JSON a walk finds
        is new to a restarted daemon; one unchanged for longer than settling takes
        (and any clock skew) is indexed at once rather than settled again."""
        settled = self._dirs.clock_ns() - int((RACY_S + self.options.settle_s) * 1e9)
        rest: list[FileSeen] = []
        for seen in batch:
            if kind(seen.path) == "metadata" and seen.mtime_ns < settled:
                if record_name(seen.path) not in self._settling:
                    self._metadata_ready(seen)
            else:
                rest.append(seen)
        return self._offer_scanned(rest)

    def _route(self, path: Path) -> None:
        # An event from a frozen folder: walk it again (and it freezes again once quiet).
        self._dirs.thaw(Path(path).parent)
        if os.path.isdir(path) and not os.path.islink(path):
            if self.options.recursive:
                self._scan(Path(path))
            return
        if kind(path) is None:
            return
        name = record_name(path)
        if name in self._settling:
            return  # the settler's next stat sees any change
        entry = self._known.get(name)
        if entry is not None and entry.kind == "pending":
            # Hashed and on its way: a change now (a rewrite in place) is looked at
            # once it is handed on, since a rescan may not list its folder again.
            self._recheck.add(Path(path))
            return
        if not changed_since(entry, None, path):
            return
        self._settling.add(name)
        self.settler.offer(Path(path))

    def _recheck_handed_on(self) -> None:
        """Route again the files hinted while they were pending, once they are not."""
        for path in list(self._recheck):
            entry = self._known.get(record_name(path))
            if entry is None or entry.kind != "pending":
                self._recheck.discard(path)
                self._route(path)

    def _scan(self, folder: Path, *, dirs: DirMtimes | None = None, full: bool = True) -> None:
        """Offer the new and changed files under ``folder``; with ``dirs``, skip the
        directories unchanged since the previous scan (unless ``full``)."""
        found = 0
        if dirs is not None:
            dirs.begin(full=full)
        batch: list[FileSeen] = []
        try:
            for seen in scan_tree(folder, recursive=self.options.recursive, dirs=dirs):
                batch.append(seen)
                if len(batch) == _LOOKUP_BATCH:
                    found += self._offer_checked(batch)
                    batch = []
            found += self._offer_checked(batch)
        except OSError as exc:
            # The watched folder itself is unreachable (a mount away): try again later.
            log.warning("scan_failed", folder=str(folder), reason=str(exc))
            return
        finally:
            self._known.prefetch(())
        if dirs is not None:
            self.scans += 1
            log.debug(
                "rescanned",
                folder=str(folder),
                new_files=found,
                full=full,
                dirs_listed=dirs.listed,
                dirs_unchanged=dirs.unchanged,
                dirs_frozen=dirs.frozen,
            )
        elif found:
            log.debug("folder_scanned", folder=str(folder), new_files=found)

    def _offer_scanned(self, batch: list[FileSeen]) -> int:
        """Offer the new and changed files of a scan's batch; how many were offered."""
        names = [record_name(seen.path) for seen in batch]
        self._known.prefetch(names)  # one look-up in the state database for the batch
        found = 0
        for name, seen in zip(names, batch, strict=True):
            if name in self._settling or not changed_since(self._known.get(name), seen, seen.path):
                continue
            self._settling.add(name)
            self.settler.offer(seen.path, seen)
            found += 1
        return found

    def _settle(self, now: float) -> None:
        result = self.settler.poll()
        for path in result.vanished:
            self._settling.discard(record_name(path))
            log.info("file_vanished", file=record_name(path))
        for path in result.not_regular:
            self._settling.discard(record_name(path))
            self._known.set(record_name(path), "pending", None, None)
            log.info("not_a_regular_file", file=record_name(path))
        for path, reason in result.failed:
            self._settling.discard(record_name(path))
            self._dirs.forget(path.parent)  # so that the next rescan offers it again
            log.warning("stat_failed", file=record_name(path), reason=reason)
        for seen in result.ready:
            name = record_name(seen.path)
            self._settling.discard(name)
            if kind(seen.path) == "metadata":
                self._metadata_ready(seen)
                continue
            content = self._identify(name, seen)
            if content is None:
                continue
            frame: FrameId | str = frame_of_path(seen.path) or name
            waiting = self._waiting.setdefault(frame, _Waiting())
            waiting.files.append(seen)
            waiting.ready_at.append(now)
            waiting.last_ready = now

    def _identify(self, name: str, seen: FileSeen) -> str | None:
        """Hash a settled crop and decide what it is; its hash when it is to be embedded.

        None when it needs no embedding: a move or a stat-only change (queued
        as :class:`Moved` for the link stage to commit) or a file that vanished.
        """
        fingerprint = Fingerprint(seen.size, seen.mtime_ns, seen.inode)
        try:
            content = content_hash(seen.path)
        except OSError as exc:
            self._dirs.forget(seen.path.parent)  # unreadable rather than gone: look again
            log.info("file_vanished", file=name, reason=str(exc))
            return None
        entry = self._known.get(name)
        if entry is not None and entry.kind != "pending" and entry.content == content:
            old: str | None = name  # the same bytes with a new stat (touched, copied over)
        else:
            old = self._known.moved_from(fingerprint, content)
        if old is None:
            if entry is None:
                entry = self._moved_and_rewritten(name, seen)
            if entry is not None and entry.kind == "crop":
                log.info("crop_rewritten", file=name, note="embedded again; the old one retired")
            elif entry is not None:
                log.info("file_changed", file=name, was=entry.kind, note="tried again")
            self._known.set(name, "pending", fingerprint, content)
            return content
        moved = self._known.get(old)
        kind_ = moved.kind if moved is not None and moved.kind != "pending" else "crop"
        if old != name:
            self._known.vacate(old)
        self._known.set(name, kind_, fingerprint, content)
        self._moved.append(Moved(old, name, kind_, seen.size, seen.mtime_ns, seen.inode, content))
        return None

    def _moved_and_rewritten(self, name: str, seen: FileSeen) -> Entry | None:
        """A known file moved here and changed (its inode, old path gone): its row
        follows it here, to be retired when the new content is committed."""
        old = self._known.replaced(seen.inode)
        entry = self._known.get(old) if old is not None else None
        if old is None or entry is None or entry.kind == "pending":
            return None
        self._known.vacate(old)
        # No stat: should the daemon stop before the new content is committed,
        # the next start finds this row changed and embeds the file again.
        self._moved.append(Moved(old, name, entry.kind, None, None, None, None))
        return entry

    def _metadata_ready(self, seen: FileSeen) -> None:
        if self.metadata_index is None:
            return
        frame = self.metadata_index.add(seen.path)
        if frame is not None:  # a rewritten JSON must be read again
            self.metadata_index.invalidate(frame)

    def _release_frames(self, now: float) -> None:
        released: list[tuple[float, FrameId | str, _Waiting, list[Crop]]] = []
        for frame, waiting in self._waiting.items():
            if now - waiting.last_ready < FRAME_QUIET_S and not self._frame_complete(
                frame, waiting
            ):
                continue  # more crops of this frame may still be settling
            index = self.metadata_index
            if index is not None and isinstance(frame, FrameId) and not index.has(frame):
                if now - waiting.ready_at[0] < self.options.metadata_wait_s:
                    continue
                self._late_frames += 1
                log.warning(
                    "metadata_missing",
                    frame=str(frame),
                    crops=len(waiting.files),
                    waited_s=self.options.metadata_wait_s,
                    frames_so_far=self._late_frames,
                )
            crops = [self._describe(seen) for seen in waiting.files]
            t = crops[0].time
            released.append((math.inf if t is None else t, frame, waiting, crops))
        released.sort(key=_release_order)
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

    def _frame_complete(self, frame: FrameId | str, waiting: _Waiting) -> bool:
        """With metadata, a frame whose every box has a ready crop needs no quiet time."""
        if self.metadata_index is None or not isinstance(frame, FrameId):
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
        entry = self._known.get(crop.name)
        return dataclasses.replace(
            crop,
            size=seen.size,
            mtime_ns=seen.mtime_ns,
            inode=seen.inode,
            content=entry.content if entry is not None else None,
        )

    def _release_retries(self, now: float) -> None:
        while self._retries and self._retries[0][0] <= now:
            _, _, crop, ready_at, attempts = heapq.heappop(self._retries)
            crop = self._restat(crop)
            self._to_decode.append(_Decoding([crop], [ready_at], [attempts]))

    def _restat(self, crop: Crop) -> Crop:
        """A retried crop with its identity now: the retry reads what is there now
        (a truncated file may have been completed or replaced meanwhile)."""
        try:
            st = os.lstat(crop.path)
            content = content_hash(crop.path)
        except OSError:
            return crop  # the decode reports what happened
        self._known.set(crop.name, "pending", Fingerprint.of(st), content)
        return dataclasses.replace(
            crop, size=st.st_size, mtime_ns=st.st_mtime_ns, inode=st.st_ino, content=content
        )

    def _in_flight(self) -> int:
        return sum(len(u.futures) for u in self._decoding)

    def _submit(self) -> None:
        limit = BATCHES_AHEAD * self.options.batch_size
        while self._to_decode and self._in_flight() < limit:
            unit = self._to_decode.popleft()
            unit.futures = [
                self._pool.submit(
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
        if self._moved:
            # Moves need no model: they pass the embed stage as they are, ahead of
            # any crop found after them (a moved-and-rewritten row must move first).
            moved, self._moved = tuple(self._moved), []
            self._known.sent(touched_paths((), moved))
            if not self.emit(IntakeUnit((), (), (), moved), give_up=self.failed):
                return
        while self._decoding and all(f.done() for f in self._decoding[0].futures):
            unit = self._decoding.popleft()
            prepared: list[Prepared] = []
            ready_at: list[float] = []
            skipped: list[DecodeFailure] = []
            for crop, t, attempts, future in zip(
                unit.crops, unit.ready_at, unit.attempts, unit.futures, strict=True
            ):
                try:
                    result = future.result()
                except Exception as exc:  # an unforeseen decoder failure is a skip, not a crash
                    log.exception("decode_crashed", file=crop.name)
                    result = Skipped(crop.name, f"decoder error: {type(exc).__name__}: {exc}")
                if isinstance(result, Prepared):
                    self._known.mark(crop.name, "crop")
                    prepared.append(result)
                    ready_at.append(t)
                elif not crop.path.exists() and not crop.path.is_symlink():
                    # Deleted or renamed between event and decode: not an error.
                    self._known.forget(crop.name)
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
                    self._known.mark(crop.name, "skip")
                    skipped.append(
                        DecodeFailure(
                            result.name,
                            result.reason,
                            crop.size,
                            crop.mtime_ns,
                            crop.inode,
                            crop.content,
                        )
                    )
            unit_out = IntakeUnit(tuple(prepared), tuple(ready_at), tuple(skipped))
            names = [p.crop.name for p in prepared] + [s.name for s in skipped]
            self._known.sent(touched_paths(names, ()))
            if (prepared or skipped) and not self.emit(unit_out, give_up=self.failed):
                return  # stopping: whatever was not handed on is found again at restart
