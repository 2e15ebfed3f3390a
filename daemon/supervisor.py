"""``crop-clusterd run``: start the pipeline, keep it healthy, stop it cleanly.

Start-up: lock the state folder (one daemon per folder, see ``statelock``), open
it (refusing one built with other settings),
restore the linker from it without re-embedding anything, load the model, start
the stages (the intake's first act is a scan of the folders changed since the
stored one) and the observer, without waiting for its watches, then tell
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

from .config import Config
from .diskspace import DiskWatch, free_mb
from .embed import Embedder
from .embed_stage import EmbedStage
from .factory import embedder_from_config, linker_from_config, state_settings
from .identity import Registry
from .intake import IntakeStage
from .link_stage import LinkStage
from .log import get_logger
from .notify import Notifier, Progress, WatchdogPinger, install_stack_dump
from .pipeline import EMBED_INBOX_SIZE, LINK_INBOX_SIZE, Pipeline, intake_options
from .records import BatchCommitted, IntakeUnit, MicroBatch
from .scancache import SCAN_CACHE_NAME, ScanCache
from .sessionbook import SessionBook
from .sessions import session_rule
from .snapshot import OutputFiles, SnapshotError, SnapshotWriter
from .stage import Stop
from .statelock import StateLock
from .store import StateError, StateStore, session_cluster_sizes
from .storedfiles import StoredFiles
from .thumbs import ThumbWriter
from .watch import DirMtimes, ObserverFactory, Watcher

log = get_logger(__name__)


@dataclass(frozen=True)
class RunSummary:
    """What a run of the daemon did, for the exit summary.

    ``crops``, ``clusters`` and ``singletons`` count the live crops of the
    ``sessions`` this run committed to (and the one open when it started);
    ``new_crops`` the crops it committed; ``seconds`` its run time.
    """

    crops: int
    clusters: int
    singletons: int
    skipped: int
    new_crops: int
    seconds: float
    sessions: tuple[str, ...] = ()


class Daemon:
    """The running service: owns the stages, the observer and the shutdown.

    ``snapshot_files`` writes the output files (default :class:`OutputFiles`);
    ``state_store`` opens the link stage's writer connection (default
    :class:`StateStore`). Both are seams for tests that inject a full disk;
    ``free_space`` (MB free in a folder, default :func:`~crop_clusterd.diskspace.free_mb`)
    one for tests of a filling disk.
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
        free_space: Callable[[Path], int] = free_mb,
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
        self._commits: deque[tuple[float, int]] = deque()
        self._last_commit_at = -math.inf
        self._total = 0
        self._publish_error: str | None = None
        # Sessions this run committed to (and the one open at start): the summary's scope.
        self._sessions_touched: set[str] = set()
        self._lock = threading.Lock()
        self._snapshot_error: str | None = None
        self._last_snapshot: float | None = None
        self._clusters = 0
        self._disk = DiskWatch(
            config.state.folder, config.output.folder, config.state.min_free_mb, free_space
        )
        # The running pipeline, for readers on other threads (tests wait on its
        # stages); set once everything has started, never replaced.
        self.pipeline: Pipeline | None = None

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
        """Run until stopped; return the summary.

        Raises ``RuntimeError`` on a failed stage, and
        :class:`~crop_clusterd.statelock.StateLockedError` at once, before anything is
        written, when another daemon holds the state folder.
        """
        started = self.clock()
        # Taken before anything is written to the state folder, held to the end.
        lock = StateLock(self.config.state.folder)
        lock.acquire()
        previous = self._install_signals()
        try:
            pipeline = self._start()
            self.pipeline = pipeline
            try:
                self._supervise(pipeline)
            finally:
                skipped = self._shut_down(pipeline)
            return self._summary(pipeline, skipped, started)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            lock.release()

    # -- start-up ----------------------------------------------------------------------

    def _start(self) -> Pipeline:
        """Open the state, restore the linker, load the model, start everything; READY."""
        config = self.config
        store = self._state_store(config.state.folder)
        runtime = StateStore(config.state.folder)
        store.check_settings(state_settings(config))
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
        book = SessionBook(
            store,
            session_rule(config, "run"),
            lambda: linker_from_config(config),
            config.state.folder,
            keep_sessions=config.state.keep_sessions,
        )
        resumed = book.resume(self.wall())
        if resumed is not None:
            self._sessions_touched.add(resumed.id)
        next_batch = store.last_batch() + 1
        # Committed files are looked up in the database, not loaded (issue 10).
        known = Registry(StoredFiles(config.state.folder))
        with self._lock:
            self._total = store.next_seq()
        embedder = self._embedder or embedder_from_config(config)
        self.notifier.status("loading model")
        t0 = time.perf_counter()
        embedder.load()
        log.info(
            "model_loaded", model=embedder.describe(), seconds=round(time.perf_counter() - t0, 2)
        )
        pipeline = self._build(store, runtime, book, embedder, next_batch, known)
        for stage in (pipeline.link, pipeline.embed, pipeline.intake):
            stage.start()
        # READY does not wait for the watches (they grow all season), nor does the
        # first scan compete with setting them; the intake rescans once they are
        # set, then verifies every file (see intake.py).
        intake = pipeline.intake
        pipeline.watcher.start_in_background(intake.watches_set, after=intake.first_scan_done)
        pipeline.pinger.start()
        log.info(
            "daemon_started",
            watch=str(config.watch.folder),
            watch_mode=pipeline.watcher.mode,
            state=str(config.state.folder),
            output=str(config.output.folder),
            crops=pipeline.crops_at_start,
            method=config.link.method,
            session=book.current.id if book.current else None,
            split=book.rule.split,
        )
        self._disk.check()
        self.notifier.ready(self._status_line(pipeline))
        return pipeline

    def _build(
        self,
        store: StateStore,
        runtime: StateStore,
        book: SessionBook,
        embedder: Embedder,
        next_batch: int,
        known: Registry,
    ) -> Pipeline:
        """Wire the stages, the snapshot writer, the watcher and the pinger (none started)."""
        config = self.config
        embed_inbox: queue.Queue[IntakeUnit | Stop] = queue.Queue(maxsize=EMBED_INBOX_SIZE)
        link_inbox: queue.Queue[MicroBatch | Stop] = queue.Queue(maxsize=LINK_INBOX_SIZE)
        failed = threading.Event()
        # Paths the link stage committed, for the intake's registry to let go of.
        committed: queue.SimpleQueue[tuple[str, ...]] = queue.SimpleQueue()
        intake = IntakeStage(
            intake_options(config),
            embedder,
            embed_inbox,
            self.stopping,
            known=known,
            committed=committed,
            clock=self.clock,
            dirs=DirMtimes(
                freeze_after_s=config.watch.freeze_after_s,
                cache=ScanCache(
                    config.state.folder / SCAN_CACHE_NAME,
                    root=config.watch.folder,
                    recursive=config.watch.recursive,
                ),
            ),
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
            book,
            link_inbox,
            failed,
            self.progress,
            next_batch=next_batch,
            index_save_s=config.state.index_save_s,
            on_commit=self._on_commit,
            committed_paths=committed,
            shutdown=self.stopping,
            clock=self.clock,
            wall=self.wall,
            after_commit=(
                ThumbWriter(config.output.folder, background=config.input.background_rgb)
                if config.output.gallery
                else None
            ),
        )
        return Pipeline(
            store=store,
            runtime=runtime,
            intake=intake,
            embed=embed,
            link=link,
            embed_inbox=embed_inbox,
            link_inbox=link_inbox,
            snapshots=SnapshotWriter(
                config.state.folder,
                config.output,
                session=book.rule,
                files=self._snapshot_files,
            ),
            watcher=Watcher(
                config.watch.folder,
                intake.hint,
                recursive=config.watch.recursive,
                polling=config.watch.polling,
                poll_interval_s=config.watch.poll_interval_s,
                observer_factory=self.observer_factory,
                clock=self.clock,
            ),
            pinger=WatchdogPinger(
                self.notifier,
                lambda: self.progress.healthy() and not failed.is_set(),
                stalled=self.progress.stalled,
            ),
            failed=failed,
            crops_at_start=store.next_seq(),
        )

    # -- running -----------------------------------------------------------------------

    def _supervise(self, p: Pipeline) -> None:
        """Every second: restart a dead observer, snapshot when due, publish, check idleness.

        Returns when the daemon is stopping or a stage failed.
        """
        next_snapshot = self.clock() + self.config.snapshot.interval_s
        idle_since: float | None = None
        while not self.stopping.is_set():
            if p.failed.is_set():
                break
            self.stopping.wait(1.0)
            now = self.clock()
            if p.watcher.check():
                p.intake.request_rescan()
            if now >= next_snapshot:
                self._snapshot(p.snapshots, final=False)
                next_snapshot = now + self.config.snapshot.interval_s
            self._disk.check()
            # The status file first: whoever acts on the notify line finds it there.
            self._publish(p, "running")
            self.notifier.status(self._status_line(p))
            if self.exit_when_idle_s is not None:
                idle_since = self._check_idle(p, now, idle_since, self.exit_when_idle_s)

    def _check_idle(
        self, p: Pipeline, now: float, idle_since: float | None, exit_when_idle_s: float
    ) -> float | None:
        """Stop once nothing was queued, busy or committed for ``exit_when_idle_s``.

        Returns when the pipeline went idle (``clock`` seconds), ``None`` while busy.
        """
        busy = (
            p.intake.backlog()
            or p.embed_inbox.qsize()
            or p.link_inbox.qsize()
            or self.progress.busy()
            or p.intake.scans == 0
            or not p.intake.verified
        )
        # Work that came and went between two looks counts too.
        with self._lock:
            last_commit = self._last_commit_at
        if busy or (idle_since is not None and last_commit >= idle_since):
            return None
        if idle_since is None:
            return now
        if now - idle_since >= exit_when_idle_s:
            self.request_stop("idle")
        return idle_since

    # -- shutdown ----------------------------------------------------------------------

    def _shut_down(self, p: Pipeline) -> int:
        """Stop intake, let the stages drain, write the final snapshot, close the state.

        Returns the number of skipped files recorded in the state.
        """
        self.notifier.stopping()
        self.stopping.set()
        self._publish(p, "stopping")
        p.watcher.stop()
        p.intake.join()
        p.embed.join()
        p.link.join()
        p.pinger.stop()
        self._snapshot(p.snapshots, final=True)
        self._publish(p, "stopped")
        # Not counts(): that reads every crop row of the season.
        skipped = p.runtime.skipped_count()
        p.store.close()
        p.runtime.close()
        return skipped

    def _summary(self, p: Pipeline, skipped: int, started: float) -> RunSummary:
        """The exit summary; raises ``RuntimeError`` from a failed stage's error."""
        for stage in (p.intake, p.embed, p.link):
            if stage.error is not None:
                raise RuntimeError(f"the {stage.name} stage failed: {stage.error}") from stage.error
        for line in p.intake.tally.summary_lines():
            log.warning("crop_problems", summary=line)
        with self._lock:
            touched = sorted(self._sessions_touched)
        crops = clusters = singletons = 0
        with StateStore(self.config.state.folder, readonly=True) as store:
            for session in touched:
                sizes = session_cluster_sizes(store, session)
                crops += int(sizes.sum())
                clusters += len(sizes)
                singletons += int(np.count_nonzero(sizes == 1))
            total = store.next_seq()
        return RunSummary(
            crops=crops,
            clusters=clusters,
            singletons=singletons,
            skipped=skipped,
            new_crops=total - p.crops_at_start,
            seconds=self.clock() - started,
            sessions=tuple(touched),
        )

    # -- helpers -----------------------------------------------------------------------

    def _on_commit(self, report: BatchCommitted) -> None:
        now = self.clock()
        with self._lock:
            self._last_commit_at = now
            self._total = report.total_crops
            self._sessions_touched.add(report.session)
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

    def _status_line(self, p: Pipeline) -> str:
        with self._lock:
            total = self._total
        last = "never"
        if self._last_snapshot is not None:
            last = time.strftime("%H:%M:%S", time.localtime(self._last_snapshot))
        line = (
            f"{total} crops, {self._clusters} clusters, queue {p.queue_depth()}, "
            f"{self._rate():.1f} crops/s, last snapshot {last}"
        )
        state_error = p.link.commit_error
        if state_error:
            line += f"; STATE COMMIT FAILING: {state_error}"
        if self._snapshot_error:
            line += f"; SNAPSHOT FAILING: {self._snapshot_error}"
        stalled = self.progress.stalled()
        if stalled:
            line += "; STALLED: " + ", ".join(f"{stage} {secs:.0f} s" for stage, secs in stalled)
        if disk := self._disk.figures.alert():
            line += f"; {disk}"
        return line

    def _publish(self, p: Pipeline, phase: str) -> None:
        values: Mapping[str, object] = {
            "pid": os.getpid(),
            "phase": phase,
            "updated_at": self.wall(),
            "queue": p.queue_depth(),
            "last_snapshot_at": self._last_snapshot,
            "snapshot_error": self._snapshot_error,
            "state_error": p.link.commit_error,
            "watch_mode": p.watcher.mode,
            **self._disk.figures.runtime_values(),
        }
        try:
            p.runtime.set_runtime(values)
        except Exception as exc:  # status figures must never stop the daemon
            # Once per failure streak: a full disk fails this every second.
            if self._publish_error != str(exc):
                log.warning("runtime_publish_failed", reason=str(exc))
            self._publish_error = str(exc)
        else:
            if self._publish_error is not None:
                log.info("runtime_publish_recovered")
            self._publish_error = None
