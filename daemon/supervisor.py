"""``crop-clusterd run``: start the pipeline, keep it healthy, stop it cleanly.

Start-up: open the state folder (refusing one built with other settings),
restore the linker from it without re-embedding anything, load the model, start
the stages and the observer (the intake's first act is a full scan), then tell
systemd READY=1. While running, the main thread publishes STATUS= and the
``status`` figures every second, restarts a dead observer, and leaves the
watchdog pings to a thread that withholds them when a stage hangs. SIGTERM and
SIGINT stop intake; what is already decoded is embedded, assigned and
committed, then a final snapshot is written (STOPPING=1 first).
"""

from __future__ import annotations

import math
import os
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from .batch import make_embedder
from .config import Config
from .defaults import default_threshold
from .embed import Embedder
from .flatbug import TimeFormat
from .intake import IntakeOptions, IntakeStage, IntakeUnit
from .linking import Gating, HnswParams, LinkBatch, Linker, Motion, StoredLinks, make_linker
from .log import get_logger
from .notify import Notifier, Progress, WatchdogPinger, install_stack_dump
from .pipeline import BatchCommitted, EmbeddedBatch, EmbedStage, LinkStage
from .queues import Stop
from .snapshot import OutputFiles, SnapshotError, SnapshotWriter
from .store import StateError, StateStore, current_clusters, index_path
from .watch import ObserverFactory, Watcher

log = get_logger(__name__)


@dataclass(frozen=True)
class RunSummary:
    """What a run of the daemon did, for the exit summary."""

    crops: int
    clusters: int
    singletons: int
    skipped: int
    new_crops: int
    seconds: float


def linker_settings(config: Config) -> tuple[Linker, dict[str, object]]:
    """Build the linker the config asks for, and the settings a state folder must match."""
    link = config.link
    method = link.method
    threshold = link.threshold
    if threshold is None:
        threshold = default_threshold(method, config.embed.model)
    with_metadata = config.metadata.enabled
    gating = None
    motion = None
    if with_metadata and method == "cosine":
        gating = Gating(link.max_center_dist_px, link.near_window_s, link.any_window_s)
    if with_metadata and method == "track":
        motion = Motion(link.track_max_move_px, link.track_move_penalty)
    linker = make_linker(
        method,
        threshold,
        gating,
        gap_s=link.track_gap_s,
        gap_frames=link.track_gap_frames,
        memory=link.track_memory,
        motion=motion,
        hnsw=HnswParams(
            m=link.hnsw_m,
            ef_construction=link.hnsw_ef_construction,
            ef_search=link.hnsw_ef_search,
        ),
    )
    settings: dict[str, object] = {
        "embed.model": config.embed.model,
        "embed.from_pretrained": config.embed.from_pretrained,
        "embed.arch": config.embed.arch,
        "input.background": config.input.background,
        "input.time_format": config.input.time_format,
        "link.method": method,
        "link.threshold": threshold,
        "metadata.enabled": with_metadata,
    }
    if gating is not None:
        settings["link.gating"] = [
            gating.max_center_dist_px,
            gating.near_window_s,
            gating.any_window_s,
        ]
    if method == "track":
        settings["link.track"] = [
            link.track_gap_s,
            link.track_gap_frames,
            link.track_memory,
            link.track_max_move_px,
            link.track_move_penalty,
        ]
    return linker, settings


def restore_linker(linker: Linker, store: StateStore) -> int:
    """Bring a fresh linker to the stored state; return the next batch number.

    ``cosine`` takes the stored cluster ids plus the merges, and its saved
    HNSW index (new crops are added to it; nothing is linked again). ``track``
    replays the stored micro-batches in order, which reproduces its state
    exactly; the replayed ids are checked against the stored ones.
    """
    stored = store.load_crops()
    n = len(stored)
    if n and not np.array_equal(stored.seqs, np.arange(n)):
        raise RuntimeError(f"state database {store.path}: crop sequence numbers have gaps")
    next_batch = store.last_batch() + 1
    if n == 0:
        return next_batch
    t0 = time.perf_counter()
    merges = [m.merge for m in store.load_merges()]
    ids = current_clusters(stored.clusters, merges)
    used_index = linker.restore(
        StoredLinks(
            batch=LinkBatch(stored.vectors, stored.times, stored.centers, stored.frames),
            cluster_ids=ids,
            batch_numbers=stored.batches,
            index_file=index_path(store.folder),
            index_covers=int(store.get_meta("index_covers") or 0),
        )
    )
    log.info(
        "state_restored",
        crops=n,
        clusters=len(np.unique(ids)),
        merges=len(merges),
        saved_index=used_index,
        seconds=round(time.perf_counter() - t0, 2),
    )
    return next_batch


class Daemon:
    """The running service: owns the stages, the observer and the shutdown.

    ``snapshot_files`` writes the output files (default :class:`OutputFiles`);
    ``state_store`` opens the link stage's writer connection (default
    :class:`StateStore`). Both are seams for tests that inject a full disk.
    """

    def __init__(
        self,
        config: Config,
        *,
        embedder: Embedder | None = None,
        notifier: Notifier | None = None,
        exit_when_idle_s: float | None = None,
        snapshot_files: OutputFiles | None = None,
        state_store: Callable[[Path], StateStore] = StateStore,
        observer_factory: ObserverFactory | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.notifier = notifier if notifier is not None else Notifier.from_environ()
        self.exit_when_idle_s = exit_when_idle_s
        self.observer_factory = observer_factory
        self.clock = clock
        self.wall = wall
        self.stopping = threading.Event()
        self.progress = Progress(config.service.stall_s, clock=clock)
        self._embedder = embedder
        # Seams for fault tests: how snapshot files are written, and how the
        # link stage's writer connection to the state database is opened.
        self._snapshot_files = snapshot_files
        self._state_store = state_store
        self._link: LinkStage | None = None
        self._commits: deque[tuple[float, int]] = deque()
        self._last_commit_at = -math.inf
        self._total = 0
        self._lock = threading.Lock()
        self._snapshot_error: str | None = None
        self._last_snapshot: float | None = None
        self._clusters = 0

    # -- signals -----------------------------------------------------------------------

    def request_stop(self, reason: str = "requested") -> None:
        """Begin a clean shutdown (from a signal handler or another thread)."""
        if not self.stopping.is_set():
            log.info("stopping", reason=reason)
        self.stopping.set()

    def _install_signals(self) -> dict[int, Any]:
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            self.request_stop(signal.Signals(signum).name)

        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous[signum] = signal.signal(signum, on_signal)
            previous[signal.SIGUSR1] = install_stack_dump(log)
        return previous

    # -- the run -----------------------------------------------------------------------

    def run(self) -> RunSummary:
        """Run until stopped; return the summary. Raises on a failed stage."""
        started = self.clock()
        previous = self._install_signals()
        try:
            return self._run(started)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _run(self, started: float) -> RunSummary:
        config = self.config
        state_folder = config.state.folder
        store = self._state_store(state_folder)
        runtime = StateStore(state_folder)
        linker, settings = linker_settings(config)
        store.check_settings(settings)
        runtime.set_runtime(
            {
                "pid": os.getpid(),
                "phase": "starting",
                "started_at": self.wall(),
                "updated_at": self.wall(),
                "queue": 0,
                "last_snapshot_at": None,
                "snapshot_error": None,
                "state_error": None,
                "watch_mode": None,
            }
        )
        next_batch = restore_linker(linker, store)
        known = store.processed_paths()
        with self._lock:
            self._total = len(linker)
        crops_at_start = len(linker)

        embedder = self._embedder or make_embedder(config)
        self.notifier.status("loading model")
        t0 = time.perf_counter()
        embedder.load()
        log.info(
            "model_loaded", model=embedder.describe(), seconds=round(time.perf_counter() - t0, 2)
        )

        embed_inbox: queue.Queue[IntakeUnit | Stop] = queue.Queue(maxsize=4)
        link_inbox: queue.Queue[EmbeddedBatch | Stop] = queue.Queue(maxsize=2)
        failed = threading.Event()
        intake = IntakeStage(
            IntakeOptions(
                root=config.watch.folder,
                recursive=config.watch.recursive,
                settle_s=config.watch.settle_ms / 1000.0,
                rescan_s=config.watch.rescan_s,
                decode_retries=config.watch.decode_retries,
                retry_backoff_s=config.watch.retry_backoff_s,
                metadata=config.metadata.enabled,
                metadata_wait_s=config.metadata.wait_s,
                time_format=TimeFormat.compile(config.input.time_format),
                workers=config.input.workers,
                batch_size=config.embed.batch_size,
                background=config.input.background_rgb,
                max_pixels=config.input.max_pixels,
            ),
            embedder,
            embed_inbox,  # type: ignore[arg-type]
            self.stopping,
            known=known,
            clock=self.clock,
        )
        embed = EmbedStage(
            embedder,
            embed_inbox,
            link_inbox,
            failed,
            self.progress,
            batch_size=config.embed.batch_size,
            max_wait_s=config.embed.max_wait_ms / 1000.0,
            clock=self.clock,
        )
        link = LinkStage(
            linker,
            store,
            link_inbox,
            failed,
            self.progress,
            next_batch=next_batch,
            index_file=index_path(state_folder),
            index_save_s=config.state.index_save_s,
            on_commit=self._on_commit,
            shutdown=self.stopping,
            clock=self.clock,
            wall=self.wall,
        )
        self._link = link
        snapshots = SnapshotWriter(state_folder, config.output, files=self._snapshot_files)
        watcher = Watcher(
            config.watch.folder,
            intake.hint,
            recursive=config.watch.recursive,
            polling=config.watch.polling,
            poll_interval_s=config.watch.poll_interval_s,
            observer_factory=self.observer_factory,
            clock=self.clock,
        )
        pinger = WatchdogPinger(
            self.notifier,
            lambda: self.progress.healthy() and not failed.is_set(),
            stalled=self.progress.stalled,
        )
        for stage in (link, embed, intake):
            stage.start()
        watcher.start()
        pinger.start()
        log.info(
            "daemon_started",
            watch=str(config.watch.folder),
            watch_mode=watcher.mode,
            state=str(state_folder),
            output=str(config.output.folder),
            crops=crops_at_start,
            method=config.link.method,
            threshold=link.linker.threshold,
        )
        self.notifier.ready(self._status_line(intake, embed_inbox, link_inbox))

        next_snapshot = self.clock() + config.snapshot.interval_s
        idle_since: float | None = None
        try:
            while not self.stopping.is_set():
                if failed.is_set():
                    break
                self.stopping.wait(1.0)
                now = self.clock()
                if watcher.check():
                    intake.request_rescan()
                if now >= next_snapshot:
                    self._snapshot(snapshots, final=False)
                    next_snapshot = now + config.snapshot.interval_s
                line = self._status_line(intake, embed_inbox, link_inbox)
                self.notifier.status(line)
                self._publish(runtime, intake, embed_inbox, link_inbox, watcher, link, "running")
                if self.exit_when_idle_s is not None:
                    busy = (
                        intake.backlog()
                        or embed_inbox.qsize()
                        or link_inbox.qsize()
                        or self.progress.busy()
                        or intake.scans == 0
                    )
                    # Work that came and went between two looks counts too.
                    with self._lock:
                        last_commit = self._last_commit_at
                    if busy or (idle_since is not None and last_commit >= idle_since):
                        idle_since = None
                    elif idle_since is None:
                        idle_since = now
                    elif now - idle_since >= self.exit_when_idle_s:
                        self.request_stop("idle")
        finally:
            self.notifier.stopping()
            self.stopping.set()
            self._publish(runtime, intake, embed_inbox, link_inbox, watcher, link, "stopping")
            watcher.stop()
            intake.join()
            embed.join()
            link.join()
            pinger.stop()
            self._snapshot(snapshots, final=True)
            self._publish(runtime, intake, embed_inbox, link_inbox, watcher, link, "stopped")
            n_skipped = runtime.counts().skipped
            store.close()
            runtime.close()
        for stage in (intake, embed, link):
            if stage.error is not None:
                raise RuntimeError(f"the {stage.name} stage failed: {stage.error}") from stage.error
        ids = linker.cluster_ids()
        sizes = np.bincount(ids) if len(ids) else np.zeros(0, dtype=np.int64)
        for line in intake.tally.summary_lines():
            log.warning("crop_problems", summary=line)
        return RunSummary(
            crops=len(ids),
            clusters=int(np.count_nonzero(sizes)),
            singletons=int(np.count_nonzero(sizes == 1)),
            skipped=n_skipped,
            new_crops=len(ids) - crops_at_start,
            seconds=self.clock() - started,
        )

    # -- helpers -----------------------------------------------------------------------

    def _on_commit(self, report: BatchCommitted) -> None:
        now = self.clock()
        with self._lock:
            self._last_commit_at = now
            self._total = report.total_crops
            self._commits.append((now, report.crops))
            while self._commits and now - self._commits[0][0] > 60:
                self._commits.popleft()

    def _rate(self) -> float:
        now = self.clock()
        with self._lock:
            recent = sum(n for t, n in self._commits if now - t <= 60)
        return recent / 60.0

    def _snapshot(self, writer: SnapshotWriter, *, final: bool) -> None:
        now = self.wall()
        try:
            report = writer.write(now) if final else writer.write_if_changed(now)
        except (SnapshotError, StateError) as exc:
            # Logged by the writer; the previous files stay intact and the next
            # interval tries again.
            self._snapshot_error = str(exc)
            return
        self._snapshot_error = None
        if report is not None:
            self._last_snapshot = now
            self._clusters = report.clusters

    def _queue(
        self, intake: IntakeStage, embed_inbox: queue.Queue[Any], link_inbox: queue.Queue[Any]
    ) -> int:
        return intake.backlog() + embed_inbox.qsize() + link_inbox.qsize()

    def _status_line(
        self, intake: IntakeStage, embed_inbox: queue.Queue[Any], link_inbox: queue.Queue[Any]
    ) -> str:
        with self._lock:
            total = self._total
        last = "never"
        if self._last_snapshot is not None:
            last = time.strftime("%H:%M:%S", time.localtime(self._last_snapshot))
        depth = self._queue(intake, embed_inbox, link_inbox)
        line = (
            f"{total} crops, {self._clusters} clusters, queue {depth}, "
            f"{self._rate():.1f} crops/s, last snapshot {last}"
        )
        state_error = self._link.commit_error if self._link is not None else None
        if state_error:
            line += f"; STATE COMMIT FAILING: {state_error}"
        if self._snapshot_error:
            line += f"; SNAPSHOT FAILING: {self._snapshot_error}"
        stalled = self.progress.stalled()
        if stalled:
            line += "; STALLED: " + ", ".join(f"{stage} {secs:.0f} s" for stage, secs in stalled)
        return line

    def _publish(
        self,
        runtime: StateStore,
        intake: IntakeStage,
        embed_inbox: queue.Queue[Any],
        link_inbox: queue.Queue[Any],
        watcher: Watcher,
        link: LinkStage,
        phase: str,
    ) -> None:
        values: Mapping[str, object] = {
            "pid": os.getpid(),
            "phase": phase,
            "updated_at": self.wall(),
            "queue": self._queue(intake, embed_inbox, link_inbox),
            "last_snapshot_at": self._last_snapshot,
            "snapshot_error": self._snapshot_error,
            "state_error": link.commit_error,
            "watch_mode": watcher.mode,
        }
        try:
            runtime.set_runtime(values)
        except Exception as exc:  # status figures must never stop the daemon
            log.warning("runtime_publish_failed", reason=str(exc))
