"""The base every pipeline stage builds on: one way to start, fail and stop.

Like watchdog's ``BaseThread`` and ``EventEmitter``, a stage is a daemon thread
with one loop owned by the base and hooks for the subclass. Stages are joined by
bounded queues and stopped by a sentinel (:data:`STOP`) that each stage passes
downstream exactly once, after its last item, whether it ended cleanly or failed:

    hints -> intake -> embed -> link

A queue-fed stage (``until=None``) works until :data:`STOP` arrives on its
inbox. A source stage (the intake, fed by the watcher's hints) works until its
``until`` event is set; its inbox never carries :data:`STOP`.
"""

from __future__ import annotations

import queue
import threading
from typing import Final, Generic, TypeVar

from .log import get_logger

T = TypeVar("T")
In = TypeVar("In")
Out = TypeVar("Out")


class Stop:
    """The end-of-stream sentinel type (one instance, :data:`STOP`)."""

    def __repr__(self) -> str:
        return "STOP"


STOP: Final = Stop()


def put_until(q: queue.Queue[T], item: T, stopping: threading.Event, poll_s: float = 0.2) -> bool:
    """Put ``item`` on a bounded queue, waiting for room; give up once ``stopping`` is set.

    Returns whether the item was queued. Blocking forever on a full queue would
    make a stage impossible to stop when its consumer has died.
    """
    while True:
        try:
            q.put(item, timeout=poll_s)
            return True
        except queue.Full:
            if stopping.is_set():
                return False


def drain_until_stop(q: queue.Queue[T | Stop]) -> None:
    """Discard items up to and including the sentinel (a failed stage's inbox),
    so the stage upstream can always deliver its sentinel."""
    while not isinstance(q.get(), Stop):
        pass


class Stage(threading.Thread, Generic[In, Out]):
    """A pipeline stage: a daemon thread that takes items from ``inbox`` one at a time.

    The loop (owned here, not overridable) calls :meth:`poll` before each wait,
    waits up to :meth:`timeout` seconds for an item (``None``: for ever), then
    calls :meth:`handle` with it, or :meth:`idle` when none came in time. At the
    end of the stream (:data:`STOP`, or ``until`` set) it calls :meth:`finish`.

    Any exception out of a hook (a bug, or a failure the stage cannot survive)
    is kept in :attr:`error`, logged as ``stage_failed`` with ``stage=<name>``,
    and sets ``failed``; a queue-fed stage then drains its inbox up to the
    sentinel, so the stage upstream can always deliver it. Either way
    :meth:`close` runs, and then :data:`STOP` goes to ``outbox`` (when there is
    one) exactly once.
    """

    def __init__(
        self,
        name: str,
        inbox: queue.Queue[In | Stop],
        outbox: queue.Queue[Out | Stop] | None,
        failed: threading.Event,
        *,
        until: threading.Event | None = None,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.inbox = inbox
        self.outbox = outbox
        self.failed = failed
        self.until = until
        self.error: BaseException | None = None

    # -- hooks -------------------------------------------------------------------------

    def handle(self, item: In) -> None:
        """Work on one item from the inbox."""
        raise NotImplementedError

    def timeout(self) -> float | None:
        """Seconds to wait for the next item before :meth:`idle` (default: for ever)."""
        return None

    def idle(self) -> None:
        """No item came within :meth:`timeout` seconds (default: nothing)."""

    def poll(self) -> None:
        """Periodic work before each wait for an item (default: nothing)."""

    def finish(self) -> None:
        """The stream ended cleanly: flush what is held (default: nothing)."""

    def close(self) -> None:
        """Release resources; runs after the loop however it ended, before STOP goes on."""

    def emit(self, item: Out, *, give_up: threading.Event) -> bool:
        """Hand ``item`` downstream, waiting for room; give up once ``give_up`` is set.

        Returns whether it was queued. Raises ``RuntimeError`` on a stage
        without an outbox.
        """
        if self.outbox is None:
            raise RuntimeError(f"the {self.name} stage has no outbox")
        return put_until(self.outbox, item, give_up)

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> None:
        """Work until the end of the stream; on any error fail loudly; pass STOP on."""
        try:
            self._serve()
        except BaseException as exc:  # a bug: make the daemon exit loudly
            self.error = exc
            get_logger(type(self).__module__).exception("stage_failed", stage=self.name)
            self.failed.set()
            if self.until is None:
                drain_until_stop(self.inbox)
        finally:
            try:
                self.close()
            finally:
                if self.outbox is not None:
                    # The stage downstream drains its inbox up to STOP, so this returns.
                    self.outbox.put(STOP)

    def _serve(self) -> None:
        while self.until is None or not self.until.is_set():
            self.poll()
            try:
                item = self.inbox.get(timeout=self.timeout())
            except queue.Empty:
                self.idle()
                continue
            if isinstance(item, Stop):
                break
            self.handle(item)
        self.finish()
