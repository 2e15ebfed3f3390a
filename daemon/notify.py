"""systemd service notifications, the health-gated watchdog, and stack dumps.

`Notifier` speaks the ``sd_notify`` protocol directly: one datagram of
``KEY=value`` lines sent to the ``AF_UNIX`` socket named by ``$NOTIFY_SOCKET``
(a path, or ``@name`` for an abstract socket). It needs no python-systemd and
does nothing when the variable is unset, so the daemon runs unchanged outside
systemd.

Liveness is more than "the process exists": a stage stuck on one model call or
one file must get the service restarted. Stages report units of work to a
`Progress`; `WatchdogPinger` sends ``WATCHDOG=1`` only while nothing has been
busy longer than ``[service] stall_s``. Once it withholds pings, systemd kills
and restarts the service ``WatchdogSec`` later, so a hang is detected within
``stall_s + WatchdogSec``.

`install_stack_dump` makes ``kill -USR1 <pid>`` log every thread's stack as
one ``thread_stacks`` event, to see where a hung daemon is stuck.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import FrameType
from typing import Any, Protocol

from .log import get_logger

__all__ = [
    "Notifier",
    "Progress",
    "WatchdogPinger",
    "install_stack_dump",
]

_log = get_logger(__name__)

# A receiver that stops reading must not hang the daemon on a full socket queue.
_SEND_TIMEOUT_S = 2.0


class _EventLogger(Protocol):
    """The part of a structlog logger `install_stack_dump` uses."""

    def warning(self, event: str, *args: Any, **kw: Any) -> Any: ...


def _one_line(text: str) -> str:
    """Collapse line breaks: a newline would start a new ``KEY=value`` assignment."""
    return " ".join(text.splitlines()).strip()


def _socket_address(value: str) -> str:
    """Turn ``$NOTIFY_SOCKET`` into a `socket.sendto` address (``@x`` is abstract)."""
    return "\0" + value[1:] if value.startswith("@") else value


class Notifier:
    """Sends ``sd_notify`` messages to systemd; a no-op when not started by systemd.

    ``address`` is the value of ``$NOTIFY_SOCKET`` (``None``: disabled).
    ``watchdog_usec`` is systemd's watchdog timeout in microseconds (``None``:
    no watchdog). Thread-safe. Socket failures never raise: the first failure
    of a streak is logged as ``notify_failed`` and `send` returns ``False``.
    """

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self._address = address or None
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._failing = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """Build from ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.

        The watchdog is off when ``WATCHDOG_USEC`` is missing or not a positive
        integer, or when ``WATCHDOG_PID`` names another process (the variables
        were inherited from a parent that systemd watches, not meant for us).
        """
        address = environ.get("NOTIFY_SOCKET") or None
        usec: int | None = None
        raw_usec = environ.get("WATCHDOG_USEC")
        if raw_usec:
            try:
                usec = int(raw_usec)
            except ValueError:
                _log.warning("watchdog_usec_invalid", value=raw_usec)
        raw_pid = environ.get("WATCHDOG_PID")
        if usec is not None and raw_pid:
            try:
                for_us = int(raw_pid) == os.getpid()
            except ValueError:
                for_us = False
            if not for_us:
                usec = None
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        """Whether systemd asked for notifications (``NOTIFY_SOCKET`` was set)."""
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """systemd's watchdog timeout in seconds, or ``None`` without a watchdog."""
        if self._address is None or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 1_000_000

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=value`` assignments in one datagram; return whether it was sent.

        Returns ``False`` when disabled or when the socket fails (logged, never
        raised). Raises `ValueError` only for a malformed assignment, which is a
        bug in the caller.
        """
        if not assignments:
            raise ValueError("send() needs at least one KEY=value assignment")
        for item in assignments:
            key, sep, _ = item.partition("=")
            if not sep or not key or "\n" in item:
                raise ValueError(f"not a single-line KEY=value assignment: {item!r}")
        if self._address is None:
            return False
        data = "\n".join(assignments).encode("utf-8")
        with self._lock:
            try:
                if self._sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    sock.settimeout(_SEND_TIMEOUT_S)
                    self._sock = sock
                self._sock.sendto(data, _socket_address(self._address))
            except OSError as exc:
                if not self._failing:
                    self._failing = True
                    _log.warning(
                        "notify_failed",
                        socket=self._address,
                        error=f"{type(exc).__name__}: {exc}",
                        message=assignments[0],
                    )
                return False
            if self._failing:
                self._failing = False
                _log.info("notify_recovered", socket=self._address)
            return True

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd start-up finished (``READY=1``), optionally with a status line."""
        if status is None:
            return self.send("READY=1")
        return self.send("READY=1", "STATUS=" + _one_line(status))

    def status(self, text: str) -> bool:
        """Set the one-line status ``systemctl status`` shows (newlines become spaces)."""
        return self.send("STATUS=" + _one_line(text))

    def watchdog(self) -> bool:
        """Ping the watchdog (``WATCHDOG=1``)."""
        return self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before start-up or stop times out (slow model loads)."""
        return self.send(f"EXTEND_TIMEOUT_USEC={max(1, round(seconds * 1_000_000))}")

    def stopping(self) -> bool:
        """Tell systemd the service is shutting down (``STOPPING=1``)."""
        return self.send("STOPPING=1")

    def close(self) -> None:
        """Close the socket; a later `send` opens a new one."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


class Progress:
    """Which stages are busy on a unit of work, and since when.

    A stage calls `begin` before one unit of work (one model call, one file)
    and `end` after it, on the same thread; `working` does both. A stage busy
    longer than ``stall_s`` counts as hung. Idle stages never count as hung:
    waiting for new crops is normal. Thread-safe.
    """

    def __init__(self, stall_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if stall_s <= 0:
            raise ValueError(f"stall_s must be positive, got {stall_s}")
        self.stall_s = stall_s
        self._clock = clock
        self._lock = threading.Lock()
        # (stage, thread ident) -> start times; a list because work may nest.
        self._busy: dict[tuple[str, int], list[float]] = {}

    def begin(self, stage: str) -> None:
        """Mark ``stage`` busy on a new unit of work on this thread."""
        now = self._clock()
        with self._lock:
            self._busy.setdefault((stage, threading.get_ident()), []).append(now)

    def end(self, stage: str) -> None:
        """Mark this thread's latest unit of work in ``stage`` done.

        Raises `ValueError` when this thread has no unfinished `begin` for it.
        """
        key = (stage, threading.get_ident())
        with self._lock:
            starts = self._busy.get(key)
            if not starts:
                raise ValueError(f"end({stage!r}) without a matching begin() on this thread")
            starts.pop()
            if not starts:
                del self._busy[key]

    @contextlib.contextmanager
    def working(self, stage: str) -> Iterator[None]:
        """Context manager: ``stage`` is busy for the duration of the block."""
        self.begin(stage)
        try:
            yield
        finally:
            self.end(stage)

    def busy(self) -> list[tuple[str, float]]:
        """Stages busy now with seconds since their oldest unfinished unit, longest first."""
        now = self._clock()
        oldest: dict[str, float] = {}
        with self._lock:
            for (stage, _), starts in self._busy.items():
                oldest[stage] = min(oldest.get(stage, starts[0]), starts[0])
        return sorted(
            ((stage, now - start) for stage, start in oldest.items()),
            key=lambda item: (-item[1], item[0]),
        )

    def stalled(self) -> list[tuple[str, float]]:
        """Stages busy on one unit of work longer than ``stall_s``, longest first."""
        return [(stage, secs) for stage, secs in self.busy() if secs > self.stall_s]

    def healthy(self) -> bool:
        """Whether no stage is stalled."""
        return not self.stalled()


class WatchdogPinger(threading.Thread):
    """Thread that pings systemd's watchdog every half interval while healthy.

    ``healthy`` decides each ping (e.g. ``progress.healthy`` and-ed with other
    checks; an exception counts as unhealthy). ``stalled`` (e.g.
    ``progress.stalled``) names the culprits in the ``watchdog_withheld`` event,
    which is logged once per unhealthy episode; pinging resumes, with
    ``watchdog_resumed``, when health returns before systemd acts.

    ``interval_s`` defaults to the notifier's watchdog timeout; without one the
    thread exits at once, so it is safe to start unconditionally. ``wait``
    (seconds -> True to stop) replaces the stop event's wait in tests; the loop
    body is `tick`, which tests may call directly.
    """

    def __init__(
        self,
        notifier: Notifier,
        healthy: Callable[[], bool],
        *,
        stalled: Callable[[], Sequence[tuple[str, float]]] | None = None,
        interval_s: float | None = None,
        wait: Callable[[float], bool] | None = None,
    ) -> None:
        super().__init__(name="watchdog", daemon=True)
        self._notifier = notifier
        self._healthy = healthy
        self._stalled = stalled
        self.interval_s = notifier.watchdog_interval_s if interval_s is None else interval_s
        self._stop_event = threading.Event()
        self._wait = wait if wait is not None else self._stop_event.wait
        self._withholding = False
        self.pings = 0
        """Watchdog pings sent so far."""

    def tick(self) -> bool:
        """Check health once; ping when healthy. Return whether a ping was sent."""
        try:
            ok = self._healthy()
            reason = None
        except Exception as exc:  # a broken check must not kill the pinger silently
            ok = False
            reason = f"{type(exc).__name__}: {exc}"
        if not ok:
            if not self._withholding:
                self._withholding = True
                stages = list(self._stalled()) if self._stalled is not None else []
                _log.error(
                    "watchdog_withheld",
                    stalled=[f"{stage} ({secs:.0f} s)" for stage, secs in stages],
                    error=reason,
                    watchdog_s=self.interval_s,
                )
            return False
        if self._withholding:
            self._withholding = False
            _log.warning("watchdog_resumed")
        sent = self._notifier.watchdog()
        if sent:
            self.pings += 1
        return sent

    def run(self) -> None:
        """Ping every ``interval_s / 2`` until `stop`; return at once without a watchdog."""
        if self.interval_s is None or self.interval_s <= 0:
            return
        while not self._stop_event.is_set():
            self.tick()
            if self._wait(self.interval_s / 2):
                break

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the loop and wait up to ``timeout`` seconds for the thread to end."""
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)


def _format_stacks(frames: Mapping[int, FrameType]) -> tuple[list[str], str]:
    """Thread names (main first) and one text block with every thread's stack."""
    names = {t.ident: t for t in threading.enumerate()}
    main_ident = threading.main_thread().ident
    order = sorted(frames, key=lambda ident: (ident != main_ident, str(ident)))
    labels: list[str] = []
    blocks: list[str] = []
    for ident in order:
        thread = names.get(ident)
        name = thread.name if thread is not None else f"<unknown {ident}>"
        daemon = f", daemon={thread.daemon}" if thread is not None else ""
        labels.append(name)
        stack = "".join(traceback.format_stack(frames[ident])).rstrip()
        blocks.append(f"Thread {name} (ident {ident}{daemon}):\n{stack}")
    return labels, "\n\n".join(blocks)


def install_stack_dump(
    logger: _EventLogger, signum: int = signal.SIGUSR1
) -> Callable[[int, FrameType | None], Any] | int | None:
    """On ``signum``, log every thread's stack as one ``thread_stacks`` event.

    Call from the main thread (Python only installs signal handlers there;
    elsewhere `ValueError`). The handler only snapshots the stacks; a
    short-lived thread does the logging, because the signal may arrive while
    the main thread is inside a log handler, and logging from the handler then
    would re-enter it. Returns the previous handler, for restoring.
    """

    def handler(_signum: int, _frame: FrameType | None) -> None:
        labels, text = _format_stacks(sys._current_frames())

        def emit() -> None:
            logger.warning(
                "thread_stacks", signal=signal.Signals(signum).name, threads=labels, stacks=text
            )

        threading.Thread(target=emit, name="stack-dump", daemon=True).start()

    return signal.signal(signum, handler)
