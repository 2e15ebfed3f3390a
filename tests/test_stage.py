"""The stage base: one start, fail and stop protocol for every pipeline stage."""

from __future__ import annotations

import io
import json
import queue
import threading
from pathlib import Path

import pytest
from fakes import ColourEmbedder
from PIL import Image

from crop_clusterd.embed import EmbedderOptions
from crop_clusterd.embed_stage import EmbedStage
from crop_clusterd.log import configure_logging
from crop_clusterd.notify import Progress
from crop_clusterd.records import Crop, IntakeUnit, MicroBatch, Prepared
from crop_clusterd.stage import STOP, Stage, Stop, drain_until_stop, put_until


class Recorder(Stage[int, int]):
    """Doubles items downstream; raises on ``boom``; counts its hooks."""

    def __init__(
        self,
        inbox: queue.Queue[int | Stop],
        outbox: queue.Queue[int | Stop] | None,
        failed: threading.Event,
        *,
        boom: int | None = None,
        wait_s: float | None = None,
        until: threading.Event | None = None,
    ) -> None:
        super().__init__("recorder", inbox, outbox, failed, until=until)
        self.boom = boom
        self.wait_s = wait_s
        self.seen: list[int] = []
        self.idles = 0
        self.polls = 0
        self.finished = 0
        self.closed = 0

    def handle(self, item: int) -> None:
        if item == self.boom:
            raise ValueError(f"boom at {item}")
        self.seen.append(item)
        if self.outbox is not None:
            self.emit(2 * item, give_up=self.failed)

    def timeout(self) -> float | None:
        return self.wait_s

    def idle(self) -> None:
        self.idles += 1
        if self.until is not None and self.idles >= 3:
            self.until.set()

    def poll(self) -> None:
        self.polls += 1

    def finish(self) -> None:
        self.finished += 1

    def close(self) -> None:
        self.closed += 1


def drain(q: queue.Queue[int | Stop]) -> list[int | Stop]:
    out: list[int | Stop] = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out


@pytest.fixture
def log_lines() -> io.StringIO:
    out = io.StringIO()
    configure_logging("json", "debug", out, environ={})
    return out


def events(lines: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in lines.getvalue().splitlines() if line.startswith("{")]


def test_clean_stop_passes_stop_downstream_once() -> None:
    inbox: queue.Queue[int | Stop] = queue.Queue(maxsize=8)
    outbox: queue.Queue[int | Stop] = queue.Queue(maxsize=8)
    failed = threading.Event()
    stage = Recorder(inbox, outbox, failed)
    for item in (1, 2, 3):
        inbox.put(item)
    inbox.put(STOP)
    stage.start()
    stage.join(10)
    assert not stage.is_alive()
    assert stage.name == "recorder" and stage.daemon
    assert stage.error is None and not failed.is_set()
    assert stage.seen == [1, 2, 3]
    assert (stage.finished, stage.closed) == (1, 1)
    assert drain(outbox) == [2, 4, 6, STOP]


def test_failing_hook_fails_loudly_drains_and_still_passes_stop(log_lines: io.StringIO) -> None:
    # Bounded inbox smaller than what upstream sends: the failed stage must keep
    # draining, or the upstream put of STOP would block for ever.
    inbox: queue.Queue[int | Stop] = queue.Queue(maxsize=2)
    outbox: queue.Queue[int | Stop] = queue.Queue(maxsize=8)
    failed = threading.Event()
    stage = Recorder(inbox, outbox, failed, boom=2)
    stage.start()
    for item in (1, 2, 3, 4, 5, 6):
        inbox.put(item, timeout=10)
    inbox.put(STOP, timeout=10)
    stage.join(10)
    assert not stage.is_alive()
    assert isinstance(stage.error, ValueError) and str(stage.error) == "boom at 2"
    assert failed.is_set()
    assert inbox.empty()
    assert stage.seen == [1]
    # No end-of-stream flush after a failure, but resources are released.
    assert (stage.finished, stage.closed) == (0, 1)
    assert drain(outbox) == [2, STOP]
    failures = [e for e in events(log_lines) if e.get("event") == "stage_failed"]
    assert len(failures) == 1
    assert failures[0]["stage"] == "recorder" and failures[0]["level"] == "error"
    assert "boom at 2" in json.dumps(failures[0])


def test_failing_stage_without_outbox_sends_nothing() -> None:
    inbox: queue.Queue[int | Stop] = queue.Queue(maxsize=2)
    failed = threading.Event()
    stage = Recorder(inbox, None, failed, boom=1)
    stage.start()
    inbox.put(1, timeout=10)
    inbox.put(STOP, timeout=10)
    stage.join(10)
    assert not stage.is_alive() and failed.is_set() and stage.closed == 1


def test_idle_hook_runs_when_nothing_arrives_in_time() -> None:
    # timeout 0: the wait never blocks, so no clock is needed and nothing sleeps.
    inbox: queue.Queue[int | Stop] = queue.Queue(maxsize=2)
    outbox: queue.Queue[int | Stop] = queue.Queue(maxsize=2)
    until = threading.Event()
    stage = Recorder(inbox, outbox, threading.Event(), wait_s=0.0, until=until)
    stage.run()  # on this thread: a source stage ends when `until` is set (by idle, here)
    assert stage.idles == 3 and stage.polls == 3
    assert (stage.finished, stage.closed) == (1, 1)
    assert drain(outbox) == [STOP]


def test_source_stage_failure_does_not_drain_its_inbox() -> None:
    # A source stage's inbox (the watcher's hints) never carries STOP: draining
    # it would block for ever.
    inbox: queue.Queue[int | Stop] = queue.Queue(maxsize=4)
    outbox: queue.Queue[int | Stop] = queue.Queue(maxsize=4)
    until = threading.Event()
    stage = Recorder(inbox, outbox, until, boom=7, wait_s=0.0, until=until)
    inbox.put(7)
    inbox.put(8)
    stage.run()
    assert isinstance(stage.error, ValueError) and until.is_set()
    assert drain(inbox) == [8]
    assert drain(outbox) == [STOP]


def test_emit_without_outbox_is_an_error() -> None:
    stage = Recorder(queue.Queue(), None, threading.Event())
    with pytest.raises(RuntimeError, match="no outbox"):
        stage.emit(1, give_up=threading.Event())


def test_put_until_gives_up_once_stopping() -> None:
    q: queue.Queue[int] = queue.Queue(maxsize=1)
    stopping = threading.Event()
    assert put_until(q, 1, stopping, poll_s=0.0)
    stopping.set()
    assert not put_until(q, 2, stopping, poll_s=0.0)
    assert q.get_nowait() == 1


def test_drain_until_stop_stops_at_the_sentinel() -> None:
    q: queue.Queue[int | Stop] = queue.Queue()
    for item in (1, 2, STOP, 3):
        q.put(item)
    drain_until_stop(q)
    assert drain(q) == [3]
    assert repr(STOP) == "STOP"


# -- the embed stage on the base: the micro-batch timer under a fake clock ------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def unit(*reds: int) -> IntakeUnit:
    embedder = ColourEmbedder(EmbedderOptions())
    prepared = tuple(
        Prepared(
            Crop(Path(f"{r}.png"), f"{r}.png"),
            embedder.preprocess(Image.new("RGB", (4, 4), (r, 20, 20))),
        )
        for r in reds
    )
    return IntakeUnit(prepared, tuple(0.0 for _ in reds))


def embed_stage(clock: FakeClock) -> tuple[EmbedStage, queue.Queue[MicroBatch | Stop]]:
    embedder = ColourEmbedder(EmbedderOptions())
    embedder.load()
    inbox: queue.Queue[IntakeUnit | Stop] = queue.Queue()
    outbox: queue.Queue[MicroBatch | Stop] = queue.Queue()
    stage = EmbedStage(
        embedder,
        inbox,
        outbox,
        threading.Event(),
        Progress(60.0, clock=clock),
        batch_size=3,
        max_wait_s=0.2,
        clock=clock,
    )
    return stage, outbox


def names(batch: MicroBatch | Stop) -> list[str]:
    assert isinstance(batch, MicroBatch)
    return [e.crop.name for e in batch.embedded]


def test_embed_stage_flushes_full_late_and_last_batches() -> None:
    clock = FakeClock()
    stage, outbox = embed_stage(clock)
    assert stage.timeout() is None  # nothing held: wait for ever
    stage.handle(unit(1))
    assert stage.timeout() == pytest.approx(0.2) and outbox.empty()
    clock.now += 0.15
    stage.handle(unit(2))
    assert stage.timeout() == pytest.approx(0.05) and outbox.empty()
    stage.handle(unit(3, 4))  # full: 4 crops >= 3, units kept whole
    assert names(outbox.get_nowait()) == ["1.png", "2.png", "3.png", "4.png"]
    stage.handle(unit(5))
    clock.now += 0.2  # the first unit waited max_wait_s: the next one flushes both
    stage.handle(unit(6))
    assert names(outbox.get_nowait()) == ["5.png", "6.png"]
    stage.handle(unit(7))
    stage.idle()  # the timer ran out with nothing new
    assert names(outbox.get_nowait()) == ["7.png"]
    stage.idle()  # nothing held: nothing sent
    stage.handle(unit(8))
    stage.finish()  # end of stream flushes what is held
    assert names(outbox.get_nowait()) == ["8.png"]
    assert outbox.empty()
