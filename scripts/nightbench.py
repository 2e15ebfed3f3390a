"""Simulated nights through the real daemon, measured from ``/proc``: shared by
``bench_writes.py`` and ``endurance.py``.

The daemon (:class:`crop_clusterd.supervisor.Daemon`) runs in this process, in a
thread, with its JSON log going to an in-memory :class:`EventLog`. A night is a
simulated flat-bug session (``simnights.py``: ``crop_clusterd.simulate``, capture
times from 22:00 of its own date) that is generated and hard-linked into a staging
folder BEFORE anything is measured; the measurement starts when the night is
renamed into the watched folder (whole, or frame by frame at a set rate: renames
only, no data written) and ends when the daemon has committed every crop, is idle,
and a snapshot that read the last commit has been written; with sessions, also
once that night's session is closed and its ``summary.json`` (written last of
its final files) exists.

Bytes written come from ``/proc/self/io``, which sums every thread of the process:

* ``wchar``: bytes passed to ``write()`` and friends (page cache or not);
* ``write_bytes``: bytes of page cache this process dirtied, i.e. what it sent
  towards the block device (charged when the page is dirtied, not when it is
  flushed); ``os.sync()`` runs before each reading so that a window's pages are
  flushed inside it;
* ``cancelled_write_bytes``: dirty pages dropped before they were flushed (a file
  replaced or deleted too soon). File system journal and metadata writes are
  charged to kernel threads and are not counted.

``write_bytes`` is charged per page-cache folio: on kernels whose file systems
cache files in large folios (ext4 on Linux 6.18 here), a 4 KB write into a
folio that a large read or copy brought in is charged the whole folio, up to
1 MB, while the device writes the dirty 4 KB blocks only (measured:
``write_bytes`` 1 MB, device 4.2 KB per random 4 KB write into a file written in
1 MB chunks). Where ``write_bytes`` is much larger than ``wchar`` (see
:func:`folio_warning`), read ``wchar`` and the device column: the sectors the
block device holding the state folder wrote (``/sys/dev/block/*/stat``),
counting every process and the file system's own writes, so exact only on an
otherwise quiet machine.

The work folder must be on a disk file system: tmpfs counts no ``write_bytes``.
The embedder is ``projection-<dim>`` from ``tests/fakes.py``: an 8x8 thumbnail
times a fixed random matrix, deterministic, ``dim`` floats, well under a
millisecond per crop, so what is measured is the daemon around the model.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import io
import json
import os
import shutil
import sqlite3
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simnights import feed

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"


# Thresholds at which the projection embedder gives non-trivial partitions of a
# simulated night (about 4x and 3x the individuals, ARI ~0.35 and ~0.4).
PROJECTION_THRESHOLDS = {"cosine": 0.95, "track": 0.8}

SPLITS = ("night", "gap", "none")
"""``session.split`` values (a daemon without sessions behaves as ``"none"``)."""

FAULTS = ("snapshot_failed", "state_commit_failed", "stage_failed")
"""Events that end a measurement: its figures would not be the daemon's normal costs."""

KEPT_EVENTS = frozenset(
    {
        "daemon_started",
        "snapshot_written",
        "batch_committed",
        "session_opened",
        "session_closed",
        "session_outputs_final",
        "state_restored",
        "index_saved",
        *FAULTS,
    }
)


def register_projection(dim: int) -> str:
    """Register the projection fake of width ``dim``; returns its embedder name."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    from fakes import projection_embedder

    from crop_clusterd.embed import EMBEDDERS, register

    cls = projection_embedder(dim)
    name: str = cls.name
    if EMBEDDERS.get(name) is not cls:
        register(cls)
    return name


# --------------------------------------------------------------------------- /proc


def device_stat(folder: Path) -> Path | None:
    """The ``/sys`` stat file of the block device holding ``folder``, if it has one."""
    dev = os.stat(folder).st_dev
    path = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat")
    return path if path.exists() else None


@dataclass(frozen=True)
class Io:
    """Counters of ``/proc/self/io`` and of the device (bytes), or differences of two
    readings. ``device`` is the whole block device's sectors written times 512:
    every process's writes and the file system's own (journal, metadata), so only
    meaningful on an otherwise quiet machine; None where the device has no stat."""

    wchar: int
    write_bytes: int
    cancelled: int
    device: int | None = None

    @classmethod
    def read(cls, device: Path | None = None) -> Io:
        """The counters now, after ``os.sync()`` (so that dirty pages are flushed);
        ``device`` is a :func:`device_stat` file."""
        os.sync()
        fields: dict[str, int] = {}
        for line in Path("/proc/self/io").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = int(value)
        sectors = None if device is None else int(device.read_text().split()[6])
        return cls(
            fields["wchar"],
            fields["write_bytes"],
            fields["cancelled_write_bytes"],
            None if sectors is None else 512 * sectors,
        )

    def __sub__(self, other: Io) -> Io:
        device = None
        if self.device is not None and other.device is not None:
            device = self.device - other.device
        return Io(
            self.wchar - other.wchar,
            self.write_bytes - other.write_bytes,
            self.cancelled - other.cancelled,
            device,
        )

    def per_crop_kb(self, crops: int) -> dict[str, float | None]:
        """KB (1000 bytes) per crop of each counter, and the net ``write_bytes - cancelled``."""
        n = max(1, crops)
        return {
            "write_kb_per_crop": round(self.write_bytes / n / 1000, 2),
            "net_write_kb_per_crop": round((self.write_bytes - self.cancelled) / n / 1000, 2),
            "wchar_kb_per_crop": round(self.wchar / n / 1000, 2),
            "device_kb_per_crop": None if self.device is None else round(self.device / n / 1000, 2),
        }


def evict_page_cache(folder: Path) -> None:
    """Flush and drop the cached pages of every file under ``folder``.

    A file copied in large chunks sits in the page cache as large folios, and this
    kernel's ``write_bytes`` charges a whole folio (up to 1 MB) for a 4 KB write
    into one: a copied state would inflate the first nights' figures. Evicted, its
    pages come back through the daemon's own reads, as after a reboot.
    """
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's malloc.h


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas; call first thing, before any thread starts.

    The benches restart the daemon inside one process, and every restart's new
    threads would get fresh arenas that keep their freed memory: the RSS would
    then grow with the restarts, not with what the daemon holds. With two
    arenas it follows the daemon's live memory (a real restart is a new process,
    which starts clean anyway). Does nothing where glibc is not the allocator.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, arenas)


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class PeakMemory:
    """The RSS high-water mark of this process since :meth:`reset`, in MiB.

    Uses ``VmHWM`` after resetting it (``5`` to ``/proc/self/clear_refs``);
    where that is refused, a thread samples ``VmRSS`` every 20 ms instead.
    """

    def __init__(self) -> None:
        self._sampled = 0
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._hwm = True

    def reset(self) -> None:
        """Free what can be freed, then start a new high-water mark from the RSS now."""
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self._hwm = False
        self._sampled = _status_kib("VmRSS")
        if not self._hwm and self._sampler is None:
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self._sampled = max(self._sampled, _status_kib("VmRSS"))

    def peak_mib(self) -> float:
        """The high-water mark since the last reset, MiB."""
        kib = _status_kib("VmHWM") if self._hwm else max(self._sampled, _status_kib("VmRSS"))
        return round(kib / 1024, 1)


# --------------------------------------------------------------------------- the log


class EventLog(io.TextIOBase):
    """A stream for the daemon's JSON log lines that keeps the events benches read.

    Each kept event is ``(monotonic time written, fields)``. Warnings and errors
    are also echoed to stderr, so a fault during a run shows.
    """

    def __init__(self, keep: frozenset[str] = KEPT_EVENTS) -> None:
        super().__init__()
        self.keep = keep
        self.events: list[tuple[float, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._partial = ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        now = time.monotonic()
        with self._lock:
            text = self._partial + s
            lines = text.split("\n")
            self._partial = lines.pop()
        for line in lines:
            self._line(now, line)
        return len(s)

    def _line(self, now: float, line: str) -> None:
        loud = '"level": "warning"' in line or '"level": "error"' in line
        if not loud and not any(f'"{name}"' in line for name in self.keep):
            return
        try:
            event = json.loads(line)
        except ValueError:
            return
        if loud:
            print(line, file=sys.stderr)
        if event.get("event") in self.keep:
            with self._lock:
                self.events.append((now, event))

    def named(
        self, name: str, since: float = 0.0, until: float = float("inf")
    ) -> list[dict[str, Any]]:
        """The fields of each ``name`` event written in ``[since, until)``."""
        with self._lock:
            return [e for t, e in self.events if e.get("event") == name and since <= t < until]

    def last_time(self, name: str, since: float = 0.0) -> float | None:
        """When the last ``name`` event at or after ``since`` was written, else None."""
        with self._lock:
            times = [t for t, e in self.events if e.get("event") == name and t >= since]
        return max(times, default=None)

    def snapshot_after(self, moment: float) -> bool:
        """Whether a snapshot began reading after ``moment`` and was written."""
        with self._lock:
            return any(
                e.get("event") == "snapshot_written" and t - float(e.get("seconds", 0)) > moment
                for t, e in self.events
            )


def capture_logs(level: str = "info") -> EventLog:
    """Send the daemon's logs, as JSON, to a new :class:`EventLog` and return it."""
    from crop_clusterd.log import configure_logging

    events = EventLog()
    configure_logging("json", level, stream=events)  # type: ignore[arg-type]
    return events


# --------------------------------------------------------------------------- config


def sessions_supported(config: Any) -> bool:
    """Whether this daemon has ``[session]`` (issue 10) and it splits the crops."""
    session = getattr(config, "session", None)
    return session is not None and getattr(session, "split", "none") != "none"


def bench_config(
    root: Path,
    *,
    method: str,
    model: str,
    threshold: float | None,
    snapshot_s: float = 1.0,
    split: str = "night",
    close_after_s: float = 3.0,
) -> Any:
    """The daemon's config for a bench under ``root`` (watch/, state/, out/).

    Defaults everywhere else, with metadata on and the given snapshot interval.
    With sessions (``[session]`` in the config), ``split`` is ``session.split`` and
    a session closes after ``close_after_s`` of silence: between two nights, as it
    would during the day beside a real trap. A daemon without sessions ignores both.
    """
    from crop_clusterd.config import Config

    c = Config()
    config: Any = dataclasses.replace(
        c,
        input=dataclasses.replace(c.input, recursive=True),
        embed=dataclasses.replace(c.embed, model=model),
        link=dataclasses.replace(c.link, method=method, threshold=threshold),  # type: ignore[arg-type]
        watch=dataclasses.replace(c.watch, folder=root / "watch", freeze_after_s=BENCH_FREEZE_S),
        metadata=dataclasses.replace(c.metadata, enabled=True),
        state=dataclasses.replace(c.state, folder=root / "state"),
        output=dataclasses.replace(c.output, folder=root / "out"),
        snapshot=dataclasses.replace(c.snapshot, interval_s=snapshot_s),
    )
    session = getattr(config, "session", None)
    if session is not None:
        session = dataclasses.replace(session, split=split, close_after_s=close_after_s)
        config = dataclasses.replace(config, session=session)
    config.watch.folder.mkdir(parents=True, exist_ok=True)
    return config


# A bench night lasts seconds, not hours: its folders are frozen (see DirMtimes) after
# BENCH_FREEZE_S of quiet, as a real night's are after watch.freeze_after_s (6 h), so
# that restarts and rescans behave as they would the day after a real night.
BENCH_FREEZE_S = 2.0


def committed(state: Path) -> int:
    """Crops plus skipped files committed in a state folder (0 before its database exists)."""
    db = state / "state.sqlite3"
    if not db.exists():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as con:
        try:
            # seq is the primary key: MAX is one index lookup, where COUNT(*) reads every row.
            last = con.execute("SELECT MAX(seq) FROM crops").fetchone()[0]
            skipped = con.execute("SELECT COUNT(*) FROM skipped").fetchone()[0]
        except sqlite3.OperationalError:
            return 0  # tables not created yet
    return (0 if last is None else int(last) + 1) + int(skipped)


# --------------------------------------------------------------------------- the daemon


class RunningDaemon:
    """A :class:`~crop_clusterd.supervisor.Daemon` running in a thread of this process."""

    def __init__(self, config: Any, events: EventLog) -> None:
        from crop_clusterd.supervisor import Daemon

        self.config = config
        self.events = events
        self.began = time.monotonic()
        self.daemon = Daemon(config)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="bench-daemon", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.daemon.run()
        except BaseException as exc:
            self.error = exc

    def _check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"the daemon failed: {self.error}") from self.error
        if not self.thread.is_alive():
            raise RuntimeError("the daemon stopped by itself")

    def _wait(self, condition: Callable[[], bool], what: str, timeout_s: float) -> float:
        """Poll ``condition`` every 20 ms; returns seconds since the daemon was constructed."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            self._check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"daemon: {what} not reached in {timeout_s:.0f} s")
            time.sleep(0.02)
        return time.monotonic() - self.began

    def wait_ready(self, timeout_s: float = 3600.0) -> float:
        """Seconds from construction to ``daemon_started`` (the stages run, READY sent)."""
        return self._wait(lambda: self.daemon.pipeline is not None, "start", timeout_s)

    def idle(self) -> bool:
        """Caught up: the first scan (of the folders changed since the stored walk)
        done, nothing queued, settling, decoding or being linked. The verify walk
        after a start may still be going (see :meth:`verified`)."""
        p = self.daemon.pipeline
        return (
            p is not None
            and p.intake.scans > 0
            and not p.intake.backlog()
            and not p.embed_inbox.qsize()
            and not p.link_inbox.qsize()
            and not self.daemon.progress.busy()
        )

    def wait_idle(self, timeout_s: float = 3600.0) -> float:
        """Seconds from construction until :meth:`idle` (caught up)."""
        self.wait_ready(timeout_s)
        return self._wait(self.idle, "idle", timeout_s)

    def verified(self) -> bool:
        """Idle, and the verify walk after the start (every file stat'ed) is over."""
        p = self.daemon.pipeline
        return p is not None and p.intake.verified and self.idle()

    def wait_verified(self, timeout_s: float = 3600.0) -> float:
        """Seconds from construction until :meth:`verified`."""
        self.wait_ready(timeout_s)
        return self._wait(self.verified, "verify walk done", timeout_s)

    def wait_done(self, expected: int, since: float, timeout_s: float = 3600.0) -> None:
        """Until ``expected`` files are committed in all, the daemon is idle, a snapshot
        read the last commit, and (with sessions) a session closed after it and its
        final files written (``summary.json`` is the last)."""
        from crop_clusterd.sessionfiles import session_folder
        from crop_clusterd.summary import SUMMARY_JSON

        state = self.config.state.folder
        sessions = sessions_supported(self.config)

        def done() -> bool:
            for fault in FAULTS:
                if seen := self.events.named(fault, since):
                    raise RuntimeError(f"the daemon logged {fault}: {seen[0]}")
            if committed(state) < expected or not self.idle():
                return False
            last = self.events.last_time("batch_committed", since) or since
            if not self.events.snapshot_after(last):
                return False
            if not sessions:
                return True
            closed = self.events.named("session_closed", last)
            if not closed:
                return False
            out = self.config.output.folder
            return all(
                (session_folder(out, str(e.get("session"))) / SUMMARY_JSON).exists() for e in closed
            )

        self._wait(done, f"{expected} files committed and written", timeout_s)

    def stop(self, timeout_s: float = 3600.0) -> float:
        """Stop cleanly (final snapshot included); returns the seconds it took."""
        t0 = time.monotonic()
        self.daemon.request_stop("bench")
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            raise TimeoutError(f"daemon did not stop in {timeout_s:.0f} s")
        if self.error is not None:
            raise RuntimeError(f"the daemon failed: {self.error}") from self.error
        return time.monotonic() - t0


@dataclass(frozen=True)
class NightFigures:
    """What one night cost: bytes, snapshots, memory (restart figures are separate)."""

    crops: int
    io: Io
    snapshot_s: tuple[float, ...]
    peak_mib: float
    seconds: float
    sessions_closed: int = 0

    def row(self) -> dict[str, Any]:
        """JSON-ready figures (KB = 1000 bytes)."""
        return {
            "crops": self.crops,
            **self.io.per_crop_kb(self.crops),
            "write_bytes": self.io.write_bytes,
            "cancelled_write_bytes": self.io.cancelled,
            "wchar": self.io.wchar,
            "device_bytes": self.io.device,
            "snapshots": len(self.snapshot_s),
            "snapshot_s_median": round(statistics.median(self.snapshot_s), 3)
            if self.snapshot_s
            else None,
            "snapshot_s_max": round(max(self.snapshot_s), 3) if self.snapshot_s else None,
            "peak_mib": self.peak_mib,
            "seconds": round(self.seconds, 1),
            "sessions_closed": self.sessions_closed,
        }


def run_night(
    daemon: RunningDaemon,
    staged: Path,
    crops: int,
    memory: PeakMemory | None = None,
    rate: float | None = None,
) -> NightFigures:
    """Move a staged night into the watched folder (see :func:`feed`) and measure
    until it is done.

    The daemon must be idle. Returns the bytes written, the snapshot times and
    (with ``memory``) the RSS high-water mark of the window.
    """
    if not daemon.idle():
        raise RuntimeError("run_night: the daemon is not idle")
    before = committed(daemon.config.state.folder)
    if memory is not None:
        memory.reset()
    device = device_stat(daemon.config.state.folder)
    io_before = Io.read(device)
    t0 = time.monotonic()
    feed(staged, daemon.config.watch.folder, rate)
    daemon.wait_done(before + crops, t0)
    io_used = Io.read(device) - io_before
    t1 = time.monotonic()
    snaps = tuple(float(e["seconds"]) for e in daemon.events.named("snapshot_written", t0, t1))
    return NightFigures(
        crops=crops,
        io=io_used,
        snapshot_s=snaps,
        peak_mib=memory.peak_mib() if memory is not None else 0.0,
        seconds=t1 - t0,
        sessions_closed=len(daemon.events.named("session_closed", t0, t1)),
    )


def fresh_folder(path: Path) -> Path:
    """``path``, emptied (created when missing)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def check_disk(folder: Path) -> None:
    """Refuse a tmpfs work folder, where ``write_bytes`` stays 0."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / ".io-probe"
    before = Io.read()
    probe.write_bytes(b"\0" * 65536)
    after = Io.read()
    probe.unlink()
    if (after - before).write_bytes == 0:
        raise SystemExit(
            f"{folder}: writes there are not counted in /proc/self/io write_bytes "
            "(tmpfs?); use --work on a disk file system"
        )


def folio_warning(rows: Sequence[dict[str, Any]], factor: float = 1.5) -> str | None:
    """A warning when a row's ``write_bytes`` exceeds its ``wchar`` ``factor`` times
    or more: large page-cache folios charged whole (see :func:`evict_page_cache`)."""
    worst = max((r["write_bytes"] / max(1, r["wchar"]) for r in rows), default=0.0)
    if worst < factor:
        return None
    return (
        f"note: write_bytes reaches {worst:.1f}x wchar in a row; this kernel charges a "
        "whole large page-cache folio for a small write into it, so write_bytes "
        "overstates what reaches the disk there: read wchar and the device column"
    )


def fmt_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], left: int = 1
) -> str:
    """A plain text table: ``columns`` are (key, heading), the first ``left`` of them
    left-aligned (text), the rest right-aligned; missing values print as -."""
    cells = [[head for _, head in columns]]
    for row in rows:
        cells.append(["-" if row.get(key) is None else str(row[key]) for key, _ in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in cells
    )


def write_json(path: Path, args: argparse.Namespace, model: str, **figures: object) -> None:
    """Write a script's options, model and figures as one JSON file."""
    options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    data = {"options": options, "model": model, **figures}
    path.write_text(json.dumps(data, indent=2) + "\n")
