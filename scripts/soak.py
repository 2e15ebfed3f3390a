"""Crash soak: feed a daemon child simulated crops while SIGKILLing it at bad moments.

    python scripts/soak.py --crops 2000 --kills 20 --json soak.json

A simulated trap session (``crop_clusterd.simulate``) is copied frame by frame
into a watched folder at a steady rate while a daemon child process (the instant
colour fake embedder by default, ``--model efficientnet-lite0`` for the real one)
works on it. The child is killed with SIGKILL ``--kills`` times and restarted each
time. Kills are aimed: some land while a snapshot file is half written (a temp file
exists, not yet renamed), some inside a state commit (rows inserted, COMMIT not yet
run), some during model load, the rest at random moments. The child widens those
windows a little (``--commit-delay``, ``--snapshot-delay``, ``--load-delay``) and
logs a marker as it enters each; the parent kills the moment it reads the marker
and afterwards checks whether the kill really landed inside (the child's matching
"done" marker must not follow).

A reader thread polls ``clusters.csv``, ``embeddings.pkl``, ``merges.csv`` and
``errors.csv`` all along and parses every version it sees. At the end (SIGTERM,
clean stop) every crop must be in ``clusters.csv`` exactly once, the partition
must equal the batch command's on the same files and the state database must pass
``PRAGMA integrity_check``. Prints a table and, with ``--json``, writes the figures.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crop_clusterd.defaults import DEFAULT_METHOD, METHODS

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"

KILL_KINDS = ("commit", "snapshot", "load", "random")
# With --nights 2: one kill aimed at the moment a night is closed, before its final
# files are written (the next start must finish them).
CLOSE_KILL = "close"

# Marker event the child logs when it enters a window, and the one it logs on leaving it.
WINDOWS = {
    "commit": ("soak_commit_pending", "soak_commit_done"),
    "snapshot": ("soak_snapshot_tmp", "soak_snapshot_tmp_done"),
    "load": ("soak_model_loading", "model_loaded"),
    CLOSE_KILL: ("session_closed", "session_outputs_final"),
}


# --------------------------------------------------------------------------- the child


@dataclass(frozen=True)
class ChildSpec:
    """How to run one daemon child (passed to it as JSON)."""

    tmp: str
    watch: str
    method: str = "cosine"
    model: str = "colour-test"
    # debug: crop_assigned lines (one per committed crop) show double commits.
    log_level: str = "debug"
    split: str = "none"
    rescan_s: float = 1.0
    load_delay_s: float = 0.0
    commit_delay_s: float = 0.0
    snapshot_delay_s: float = 0.0
    exit_when_idle_s: float | None = None


def child_config(spec: ChildSpec) -> Any:
    """The daemon config of a child: the test suite's fast one, with the spec's changes."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import test_supervisor as t

    config = t.make_config(Path(spec.tmp), Path(spec.watch), spec.method)
    config = dataclasses.replace(
        config,
        watch=dataclasses.replace(config.watch, rescan_s=spec.rescan_s),
        session=dataclasses.replace(config.session, split=spec.split),  # type: ignore[arg-type]
    )
    if spec.model != "colour-test":
        config = dataclasses.replace(
            config,
            embed=dataclasses.replace(config.embed, model=spec.model, batch_size=16),
            link=dataclasses.replace(config.link, threshold=None),
        )
    return config


def register_fakes() -> None:
    """Make the colour fake embedder available under its name (``colour-test``)."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    from fakes import ColourEmbedder

    from crop_clusterd.embed import register

    register(ColourEmbedder)


class _SlowCommit:
    """Wraps the store's connection: waits (and says so) between the INSERTs and COMMIT."""

    def __init__(self, db: sqlite3.Connection, delay_s: float, log: Any) -> None:
        self._db = db
        self._delay_s = delay_s
        self._log = log

    def __enter__(self) -> Any:
        return self._db.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        if exc[0] is None:
            self._log.info("soak_commit_pending")
            time.sleep(self._delay_s)
        result = self._db.__exit__(*exc)
        self._log.info("soak_commit_done")
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


def install_child_hooks(spec: ChildSpec, embedder: Any) -> None:
    """Widen the crash windows and log markers: model load, commit, snapshot temp files.

    Only test scaffolding is patched (module attributes and the embedder instance);
    the daemon code runs unchanged inside the windows.
    """
    from crop_clusterd import atomic
    from crop_clusterd.log import get_logger
    from crop_clusterd.store import StateStore

    # Under crop_clusterd: other loggers only pass warnings.
    log = get_logger("crop_clusterd.soak")

    load = embedder.load
    embed = embedder.embed

    def slow_load() -> None:
        log.info("soak_model_loading")
        time.sleep(spec.load_delay_s)
        load()

    def counting_embed(batch: Any) -> Any:
        # Counts every crop that goes through the model, so re-embedding after a
        # crash shows up as more model crops than committed crops.
        log.info("soak_embedded", n=len(batch))
        return embed(batch)

    embedder.load = slow_load
    embedder.embed = counting_embed

    commit_batch = StateStore.commit_batch

    def slow_commit_batch(self: Any, *args: Any, **kwargs: Any) -> None:
        db = self._db
        self._db = _SlowCommit(db, spec.commit_delay_s, log)
        try:
            commit_batch(self, *args, **kwargs)
        finally:
            self._db = db

    StateStore.commit_batch = slow_commit_batch  # type: ignore[method-assign]

    atomic_write = atomic.atomic_write

    def slow_atomic_write(path: Path, write: Callable[[Any], None], *, sync: bool = True) -> None:
        def slow(handle: Any) -> None:
            write(handle)
            # The temp file now holds the data; it is neither fsynced nor renamed.
            log.info("soak_snapshot_tmp", file=Path(path).name)
            time.sleep(spec.snapshot_delay_s)

        atomic_write(path, slow, sync=sync)
        log.info("soak_snapshot_tmp_done", file=Path(path).name)

    # Every output writer calls atomic.atomic_write through the module, so this
    # one patch covers them all.
    atomic.atomic_write = slow_atomic_write


def child_main(spec: ChildSpec) -> int:
    """Run the daemon in this process with the soak hooks; JSON logs on stdout."""
    register_fakes()
    from crop_clusterd.factory import embedder_from_config
    from crop_clusterd.log import configure_logging
    from crop_clusterd.supervisor import Daemon

    configure_logging("json", spec.log_level, stream=sys.stdout)
    config = child_config(spec)
    embedder = embedder_from_config(config)
    install_child_hooks(spec, embedder)
    summary = Daemon(config, embedder=embedder, exit_when_idle_s=spec.exit_when_idle_s).run()
    print(json.dumps({"event": "soak_summary", **dataclasses.asdict(summary)}), flush=True)
    return 0


# --------------------------------------------------------------------------- the parent


@dataclass
class Child:
    """A running daemon child, its log events and an optional kill trigger."""

    proc: subprocess.Popen[str]
    spawned: float
    armed: str | None = None  # marker event that triggers SIGKILL
    events: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    killed_at: float | None = None
    killed_on: str | None = None
    started_at: float | None = None  # daemon_started
    first_commit_at: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    reader: threading.Thread | None = None

    def kill(self, why: str) -> None:
        """SIGKILL now (once)."""
        with self.lock:
            if self.killed_at is not None or self.proc.poll() is not None:
                return
            os.kill(self.proc.pid, signal.SIGKILL)
            self.killed_at = time.monotonic()
            self.killed_on = why

    def read(self) -> None:
        """Collect JSON log lines; kill the moment the armed marker appears."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            now = time.monotonic()
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            name = event.get("event")
            if name == self.armed:
                self.kill(str(name))
            self.events.append((now, event))
            if name == "daemon_started" and self.started_at is None:
                self.started_at = now
            if name == "batch_committed" and self.first_commit_at is None:
                self.first_commit_at = now

    def names(self) -> list[str]:
        """The event names seen so far, in order."""
        return [str(e.get("event")) for _, e in self.events]


def spawn(spec: ChildSpec, armed: str | None = None) -> Child:
    """Start a daemon child running :func:`child_main`."""
    proc = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            json.dumps(dataclasses.asdict(spec)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    child = Child(proc, time.monotonic(), armed=armed)
    child.reader = threading.Thread(target=child.read, daemon=True)
    child.reader.start()
    return child


def finish(child: Child, timeout_s: float = 60.0) -> int:
    """Wait for the child to exit and its log to be read; return its exit status."""
    code = child.proc.wait(timeout_s)
    if child.reader is not None:
        child.reader.join(timeout_s)
    return code


@dataclass
class FileVersions:
    """What the reader thread saw of one output file."""

    versions: int = 0
    bad: list[str] = field(default_factory=list)


class OutputReader(threading.Thread):
    """Polls the snapshot files and parses every version it sees, completely."""

    FILES = ("clusters.csv", "embeddings.pkl", "merges.csv", "errors.csv")

    def __init__(self, out: Path, poll_s: float = 0.02) -> None:
        super().__init__(name="output-reader", daemon=True)
        self.out = out
        self.poll_s = poll_s
        self.stop = threading.Event()
        self.seen: dict[str, FileVersions] = {f: FileVersions() for f in self.FILES}
        self._keys: dict[str, tuple[int, int, int]] = {}
        self._last_names: set[str] = set()
        self._target = os.path.realpath(out)
        self.shrank = 0  # clusters.csv versions that lost crops an earlier one had

    def run(self) -> None:
        """Poll until stopped, then once more."""
        while not self.stop.is_set():
            self.poll()
            self.stop.wait(self.poll_s)
        self.poll()

    def poll(self) -> None:
        """Parse each file whose inode, mtime or size changed since the last look."""
        target = os.path.realpath(self.out)
        if target != self._target:
            # OUT/current moved on to the next night: its files start afresh.
            self._target = target
            self._last_names = set()
        for name in self.FILES:
            path = self.out / name
            try:
                with open(path, "rb") as handle:
                    st = os.fstat(handle.fileno())
                    key = (st.st_ino, st.st_mtime_ns, st.st_size)
                    if self._keys.get(name) == key:
                        continue
                    self._keys[name] = key
                    data = handle.read()
            except FileNotFoundError:
                continue
            record = self.seen[name]
            record.versions += 1
            try:
                self._check(name, data)
            except Exception as exc:
                record.bad.append(f"version {record.versions}: {type(exc).__name__}: {exc}")

    def _check(self, name: str, data: bytes) -> None:
        if name == "embeddings.pkl":
            with tempfile.NamedTemporaryFile(suffix=".pkl") as tmp:
                tmp.write(data)
                tmp.flush()
                from crop_clusterd.embfile import load_embeddings_pickle

                loaded = load_embeddings_pickle(Path(tmp.name))
            if len(loaded.names) != loaded.embeddings.shape[0]:
                raise ValueError("names and embedding rows differ in number")
            return
        rows = list(csv.reader(data.decode("utf-8", "surrogateescape").splitlines()))
        header = {
            "clusters.csv": ["filename", "cluster"],
            "merges.csv": ["time", "from", "into"],
            "errors.csv": ["filename", "reason"],
        }[name]
        if not rows or rows[0] != header:
            raise ValueError(f"header {rows[:1]!r}, expected {header!r}")
        if data and not data.endswith(b"\n"):
            raise ValueError("last line is not terminated (truncated file)")
        for i, row in enumerate(rows[1:], start=2):
            if len(row) != len(header):
                raise ValueError(f"line {i}: {len(row)} columns")
        if name == "clusters.csv":
            names = [r[0] for r in rows[1:]]
            for r in rows[1:]:
                int(r[1])
            if len(set(names)) != len(names):
                raise ValueError("a crop appears twice")
            if not self._last_names <= set(names):
                self.shrank += 1
            self._last_names = set(names)


def committed_count(state: Path) -> int:
    """Crops plus skipped files committed in the state database (0 when unreadable)."""
    try:
        with sqlite3.connect(f"file:{state / 'state.sqlite3'}?mode=ro", uri=True, timeout=5) as db:
            crops = db.execute("SELECT COUNT(*) FROM crops").fetchone()[0]
            skipped = db.execute("SELECT COUNT(*) FROM skipped").fetchone()[0]
        return int(crops) + int(skipped)
    except sqlite3.Error:
        return 0


def integrity(state: Path) -> str:
    """``PRAGMA integrity_check`` of the state database."""
    with sqlite3.connect(state / "state.sqlite3") as db:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])


@dataclass(frozen=True)
class SoakOptions:
    """What to soak."""

    work: Path
    crops: int = 2000
    kills: int = 20
    seconds: float = 90.0  # how long feeding the crops takes
    seed: int = 1
    method: str = "cosine"
    model: str = "colour-test"
    load_delay_s: float = 0.3
    commit_delay_s: float = 0.05
    snapshot_delay_s: float = 0.05
    compare_batch: bool = True
    nights: int = 1  # > 1: session.split = "night", crops spread over consecutive nights


@dataclass(frozen=True)
class KillRecord:
    """One SIGKILL: what it aimed at, and whether it landed inside that window."""

    kind: str
    at_s: float
    trigger: str  # the marker event, "random", or "fallback" when the window never came
    in_window: bool | None  # None for random kills


@dataclass(frozen=True)
class SoakResult:
    """The figures of one soak run."""

    crops_in: int
    crops_in_csv: int
    duplicates: int
    lost: int
    extra: int
    partition_equals_batch: bool | None
    integrity: str
    kills: tuple[KillRecord, ...]
    restarts: int
    model_crops: int
    redone_crops: int
    assigned_twice: int
    recovery_started_s: tuple[float, ...]
    recovery_commit_s: tuple[float, ...]
    versions_seen: dict[str, int]
    bad_versions: dict[str, list[str]]
    shrinking_versions: int
    leftover_temp_files: int
    final_exit_code: int
    seconds: float

    @property
    def ok(self) -> bool:
        """Whether nothing was lost, duplicated, corrupted or torn."""
        return (
            self.duplicates == 0
            and self.lost == 0
            and self.extra == 0
            and self.partition_equals_batch is not False
            and self.integrity == "ok"
            and self.assigned_twice == 0
            and not any(self.bad_versions.values())
            and self.shrinking_versions == 0
            and self.final_exit_code == 0
        )


def _frames_for(crops: int, seed: int, dest: Path, nights: int = 1) -> list[Path]:
    """Simulate ``nights`` nights with at least ``crops`` crops in all; their frame folders.

    Night ``k`` starts at 22:00 on the ``k``-th day after 2024-07-01, so frame
    names sort night by night.
    """
    frames: list[Path] = []
    for k in range(nights):
        frames += _night_frames(-(-crops // nights), seed + k, dest / f"night{k}", k)
    return sorted(frames, key=lambda p: p.name)


def _night_frames(crops: int, seed: int, dest: Path, night: int) -> list[Path]:
    """One simulated night with at least ``crops`` crops; its frame folders."""
    from datetime import datetime, timedelta

    from crop_clusterd.simulate import SimConfig, simulate

    start = datetime(2024, 7, 1, 22) + timedelta(days=night)
    frames = max(2, int(crops / 10.0) + 2)
    while True:
        simulate(
            SimConfig(
                seed=seed, frames=frames, mean_present=14.0, start=start, behaviour="classic"
            ),
            dest,
        )
        if sum(1 for _ in dest.rglob("*.png")) >= crops:
            return sorted(p for p in dest.iterdir() if p.is_dir())
        # Fewer insects visited than expected: a longer night, from scratch.
        shutil.rmtree(dest)
        frames = int(frames * 1.5) + 1


def _plan(kills: int, rng: random.Random, nights: int = 1) -> list[str]:
    """Kill kinds: the aimed ones equally often, in random order.

    Across nights, the middle kill waits for the first night to close.
    """
    kinds = [KILL_KINDS[i % len(KILL_KINDS)] for i in range(kills)]
    rng.shuffle(kinds)
    if nights > 1 and kinds:
        kinds[len(kinds) // 2] = CLOSE_KILL
    return kinds


def run_soak(opts: SoakOptions, say: Callable[[str], None] = print) -> SoakResult:
    """Run one soak (see the module docstring) and return its figures."""
    t_start = time.monotonic()
    rng = random.Random(opts.seed)
    work = opts.work
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    src = work / "session"
    frames = _frames_for(opts.crops, opts.seed, src, opts.nights)

    # Only as many frames as hold the asked-for number of crops (at least).
    chosen: list[Path] = []
    total = 0
    for frame in frames:
        chosen.append(frame)
        total += len(list((frame / "crops").glob("*.png")))
        if total >= opts.crops:
            break
    watch = work / "watch"
    watch.mkdir()
    spec = ChildSpec(
        tmp=str(work),
        watch=str(watch),
        method=opts.method,
        model=opts.model,
        load_delay_s=opts.load_delay_s,
        commit_delay_s=opts.commit_delay_s,
        snapshot_delay_s=opts.snapshot_delay_s,
        split="night" if opts.nights > 1 else "none",
    )
    state = work / "state"
    out = work / "out"
    say(
        f"soak: {total} crops in {len(chosen)} frames over {opts.seconds:.0f} s, {opts.kills} kills"
    )

    feed_done = threading.Event()
    fed: list[int] = [0]

    # The close kill must be armed before the next night's first frame lands: the
    # feeder waits for it there (up to 10 minutes), the kill loop waits for the feeder.
    boundary, close_armed = threading.Event(), threading.Event()
    first_night = chosen[0].name[:8]

    def feed() -> None:
        period = opts.seconds / max(1, len(chosen))
        next_at = time.monotonic()
        for frame in chosen:
            if CLOSE_KILL in plan and frame.name[:8] != first_night and not boundary.is_set():
                boundary.set()
                close_armed.wait(600.0)
            shutil.copytree(frame, watch / frame.name)
            fed[0] += len(list((frame / "crops").glob("*.png")))
            next_at += period
            time.sleep(max(0.0, next_at - time.monotonic()))
        feed_done.set()

    # Across nights the reader follows OUT/current, the path people tail.
    reader = OutputReader(out / "current" if opts.nights > 1 else out)
    reader.start()
    plan = _plan(opts.kills, rng, opts.nights)
    children: list[Child] = []
    kills: list[KillRecord] = []

    def start(next_kind: str | None) -> Child:
        armed = WINDOWS["load"][0] if next_kind == "load" else None
        child = spawn(spec, armed)
        children.append(child)
        return child

    child = start(plan[0] if plan else None)
    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        kill_period = opts.seconds / (opts.kills + 1)
        for i, kind in enumerate(plan):
            due = t_start + (i + 1) * kill_period * rng.uniform(0.85, 1.15)
            if kind == "load":
                pass  # armed at spawn: it dies while loading
            elif kind == CLOSE_KILL:
                boundary.wait(120.0)
                child.armed = WINDOWS[kind][0]
                close_armed.set()
            else:
                time.sleep(max(0.0, due - time.monotonic()))
                if kind == "random":
                    time.sleep(rng.uniform(0.0, 0.5))
                    child.kill("random")
                else:
                    child.armed = WINDOWS[kind][0]
            # A night closes only once the backlog of its own crops is through.
            deadline = time.monotonic() + (120.0 if kind == CLOSE_KILL else 20.0)
            while child.killed_at is None and child.proc.poll() is None:
                if time.monotonic() > deadline:
                    # The window never came (nothing to commit?): kill anyway.
                    child.kill("fallback")
                    break
                time.sleep(0.005)
            finish(child)
            if child.killed_at is None:
                raise RuntimeError(f"daemon child exited by itself: {child.names()[-5:]}")
            aimed = child.killed_on if child.killed_on in WINDOWS.get(kind, ("",)) else None
            in_window: bool | None = None
            if kind != "random":
                names = child.names()
                enter, leave = WINDOWS[kind]
                in_window = (
                    aimed == enter
                    and enter in names
                    and leave not in names[len(names) - names[::-1].index(enter) :]
                )
            kills.append(
                KillRecord(
                    kind, round(child.killed_at - t_start, 2), str(child.killed_on), in_window
                )
            )
            say(
                f"  kill {i + 1}/{len(plan)}: {kind:<8} on {child.killed_on}, "
                f"in window: {in_window}"
            )
            child = start(plan[i + 1] if i + 1 < len(plan) else None)
        feeder.join()
        # Let the last child finish everything, then stop it cleanly.
        deadline = time.monotonic() + 300.0
        # SIGTERM before the daemon installed its handler would just kill it.
        while committed_count(state) < fed[0] or child.started_at is None:
            if time.monotonic() > deadline or child.proc.poll() is not None:
                raise RuntimeError(f"daemon child did not catch up: {child.names()[-5:]}")
            time.sleep(0.1)
        child.proc.send_signal(signal.SIGTERM)
        final_code = finish(child)
    finally:
        for c in children:
            if c.proc.poll() is None:
                c.proc.kill()
                c.proc.wait()
        reader.stop.set()
        reader.join(30)

    live = session_partitions(out)
    names = [n for rows in live.values() for n, _ in rows]
    expected = {str(p) for p in watch.rglob("*.png")}
    equal: bool | None = None
    if opts.compare_batch:
        from crop_clusterd.batch import BatchRequest, run_batch

        config = child_config(spec)
        batch_out = work / "batch-out"
        config = dataclasses.replace(
            config, output=dataclasses.replace(config.output, folder=batch_out)
        )
        run_batch(BatchRequest(config, inputs=(str(watch),)))
        equal = _partition(live) == _partition(session_partitions(batch_out))
    model_crops = sum(
        int(e.get("n", 0))
        for c in children
        for _, e in c.events
        if e.get("event") == "soak_embedded"
    )
    assigned = Counter(
        str(e.get("file"))
        for c in children
        for _, e in c.events
        if e.get("event") == "crop_assigned"
    )
    restarts = children[1:]
    started = [c.started_at - c.spawned for c in restarts if c.started_at is not None]
    first = [c.first_commit_at - c.spawned for c in restarts if c.first_commit_at is not None]
    return SoakResult(
        crops_in=len(expected),
        crops_in_csv=len(names),
        duplicates=len(names) - len(set(names)),
        lost=len(expected - set(names)),
        extra=len(set(names) - expected),
        partition_equals_batch=equal,
        integrity=integrity(state),
        kills=tuple(kills),
        restarts=len(restarts),
        model_crops=model_crops,
        redone_crops=model_crops - len(set(names)),
        assigned_twice=sum(1 for n in assigned.values() if n > 1),
        recovery_started_s=tuple(round(s, 3) for s in started),
        recovery_commit_s=tuple(round(s, 3) for s in first),
        versions_seen={k: v.versions for k, v in reader.seen.items()},
        bad_versions={k: v.bad for k, v in reader.seen.items()},
        shrinking_versions=reader.shrank,
        leftover_temp_files=sum(1 for p in out.rglob("*") if ".tmp-" in p.name),
        final_exit_code=final_code,
        seconds=round(time.monotonic() - t_start, 1),
    )


def session_partitions(out: Path) -> dict[str, list[tuple[str, int]]]:
    """The rows of every session's clusters.csv under ``out`` (``"."``: no sessions)."""
    from crop_clusterd.csvfiles import read_clusters_csv

    if (out / "clusters.csv").exists():
        return {".": read_clusters_csv(out / "clusters.csv")}
    return {
        p.parent.name: read_clusters_csv(p)
        for p in sorted(out.glob("*/clusters.csv"))
        if not p.parent.is_symlink()
    }


def _partition(sessions: dict[str, list[tuple[str, int]]]) -> set[frozenset[str]]:
    """One partition of every crop: clusters are per session, so keyed by session too."""
    groups: dict[tuple[str, int], set[str]] = {}
    for session, rows in sessions.items():
        for name, cluster in rows:
            groups.setdefault((session, cluster), set()).add(name)
    return {frozenset(g) for g in groups.values()}


def _median_max(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.2f} / {max(values):.2f}"


def table(result: SoakResult) -> str:
    """The soak's figures as a two-column text table."""
    by_kind = Counter(k.kind for k in result.kills)
    landed = Counter(k.kind for k in result.kills if k.in_window)
    kinds = ", ".join(
        f"{k} {by_kind[k]}" + (f" ({landed[k]} in window)" if k in WINDOWS else "")
        for k in (*KILL_KINDS, CLOSE_KILL)
        if by_kind[k] or k != CLOSE_KILL
    )
    rows = [
        ("outcome", "PASS" if result.ok else "FAIL"),
        ("crops in folder", result.crops_in),
        ("crops in clusters.csv", result.crops_in_csv),
        ("duplicates / lost / extra", f"{result.duplicates} / {result.lost} / {result.extra}"),
        ("partition equals batch", result.partition_equals_batch),
        ("state integrity_check", result.integrity),
        ("SIGKILLs", f"{len(result.kills)}: {kinds}"),
        ("restarts", result.restarts),
        ("crops through the model", result.model_crops),
        ("redone crops (embedded twice)", result.redone_crops),
        ("crops committed twice (log)", result.assigned_twice),
        ("restart to daemon_started s (median / max)", _median_max(result.recovery_started_s)),
        ("restart to first commit s (median / max)", _median_max(result.recovery_commit_s)),
        (
            "snapshot versions parsed",
            ", ".join(f"{k} {v}" for k, v in result.versions_seen.items()),
        ),
        ("torn / unparsable versions", sum(len(v) for v in result.bad_versions.values())),
        ("clusters.csv versions that shrank", result.shrinking_versions),
        ("temp files left in output folder", result.leftover_temp_files),
        ("final exit code (SIGTERM)", result.final_exit_code),
        ("wall time s", result.seconds),
    ]
    width = max(len(str(k)) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def result_json(result: SoakResult) -> dict[str, Any]:
    """The figures as JSON-ready data (with ``ok``)."""
    data = dataclasses.asdict(result)
    data["ok"] = result.ok
    return data


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run a soak, print the table, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--crops", type=int, default=2000)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=90.0, help="how long feeding takes")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD)
    parser.add_argument("--model", default="colour-test", help="colour-test or efficientnet-lite0")
    parser.add_argument("--work", type=Path, default=Path("/tmp/crop-clusterd-soak"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--no-batch", action="store_true", help="skip the batch comparison")
    parser.add_argument("--nights", type=int, default=1,
                        help="spread the crops over this many nights (session.split = night) "
                             "and aim one kill at a night's close")  # fmt: skip
    args = parser.parse_args(argv)
    if args.child:
        return child_main(ChildSpec(**json.loads(args.child)))
    register_fakes()
    signal.signal(signal.SIGTERM, _interrupt)  # so that the children are killed too
    result = run_soak(
        SoakOptions(
            work=args.work,
            crops=args.crops,
            kills=args.kills,
            seconds=args.seconds,
            seed=args.seed,
            method=args.method,
            model=args.model,
            compare_batch=not args.no_batch,
            nights=args.nights,
        )
    )
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result_json(result), indent=2) + "\n")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
