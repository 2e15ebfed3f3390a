"""The end-of-stream sentinel and the bounded-queue put that every stage uses."""

from __future__ import annotations

import queue
import threading
from typing import Final, TypeVar

T = TypeVar("T")


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


def drain_until_stop(q: queue.Queue[object]) -> None:
    """Discard items up to and including the sentinel (a failed stage's inbox),
    so the stage upstream can always deliver its sentinel."""
    while not isinstance(q.get(), Stop):
        pass
