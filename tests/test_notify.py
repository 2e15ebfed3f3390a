"""Tests for crop_clusterd.notify against real unix datagram sockets."""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from crop_clusterd.log import configure_logging, get_logger
from crop_clusterd.notify import Notifier, Progress, WatchdogPinger, install_stack_dump

pytestmark = pytest.mark.usefixtures("restore_logging")


class Receiver:
    """A bound ``SOCK_DGRAM`` socket standing in for systemd's notify socket."""

    def __init__(self, address: str, sock: socket.socket) -> None:
        self.address = address  # the value for $NOTIFY_SOCKET
        self.sock = sock

    def get(self, timeout: float = 2.0) -> list[str]:
        """The next datagram's assignments; fails when none arrives in time."""
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode().split("\n")

    def pending(self) -> list[list[str]]:
        """Every datagram already queued, without waiting."""
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append(self.sock.recv(4096).decode().split("\n"))
        except BlockingIOError:
            return out


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    # Not tmp_path: AF_UNIX paths are limited to 108 bytes and pytest's get long.
    folder = tempfile.mkdtemp(prefix="ntf")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = os.path.join(folder, "notify")
    sock.bind(path)
    yield Receiver(path, sock)
    sock.close()
    shutil.rmtree(folder)


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    name = f"crop-clusterd-test-{secrets.token_hex(6)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    yield Receiver("@" + name, sock)
    sock.close()


@pytest.fixture
def log_lines() -> io.StringIO:
    out = io.StringIO()
    configure_logging("json", "debug", out, environ={})
    return out


def events(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def named(out: io.StringIO, event: str) -> list[dict[str, Any]]:
    return [e for e in events(out) if e["event"] == event]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- Notifier -----------------------------------------------------------------


def test_ready_status_stopping_reach_the_socket(receiver: Receiver) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": receiver.address})
    assert notifier.enabled
    assert notifier.ready("watching /data\nsecond line")
    assert receiver.get() == ["READY=1", "STATUS=watching /data second line"]
    assert notifier.status("embedded 12 crops\r\n")
    assert receiver.get() == ["STATUS=embedded 12 crops"]
    assert notifier.ready()
    assert receiver.get() == ["READY=1"]
    assert notifier.extend_timeout(90)
    assert receiver.get() == ["EXTEND_TIMEOUT_USEC=90000000"]
    assert notifier.stopping()
    assert receiver.get() == ["STOPPING=1"]


def test_abstract_socket(abstract_receiver: Receiver) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": abstract_receiver.address})
    assert notifier.ready("up")
    assert abstract_receiver.get() == ["READY=1", "STATUS=up"]


def test_unset_socket_is_a_no_op(log_lines: io.StringIO) -> None:
    notifier = Notifier.from_environ({"WATCHDOG_USEC": "5000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval_s is None
    assert not notifier.ready("x")
    assert not notifier.watchdog()
    assert events(log_lines) == []


def test_dead_socket_does_not_raise_and_logs_once(
    receiver: Receiver, log_lines: io.StringIO
) -> None:
    path = receiver.address
    receiver.sock.close()
    os.unlink(path)
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path})
    assert not notifier.ready()
    assert not notifier.status("still nobody")
    assert not notifier.stopping()
    (failed,) = named(log_lines, "notify_failed")
    assert failed["socket"] == path
    assert "FileNotFoundError" in failed["error"] or "ConnectionRefused" in failed["error"]

    # systemd comes back (a fresh socket at the same path): sending recovers.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    receiver.sock = sock
    assert notifier.status("back")
    assert receiver.get() == ["STATUS=back"]
    assert len(named(log_lines, "notify_recovered")) == 1


def test_malformed_assignment_is_a_caller_bug(receiver: Receiver) -> None:
    notifier = Notifier(receiver.address)
    with pytest.raises(ValueError, match="KEY=value"):
        notifier.send("READY")
    with pytest.raises(ValueError, match="KEY=value"):
        notifier.send("STATUS=a\nREADY=1")
    with pytest.raises(ValueError, match="at least one"):
        notifier.send()
    assert receiver.pending() == []


def test_watchdog_interval_from_environ(receiver: Receiver) -> None:
    base = {"NOTIFY_SOCKET": receiver.address, "WATCHDOG_USEC": "30000000"}
    assert Notifier.from_environ(base).watchdog_interval_s == 30.0
    mine = {**base, "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_environ(mine).watchdog_interval_s == 30.0
    theirs = {**base, "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier.from_environ(theirs).watchdog_interval_s is None
    assert Notifier.from_environ({**base, "WATCHDOG_USEC": "0"}).watchdog_interval_s is None
    assert Notifier.from_environ({**base, "WATCHDOG_USEC": "soon"}).watchdog_interval_s is None


def test_pinger_does_nothing_when_watchdog_pid_is_another_process(receiver: Receiver) -> None:
    environ = {
        "NOTIFY_SOCKET": receiver.address,
        "WATCHDOG_USEC": "20000",
        "WATCHDOG_PID": str(os.getpid() + 1),
    }
    pinger = WatchdogPinger(Notifier.from_environ(environ), lambda: True)
    pinger.start()
    pinger.join(2.0)
    assert not pinger.is_alive()
    assert receiver.pending() == []


# --- Progress -----------------------------------------------------------------


def test_progress_reports_only_units_busy_past_stall() -> None:
    clock = FakeClock()
    progress = Progress(stall_s=120, clock=clock)
    assert progress.healthy() and progress.stalled() == []
    progress.begin("embed")
    clock.now += 100
    progress.begin("decode")
    clock.now += 30  # embed busy 130 s, decode 30 s
    assert progress.stalled() == [("embed", 130.0)]
    assert not progress.healthy()
    assert progress.busy() == [("embed", 130.0), ("decode", 30.0)]
    progress.end("embed")
    assert progress.healthy()
    progress.end("decode")
    clock.now += 1000  # idle for long is fine
    assert progress.busy() == [] and progress.healthy()


def test_progress_working_ends_on_error_and_nested_units() -> None:
    clock = FakeClock()
    progress = Progress(stall_s=10, clock=clock)
    with pytest.raises(RuntimeError), progress.working("embed"):
        raise RuntimeError("model failed")
    assert progress.busy() == []
    with progress.working("link"):
        clock.now += 5
        with progress.working("link"):
            clock.now += 6
            # The outer unit started 11 s ago: it is the one that counts.
            assert progress.stalled() == [("link", 11.0)]
        assert progress.stalled() == [("link", 11.0)]
    assert progress.healthy()
    with pytest.raises(ValueError, match="without a matching begin"):
        progress.end("link")
    with pytest.raises(ValueError, match="stall_s"):
        Progress(stall_s=0)


def test_progress_tracks_threads_separately() -> None:
    clock = FakeClock()
    progress = Progress(stall_s=10, clock=clock)
    progress.begin("decode")
    started = threading.Event()
    release = threading.Event()

    def worker() -> None:
        with progress.working("decode"):
            started.set()
            release.wait(5)

    thread = threading.Thread(target=worker)
    thread.start()
    assert started.wait(5)
    clock.now += 20
    progress.end("decode")  # the main thread's unit; the worker's is still open
    assert progress.stalled() == [("decode", 20.0)]
    release.set()
    thread.join(5)
    assert progress.healthy()


# --- WatchdogPinger -----------------------------------------------------------


def test_pinger_pings_while_healthy_withholds_while_stalled_and_resumes(
    receiver: Receiver, log_lines: io.StringIO
) -> None:
    clock = FakeClock()
    progress = Progress(stall_s=120, clock=clock)
    notifier = Notifier.from_environ(
        {"NOTIFY_SOCKET": receiver.address, "WATCHDOG_USEC": "60000000"}
    )
    pinger = WatchdogPinger(notifier, progress.healthy, stalled=progress.stalled)
    assert pinger.interval_s == 60.0
    assert pinger.tick()
    progress.begin("embed")
    clock.now += 100
    assert pinger.tick()  # busy, but not yet for too long
    assert receiver.pending() == [["WATCHDOG=1"], ["WATCHDOG=1"]]

    clock.now += 30
    assert not pinger.tick()
    clock.now += 30
    assert not pinger.tick()
    assert receiver.pending() == []
    (withheld,) = named(log_lines, "watchdog_withheld")  # once per episode
    assert withheld["stalled"] == ["embed (130 s)"]
    assert withheld["level"] == "error"

    progress.end("embed")
    assert pinger.tick()
    assert receiver.pending() == [["WATCHDOG=1"]]
    assert len(named(log_lines, "watchdog_resumed")) == 1
    assert pinger.pings == 3

    progress.begin("decode")
    clock.now += 121
    assert not pinger.tick()
    assert [e["stalled"] for e in named(log_lines, "watchdog_withheld")] == [
        ["embed (130 s)"],
        ["decode (121 s)"],
    ]


def test_pinger_treats_a_failing_check_as_unhealthy(
    receiver: Receiver, log_lines: io.StringIO
) -> None:
    def broken() -> bool:
        raise OSError("observer thread gone")

    pinger = WatchdogPinger(Notifier(receiver.address, 10_000_000), broken)
    assert not pinger.tick()
    assert receiver.pending() == []
    (withheld,) = named(log_lines, "watchdog_withheld")
    assert withheld["error"] == "OSError: observer thread gone"


def test_pinger_thread_pings_every_half_interval_until_stopped(receiver: Receiver) -> None:
    waits: list[float] = []

    def fake_wait(seconds: float) -> bool:
        waits.append(seconds)
        return len(waits) == 3  # "stop requested" during the third wait

    notifier = Notifier.from_environ(
        {"NOTIFY_SOCKET": receiver.address, "WATCHDOG_USEC": "8000000"}
    )
    pinger = WatchdogPinger(notifier, lambda: True, wait=fake_wait)
    pinger.start()
    pinger.join(5)
    assert not pinger.is_alive()
    assert waits == [4.0, 4.0, 4.0]
    assert receiver.pending() == [["WATCHDOG=1"]] * 3


def test_pinger_stop_ends_a_real_wait_promptly(receiver: Receiver) -> None:
    notifier = Notifier(receiver.address, watchdog_usec=3600 * 1_000_000)
    pinger = WatchdogPinger(notifier, lambda: True)
    pinger.start()
    assert receiver.get() == ["WATCHDOG=1"]  # first ping at once, then a 30 min wait
    started = time.monotonic()
    pinger.stop()
    assert not pinger.is_alive()
    assert time.monotonic() - started < 2


# --- stack dump ---------------------------------------------------------------


def test_sigusr1_logs_every_threads_stack(log_lines: io.StringIO) -> None:
    release = threading.Event()

    def parked_in_model_call() -> None:
        release.wait(10)

    worker = threading.Thread(target=parked_in_model_call, name="embed-worker")
    worker.start()
    previous = install_stack_dump(get_logger("crop_clusterd.test"))
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while not named(log_lines, "thread_stacks") and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        signal.signal(signal.SIGUSR1, previous)
        release.set()
        worker.join(5)
    (dump,) = named(log_lines, "thread_stacks")
    assert dump["signal"] == "SIGUSR1"
    assert dump["threads"][0] == "MainThread"
    assert "embed-worker" in dump["threads"]
    assert "Thread embed-worker" in dump["stacks"]
    assert "in parked_in_model_call" in dump["stacks"]
    assert "in test_sigusr1_logs_every_threads_stack" in dump["stacks"]


def test_stack_dump_refuses_other_threads() -> None:
    errors: list[BaseException] = []

    def install() -> None:
        try:
            install_stack_dump(get_logger("crop_clusterd.test"))
        except ValueError as exc:
            errors.append(exc)

    thread = threading.Thread(target=install)
    thread.start()
    thread.join(5)
    assert len(errors) == 1
