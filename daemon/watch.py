"""Watching the crop folder: event hints, reconciliation walks and settling.

Three parts, each usable alone:

- `Watcher` runs a watchdog observer on the watched folder and turns its events
  into *hints* (``on_hint(path)``): a file or directory that may be new or may
  have changed. Events are never trusted as the full truth (inotify queues
  overflow, network mounts deliver nothing, watches run out), so the caller also
  reconciles with `scan_tree` every ``rescan_s`` and after every restart
  (`Watcher.check` returning True). Deletions are not reported at all: a mount
  that goes away must not look like thousands of deleted crops.
- `scan_tree` (:mod:`.scan`, re-exported here) walks the tree with
  ``os.scandir`` and yields the crops and metadata files it finds, with their
  size and mtime. It never follows symlinks. With a `DirMtimes` it skips
  listing the directories whose mtime is unchanged since its previous walk, so
  a rescan costs one stat per directory, not per file.
- `Settler` decides when a hinted file is complete: flat-bug writes crops
  straight to their final names and its JSON with a plain write, so a file is
  only handed on once its size and mtime stayed the same for ``settle_s``.

Hidden and temporary names (`crop_clusterd.inputs.is_ignored_name`) are skipped
everywhere, files and directories alike (so e.g. NFS ``.snapshot`` folders are
not read), and so are directories named like images or metadata (``x.png/``):
`scan_tree` neither yields nor enters them and `Watcher` sends no hints from below
them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from .log import get_logger
from .scan import (
    RACY_S,
    DirMtimes,
    FileKind,
    FileSeen,
    kind,
    list_sorted,
    os_reason,
    scan_tree,
    skip_dir_name,
)

# watchdog 7's inotify emitter warns "Callback with id ... already exists for
# watch ..." (with its whole watch table) when a new folder's watch is added
# twice, which happens for each per-frame folder flat-bug creates. It is
# harmless (the callback is replaced) and would flood the journal.
warnings.filterwarnings(
    "ignore", message=r"Callback with id .* already exists", category=RuntimeWarning
)

__all__ = [
    "RACY_S",
    "DirMtimes",
    "FileKind",
    "FileSeen",
    "ObserverFactory",
    "SettleResult",
    "Settler",
    "WatchMode",
    "Watcher",
    "default_observer_factory",
    "kind",
    "list_sorted",
    "scan_tree",
]

log = get_logger(__name__)

WatchMode = Literal["inotify", "polling"]
"""``inotify``: the platform's native observer (inotify on Linux); ``polling``: snapshots."""

ObserverFactory = Callable[[WatchMode, float], BaseObserver]
"""Builds an unstarted observer for a mode; the float is the polling interval in seconds."""

# errno values with which inotify reports that its per-user limits are used up:
# ENOSPC for max_user_watches, EMFILE for max_user_instances.
_INOTIFY_EXHAUSTED = {
    errno.ENOSPC: "inotify watch limit reached",
    errno.EMFILE: "inotify instance limit reached",
}


# --- watcher -----------------------------------------------------------------------------


def default_observer_factory(mode: WatchMode, poll_interval_s: float) -> BaseObserver:
    """The real observers: watchdog's native one, or `PollingObserver` every interval."""
    if mode == "polling":
        return PollingObserver(timeout=poll_interval_s)
    return Observer()


class _HintHandler(FileSystemEventHandler):
    """Turns watchdog events into hints; never lets an exception reach the observer."""

    def __init__(self, root: Path, on_hint: Callable[[Path], None]) -> None:
        super().__init__()
        self._root = root
        self._on_hint = on_hint
        self._lock = threading.Lock()
        self._logged_kinds: set[str] = set()
        self.errors = 0

    def dispatch(self, event: FileSystemEvent) -> None:
        """Hint the file or new directory an event names, if it is one we want."""
        try:
            path = self._hinted_path(event)
            if path is not None:
                self._on_hint(path)
        except Exception as exc:
            # The observer thread dies on an exception from its handler and then
            # no event reaches us any more; log each kind of failure once.
            self._record_error(exc, event)

    def _hinted_path(self, event: FileSystemEvent) -> Path | None:
        if isinstance(event, FileCreatedEvent | FileModifiedEvent | FileClosedEvent):
            target, is_dir = event.src_path, False
        elif isinstance(event, FileMovedEvent):
            target, is_dir = event.dest_path, False  # moved in counts as new
        elif isinstance(event, DirCreatedEvent):
            target, is_dir = event.src_path, True
        elif isinstance(event, DirMovedEvent):
            target, is_dir = event.dest_path, True
        else:
            return None  # deletions, attribute changes, opens, directory modifications
        path = Path(os.fsdecode(target))
        try:
            parents = path.relative_to(self._root).parts[:-1]
        except ValueError:
            parents = ()
        if any(skip_dir_name(part) for part in parents):
            return None
        if is_dir:
            return None if skip_dir_name(path.name) or path == self._root else path
        return path if kind(path) is not None else None

    def _record_error(self, exc: Exception, event: FileSystemEvent) -> None:
        error_kind = type(exc).__qualname__
        with self._lock:
            self.errors += 1
            first = error_kind not in self._logged_kinds
            self._logged_kinds.add(error_kind)
        if first:
            log.exception(
                "watch_handler_error",
                error_kind=error_kind,
                event_type=event.event_type,
                path=os.fsdecode(event.src_path),
                note="logged once per kind of error; watching continues",
            )


class Watcher:
    """Watch one folder and call ``on_hint(path)`` for files and directories that appear.

    ``on_hint`` runs on the observer's thread and must be quick and thread-safe
    (e.g. `Settler.offer` or a queue put). It gets: files with a crop or metadata
    name that were created, modified, closed after writing or moved in (their
    destination path); and new or moved-in directories (scan them with
    `scan_tree`: files may land in a new directory before its watch exists).
    Deletions are never hinted. An exception from ``on_hint`` is logged
    (``watch_handler_error``, once per kind) and watching carries on.

    ``polling=True`` polls every ``poll_interval_s`` (network, FUSE and SMB mounts
    deliver no inotify events). When inotify runs out of watches or instances the
    watcher falls back to polling by itself (``watch_fallback_polling``). A folder
    that is missing at `start` is not an error: `check` keeps trying, with a
    backoff from ``restart_backoff_s`` doubling up to ``max_restart_backoff_s``.
    Note that inotify itself drops watches it cannot add below the root without
    telling anyone, which is one more reason to rescan regularly.
    """

    def __init__(
        self,
        folder: Path,
        on_hint: Callable[[Path], None],
        *,
        recursive: bool = True,
        polling: bool = False,
        poll_interval_s: float = 2.0,
        observer_factory: ObserverFactory | None = None,
        clock: Callable[[], float] = time.monotonic,
        restart_backoff_s: float = 1.0,
        max_restart_backoff_s: float = 60.0,
    ) -> None:
        if poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be positive, got {poll_interval_s}")
        if restart_backoff_s <= 0 or max_restart_backoff_s < restart_backoff_s:
            raise ValueError(
                "need 0 < restart_backoff_s <= max_restart_backoff_s, got "
                f"{restart_backoff_s} and {max_restart_backoff_s}"
            )
        self.folder = Path(folder)
        self.recursive = recursive
        self.poll_interval_s = poll_interval_s
        self._handler = _HintHandler(self.folder, on_hint)
        self._factory = observer_factory or default_observer_factory
        self._clock = clock
        self._mode: WatchMode = "polling" if polling else "inotify"
        self._observer: BaseObserver | None = None
        self._running = False
        self._min_backoff = restart_backoff_s
        self._max_backoff = max_restart_backoff_s
        self._backoff = restart_backoff_s
        self._next_attempt = 0.0
        self._started_at = 0.0
        self._starter: threading.Thread | None = None
        self.restarts = 0

    @property
    def mode(self) -> WatchMode:
        """``"inotify"`` or ``"polling"``; becomes ``"polling"`` after a fallback."""
        return self._mode

    @property
    def handler_errors(self) -> int:
        """How many events failed in ``on_hint`` or the handler so far."""
        return self._handler.errors

    @property
    def healthy(self) -> bool:
        """Whether an observer is running with all its emitters alive."""
        observer = self._observer
        if observer is None or not observer.is_alive():
            return False
        # An emitter stops on its own when the watched folder is deleted (inotify)
        # or found missing (polling) while the observer thread lives on.
        return bool(observer.emitters) and all(e.is_alive() for e in observer.emitters)

    def start(self) -> bool:
        """Start watching; returns whether an observer runs now.

        A folder that is missing or unreadable is logged (``watch_start_failed``)
        and retried by `check`; it does not raise.
        """
        self._running = True
        self._backoff = self._min_backoff
        self._next_attempt = 0.0
        return self._attempt()

    def start_in_background(
        self, on_started: Callable[[bool], None], after: threading.Event | None = None
    ) -> None:
        """Start watching from a thread of its own, once ``after`` is set (if given),
        then call ``on_started(running)`` from that thread (whether an observer
        runs; on failure `check` retries).

        Setting inotify watches costs one call per folder of the tree (1.3 s for
        the 3,700 folders of seven nights) and grows all season, so the daemon
        does not wait for it before READY. Events are hints only: the caller's
        rescan after ``on_started`` finds what came before the watches were set.
        `check` does nothing until this start is over; `stop` waits for it.
        """
        self._running = True
        self._backoff = self._min_backoff
        self._next_attempt = 0.0

        def start() -> None:
            running = False
            try:
                while after is not None and not after.wait(0.1):
                    if not self._running:
                        return
                running = self._attempt()
                if not self._running:  # stopped meanwhile
                    self._discard_observer(timeout_s=1.0)
            finally:
                on_started(running)

        self._starter = threading.Thread(target=start, name="watch-start", daemon=True)
        self._starter.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop watching and join the observer thread (up to ``timeout_s``)."""
        self._running = False
        if self._starter is not None:
            self._starter.join(timeout_s)
        self._discard_observer(timeout_s)

    def check(self) -> bool:
        """Restart a dead observer; returns True when it restarted one just now.

        Call it regularly (e.g. every second). After a restart events may have
        been missed, so the caller should reconcile with `scan_tree`. Attempts
        are spaced by the backoff, so a permanently missing folder costs one
        failed start per ``max_restart_backoff_s``.
        """
        if not self._running or (self._starter is not None and self._starter.is_alive()):
            return False
        now = self._clock()
        if self.healthy:
            if now - self._started_at >= self._max_backoff:
                self._backoff = self._min_backoff  # stayed up: forget earlier failures
            return False
        if now < self._next_attempt:
            return False
        had_observer = self._observer is not None
        reason = "observer_stopped" if had_observer else "not_started"
        if self._attempt():
            self.restarts += 1
            log.warning(
                "observer_restarted", mode=self._mode, reason=reason, folder=str(self.folder)
            )
            return True
        return False

    def _attempt(self) -> bool:
        """Try to start an observer now; on failure schedule the next try."""
        self._discard_observer(timeout_s=1.0)
        now = self._clock()
        try:
            self._observer = self._start_observer()
        except OSError as exc:
            self._observer = None
            self._next_attempt = now + self._backoff
            log.warning(
                "watch_start_failed",
                folder=str(self.folder),
                mode=self._mode,
                reason=os_reason(exc),
                retry_in_s=round(self._backoff, 3),
            )
            self._backoff = min(self._backoff * 2, self._max_backoff)
            return False
        self._started_at = now
        # Space restarts even when starting works but the observer keeps dying.
        self._next_attempt = now + self._backoff
        self._backoff = min(self._backoff * 2, self._max_backoff)
        return True

    def _start_observer(self) -> BaseObserver:
        """Build, schedule and start an observer, falling back to polling once."""
        try:
            return self._build(self._mode)
        except OSError as exc:
            if self._mode != "inotify" or exc.errno not in _INOTIFY_EXHAUSTED:
                raise
            log.warning(
                "watch_fallback_polling",
                folder=str(self.folder),
                reason=_INOTIFY_EXHAUSTED[exc.errno],
                error=os_reason(exc),
                poll_interval_s=self.poll_interval_s,
                fix="raise fs.inotify.max_user_watches / max_user_instances, or set "
                "[watch] polling = true",
            )
            self._mode = "polling"
            return self._build("polling")

    def _build(self, mode: WatchMode) -> BaseObserver:
        observer = self._factory(mode, self.poll_interval_s)
        try:
            observer.schedule(self._handler, str(self.folder), recursive=self.recursive)
            observer.start()
        except BaseException:
            _halt(observer, timeout_s=1.0)
            raise
        return observer

    def _discard_observer(self, timeout_s: float) -> None:
        observer, self._observer = self._observer, None
        if observer is not None and not _halt(observer, timeout_s):
            log.warning("observer_stop_timeout", folder=str(self.folder), timeout_s=timeout_s)


def _halt(observer: BaseObserver, timeout_s: float) -> bool:
    """Stop an observer and its emitters; returns False if its thread did not end in time."""
    observer.stop()
    with contextlib.suppress(Exception):
        observer.unschedule_all()  # stops and joins the emitters, also unstarted ones
    if observer.is_alive():
        observer.join(timeout_s)
        return not observer.is_alive()
    return True


# --- settling ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SettleResult:
    """What one `Settler.poll` found.

    ``ready``: files whose size and mtime stayed unchanged for ``settle_s``, now
    out of the settler. ``vanished``: candidates that no longer exist (reported
    once, dropped). ``not_regular``: candidates that turned out to be directories,
    symlinks, fifos or the like (dropped; never read them). ``failed``: candidates
    whose stat failed otherwise, with the reason (dropped; a rescan offers them
    again). ``root_available``: False when the watched root could not be stat'ed;
    then every list is empty and all candidates are kept.
    """

    ready: tuple[FileSeen, ...] = ()
    vanished: tuple[Path, ...] = ()
    not_regular: tuple[Path, ...] = ()
    failed: tuple[tuple[Path, str], ...] = ()
    root_available: bool = True


@dataclass
class _Candidate:
    stable_since: float
    size: int | None = None
    mtime_ns: int | None = None
    inode: int | None = None


class Settler:
    """Hold hinted files until they stop changing, then release them.

    `offer` registers a file (or refreshes it: an offer means activity, so the
    settle time starts again); it does no I/O and is thread-safe, so it may be
    the `Watcher`'s ``on_hint``. `poll` stats every candidate and releases those
    whose (size, mtime_ns) matched the previous poll's for at least ``settle_s``,
    and never earlier than ``settle_s`` after the first offer. A file therefore
    needs two stats ``settle_s`` apart, unless it was offered with the `FileSeen`
    a `scan_tree` walk just took. Symlinks are not followed (``lstat``).

    If the watched ``root`` cannot be stat'ed, `poll` reports nothing as
    vanished (a mount that briefly disappears must not look like thousands of
    deletions), keeps all candidates, logs ``watch_root_unavailable`` once per
    outage and restarts their settle time when the root is back.
    """

    def __init__(
        self,
        root: Path,
        settle_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if settle_s < 0:
            raise ValueError(f"settle_s must not be negative, got {settle_s}")
        self.root = Path(root)
        self.settle_s = settle_s
        self._clock = clock
        self._lock = threading.Lock()
        self._candidates: dict[Path, _Candidate] = {}
        self._root_down = False

    @property
    def pending(self) -> int:
        """How many files are waiting to settle."""
        with self._lock:
            return len(self._candidates)

    def offer(self, path: Path, seen: FileSeen | None = None) -> None:
        """Register ``path`` as a candidate, or restart its settle time if it is one.

        ``seen``, from a fresh `scan_tree`, serves as the first stat of a new candidate.
        """
        path = Path(path)
        now = self._clock()
        with self._lock:
            candidate = self._candidates.get(path)
            if candidate is None:
                candidate = self._candidates[path] = _Candidate(stable_since=now)
                if seen is not None:
                    candidate.size, candidate.mtime_ns = seen.size, seen.mtime_ns
                    candidate.inode = seen.inode or None
            else:
                candidate.stable_since = now

    def discard(self, path: Path) -> bool:
        """Forget a candidate; returns whether it was one."""
        with self._lock:
            return self._candidates.pop(Path(path), None) is not None

    def poll(self) -> SettleResult:
        """Stat all candidates; release the settled ones, drop the gone ones."""
        if not self._root_ok():
            return SettleResult(root_available=False)
        with self._lock:
            paths = list(self._candidates)
        # Stat outside the lock: on a slow mount offers must not wait for us.
        stats: dict[Path, os.stat_result | OSError] = {}
        for path in paths:
            try:
                stats[path] = os.lstat(path)
            except OSError as exc:
                stats[path] = exc
        if any(isinstance(s, OSError) for s in stats.values()) and not self._root_ok():
            # The root went away while we were statting: those errors mean nothing.
            return SettleResult(root_available=False)

        now = self._clock()
        ready: list[FileSeen] = []
        vanished: list[Path] = []
        not_regular: list[Path] = []
        failed: list[tuple[Path, str]] = []
        with self._lock:
            for path, st in stats.items():
                candidate = self._candidates.get(path)
                if candidate is None:
                    continue  # discarded meanwhile
                if isinstance(st, FileNotFoundError | NotADirectoryError):
                    vanished.append(path)
                elif isinstance(st, OSError):
                    failed.append((path, os_reason(st)))
                elif not stat.S_ISREG(st.st_mode):
                    not_regular.append(path)
                else:
                    if self._settled(candidate, st, now):
                        ready.append(FileSeen(path, st.st_size, st.st_mtime_ns, st.st_ino))
                    else:
                        continue
                del self._candidates[path]
        ready.sort(key=lambda f: f.path)
        return SettleResult(
            ready=tuple(ready),
            vanished=tuple(sorted(vanished)),
            not_regular=tuple(sorted(not_regular)),
            failed=tuple(sorted(failed)),
        )

    def _settled(self, candidate: _Candidate, st: os.stat_result, now: float) -> bool:
        """Update a candidate with a fresh stat; return whether it is ready."""
        # A file renamed over another one (rsync) may keep size and mtime: the inode tells.
        replaced = candidate.inode is not None and candidate.inode != st.st_ino
        candidate.inode = st.st_ino
        if replaced or (candidate.size, candidate.mtime_ns) != (st.st_size, st.st_mtime_ns):
            candidate.size, candidate.mtime_ns = st.st_size, st.st_mtime_ns
            candidate.stable_since = now
            return False
        # stable_since starts at the first offer, so this is never earlier than
        # settle_s after the file was first seen either.
        return now - candidate.stable_since >= self.settle_s

    def _root_ok(self) -> bool:
        """Stat the root; log outages once each and restart settling after one."""
        try:
            ok = stat.S_ISDIR(os.stat(self.root).st_mode)
            reason = "" if ok else "not a directory"
        except OSError as exc:
            ok, reason = False, os_reason(exc)
        if not ok:
            if not self._root_down:
                self._root_down = True
                log.warning(
                    "watch_root_unavailable",
                    root=str(self.root),
                    reason=reason,
                    pending=self.pending,
                )
            return False
        if self._root_down:
            self._root_down = False
            now = self._clock()
            with self._lock:
                # Writers may have gone on while we could not look: settle afresh.
                for candidate in self._candidates.values():
                    candidate.stable_since = now
                    candidate.size = candidate.mtime_ns = candidate.inode = None
                pending = len(self._candidates)
            log.info("watch_root_available", root=str(self.root), pending=pending)
        return True
