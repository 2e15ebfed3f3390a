#!/usr/bin/env python3
"""Benchmark the live daemon: throughput, incremental assignment cost, latency.

Run from the repository root with the package installed::

    python scripts/bench.py --json bench.json
    python scripts/bench.py --sizes 10000,100000 --json bench.json   # skip the 1M build
    python scripts/bench.py --quick --json /tmp/bench-quick.json      # seconds, for the test

Every figure comes from one run on one machine and is reported next to the
figure it should be compared with, because shared machines are noisy:

1. pipeline vs raw model throughput (bundled ``efficientnet-lite0`` on CPU):
   the same simulated crops, (a) decoded first and then only the model timed,
   (b) the real daemon on the files (present before start), crops/s between
   its first and last commit. Run twice, interleaved (A B A B).
2. incremental assignment cost per crop with the ungated ``CosineLinker`` at
   several index sizes, against re-clustering 10k crops from scratch.
3. latency from a file landing to its commit, with the daemon running and a
   writer copying simulated frames in at a steady rate.
4. what the gallery costs: the daemon on the same crops with ``output.gallery``
   on (thumbnails at commit, the page with each snapshot) and off, interleaved
   (A B A B); process CPU seconds per crop (all threads) and crops/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from synth import clustered_embeddings

from crop_clusterd.config import Config
from crop_clusterd.defaults import COSINE_THRESHOLD, DEFAULT_EMBEDDER
from crop_clusterd.embed import Embedder
from crop_clusterd.factory import embedder_from_config, linker_from_config
from crop_clusterd.images import load_rgb
from crop_clusterd.intake import FRAME_QUIET_S
from crop_clusterd.linking import LinkBatch, Linker
from crop_clusterd.log import configure_logging
from crop_clusterd.simulate import SimConfig, simulate
from crop_clusterd.store import DB_NAME
from crop_clusterd.supervisor import Daemon, RunSummary

MODEL = DEFAULT_EMBEDDER
MICRO_BATCH = 32  # crops per incremental add: the daemon's default embed.batch_size


@dataclass(frozen=True)
class Row:
    """One line of the printed table."""

    figure: str
    value: float
    unit: str
    goal: str = ""


@dataclass(frozen=True)
class Settings:
    """What to run, from the command line."""

    work: Path
    crops: int
    batch_size: int
    reps: int
    sizes: tuple[int, ...]
    dim: int
    micro_batches: int
    rate: float
    seconds: float
    seed: int
    parts: frozenset[str]
    quick: bool


@dataclass
class Report:
    """Figures collected as the parts run; written as JSON at the end."""

    rows: list[Row] = field(default_factory=list)
    details: dict[str, object] = field(default_factory=dict)

    def add(self, figure: str, value: float, unit: str, goal: str = "") -> None:
        """Append a table row."""
        self.rows.append(Row(figure, value, unit, goal))


# --- helpers ---------------------------------------------------------------------------


def percentile(values: Sequence[float] | npt.NDArray[np.float64], q: float) -> float:
    """The ``q``-th percentile of ``values`` (NaN when empty)."""
    if len(values) == 0:
        return math.nan
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def session(folder: Path, crops: int, seed: int, mean_present: float = 12.0) -> list[Path]:
    """Simulate a trap session of about ``crops`` crops; return its frame folders in time order."""
    # The simulator misses ~2% of visible animals per frame, and presence varies.
    frames = max(2, math.ceil(crops / (mean_present * 0.98)))
    simulate(
        SimConfig(seed=seed, frames=frames, mean_present=mean_present, behaviour="classic"), folder
    )
    return sorted(p for p in folder.iterdir() if p.is_dir())


def crop_files(frames: Sequence[Path]) -> list[Path]:
    """All crop files of ``frames``, frame by frame, in crop-number order."""
    return [c for f in frames for c in sorted((f / "crops").glob("*.png"))]


def daemon_config(base: Config, watch: Path, run: Path) -> Config:
    """The default config pointed at bench folders (CPU, bundled model)."""
    return dataclasses.replace(
        base,
        embed=dataclasses.replace(base.embed, model=MODEL, device="cpu"),
        watch=dataclasses.replace(base.watch, folder=watch),
        state=dataclasses.replace(base.state, folder=run / "state"),
        output=dataclasses.replace(base.output, folder=run / "out"),
    )


def committed_rows(state: Path) -> list[tuple[str, float, int]]:
    """(path, added wall time, batch) of every committed crop in a state folder."""
    db = sqlite3.connect(f"file:{state / DB_NAME}?mode=ro", uri=True, timeout=30)
    try:
        rows = db.execute("SELECT path, added, batch FROM crops ORDER BY seq").fetchall()
    finally:
        db.close()
    return [(str(p), float(a), int(b)) for p, a, b in rows]


def committed_count(state: Path) -> int:
    """Crops committed so far (0 while the database does not exist yet)."""
    if not (state / DB_NAME).exists():
        return 0
    try:
        db = sqlite3.connect(f"file:{state / DB_NAME}?mode=ro", uri=True, timeout=30)
        try:
            (n,) = db.execute("SELECT count(*) FROM crops").fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return 0
    return int(n)


# --- 1. pipeline vs raw model ----------------------------------------------------------


@dataclass(frozen=True)
class ForwardRun:
    """Raw model throughput on pre-decoded crops."""

    crops: int
    decode_s: float
    embed_s: float

    @property
    def crops_per_s(self) -> float:
        """Model-only throughput."""
        return self.crops / self.embed_s

    @property
    def decode_per_s(self) -> float:
        """Decode + preprocess throughput of the worker pool alone."""
        return self.crops / self.decode_s


@dataclass(frozen=True)
class PipelineRun:
    """The daemon on files present before start."""

    crops: int
    commits: int
    span_s: float
    crops_after_first: int
    summary: RunSummary

    @property
    def crops_per_s(self) -> float:
        """Crops committed after the first commit per second up to the last commit."""
        return self.crops_after_first / self.span_s if self.span_s > 0 else math.nan


def raw_forward(
    files: Sequence[Path], embedder: Embedder, config: Config, batch_size: int
) -> ForwardRun:
    """Decode and preprocess everything (as intake does), then time only the model."""
    background = config.input.background_rgb

    def prepare(path: Path) -> torch.Tensor:
        image = load_rgb(path, background=background, max_pixels=config.input.max_pixels)
        tensor: torch.Tensor = embedder.preprocess(image)
        return tensor

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=config.input.workers) as pool:
        tensors = list(pool.map(prepare, files))
    decode_s = time.perf_counter() - t0
    batches = [torch.stack(tensors[i : i + batch_size]) for i in range(0, len(tensors), batch_size)]
    elapsed: list[float] = []

    def forward() -> None:
        t0 = time.perf_counter()
        for batch in batches:
            embedder.embed(batch)
        elapsed.append(time.perf_counter() - t0)

    # On a thread of its own, as the daemon's embed stage runs it: on a busy
    # machine torch on the main thread measured less than half as fast as on
    # another thread (8 vs 18 crops/s), which would flatter the pipeline.
    thread = threading.Thread(target=forward, name="bench-forward")
    thread.start()
    thread.join()
    if not elapsed:
        raise RuntimeError("the raw forward pass failed (see the traceback above)")
    return ForwardRun(len(files), decode_s, elapsed[0])


def pipeline(watch: Path, run: Path, embedder: Embedder, base: Config) -> PipelineRun:
    """Run the daemon on ``watch`` until idle; crops/s from its commit times."""
    config = daemon_config(base, watch, run)
    summary = Daemon(config, embedder=embedder, exit_when_idle_s=1.0).run()
    rows = committed_rows(config.state.folder)
    batches: dict[int, tuple[float, int]] = {}
    for _, added, batch in rows:
        t, n = batches.get(batch, (added, 0))
        batches[batch] = (t, n + 1)
    times = sorted(batches.values())
    span = times[-1][0] - times[0][0] if len(times) > 1 else 0.0
    after_first = sum(n for _, n in times[1:])
    return PipelineRun(len(rows), len(times), span, after_first, summary)


def with_gallery(base: Config, on: bool) -> Config:
    """``base`` with the gallery (thumbnails and page) on or off."""
    return dataclasses.replace(base, output=dataclasses.replace(base.output, gallery=on))


def bench_gallery(s: Settings, base: Config, embedder: Embedder, report: Report) -> None:
    """Part 4: the daemon with and without the gallery, A B A B on the same crops."""
    frames = session(s.work / "gallery-session", s.crops, s.seed + 1)
    watch = frames[0].parent
    runs: list[dict[str, float]] = []
    for rep in range(s.reps):
        figures: dict[str, float] = {}
        for on in (True, False):
            label = "on" if on else "off"
            cpu0 = time.process_time()
            run = pipeline(
                watch, s.work / f"gallery-{label}-{rep}", embedder, with_gallery(base, on)
            )
            cpu = time.process_time() - cpu0
            if run.crops != len(crop_files(frames)):
                raise RuntimeError(f"the daemon committed {run.crops} crops, gallery {label}")
            figures[f"cpu_ms_per_crop_{label}"] = 1000 * cpu / run.crops
            figures[f"crops_per_s_{label}"] = run.crops_per_s
        figures["cpu_ratio"] = figures["cpu_ms_per_crop_on"] / figures["cpu_ms_per_crop_off"]
        figures["rate_ratio"] = figures["crops_per_s_on"] / figures["crops_per_s_off"]
        runs.append(figures)
        n = rep + 1
        report.add(f"gallery on / off, CPU per crop #{n}", figures["cpu_ratio"], "ratio", "<= 1.2")
        report.add(f"gallery on / off, crops/s #{n}", figures["rate_ratio"], "ratio")
    # Pooled over the reps: on a shared machine one pair can differ by +-15%.
    pooled = sum(r["cpu_ms_per_crop_on"] for r in runs) / sum(
        r["cpu_ms_per_crop_off"] for r in runs
    )
    report.add("gallery on / off, CPU per crop, all reps", pooled, "ratio", "<= 1.2")
    report.details["gallery"] = {"crops": len(crop_files(frames)), "runs": runs, "pooled": pooled}


def load_embedder(base: Config) -> tuple[Embedder, float]:
    """The bundled model on CPU, loaded; and the seconds loading took."""
    embedder = embedder_from_config(
        dataclasses.replace(base, embed=dataclasses.replace(base.embed, model=MODEL, device="cpu"))
    )
    t0 = time.perf_counter()
    embedder.load()
    return embedder, time.perf_counter() - t0


def bench_throughput(s: Settings, base: Config, embedder: Embedder, report: Report) -> None:
    """Part 1: A B A B of raw forward and the daemon on the same crops."""
    frames = session(s.work / "throughput-session", s.crops, s.seed)
    files = crop_files(frames)
    # One untimed batch so lazy kernel set-up is not charged to the first timed run.
    raw_forward(files[: base.embed.batch_size], embedder, base, base.embed.batch_size)
    runs: list[dict[str, float]] = []
    for rep in range(s.reps):
        fwd = raw_forward(files, embedder, base, base.embed.batch_size)
        pipe = pipeline(frames[0].parent, s.work / f"pipeline-{rep}", embedder, base)
        if pipe.crops != len(files):
            raise RuntimeError(f"the daemon committed {pipe.crops} of {len(files)} crops")
        ratio = pipe.crops_per_s / fwd.crops_per_s
        # If decode and model each need the whole machine, they cannot beat this.
        serial = 1.0 / (1.0 / fwd.crops_per_s + 1.0 / fwd.decode_per_s)
        runs.append(
            {
                "forward_crops_per_s": fwd.crops_per_s,
                "decode_crops_per_s": fwd.decode_per_s,
                "pipeline_crops_per_s": pipe.crops_per_s,
                "pipeline_over_forward": ratio,
                "serial_bound_crops_per_s": serial,
                "pipeline_commits": pipe.commits,
                "pipeline_span_s": pipe.span_s,
                "pipeline_run_s": pipe.summary.seconds,
            }
        )
        n = rep + 1
        report.add(f"raw forward #{n}", fwd.crops_per_s, "crops/s")
        report.add(f"decode+preprocess alone #{n}", fwd.decode_per_s, "crops/s")
        report.add(f"pipeline (daemon) #{n}", pipe.crops_per_s, "crops/s")
        report.add(f"pipeline / forward #{n}", ratio, "ratio", ">= 0.9")
        report.add(f"pipeline / serial decode+forward #{n}", pipe.crops_per_s / serial, "ratio")
    report.details["throughput"] = {
        "crops": len(files),
        "frames": len(frames),
        "batch_size": base.embed.batch_size,
        "decode_workers": base.input.workers,
        "torch_threads": torch.get_num_threads(),
        "runs": runs,
    }


# --- 2. incremental assignment ---------------------------------------------------------


def time_micro_batches(linker: Linker, extra: npt.NDArray[np.float32]) -> list[float]:
    """Seconds per micro-batch to add ``extra`` 32 at a time and look up their clusters."""
    times: list[float] = []
    for start in range(0, len(extra) - MICRO_BATCH + 1, MICRO_BATCH):
        chunk = np.ascontiguousarray(extra[start : start + MICRO_BATCH])
        t0 = time.perf_counter()
        result = linker.add(LinkBatch.from_embeddings(chunk))
        linker.cluster_of(np.arange(result.seqs.start, result.seqs.stop, dtype=np.int64))
        times.append(time.perf_counter() - t0)
    return times


def recluster_seconds(n: int, dim: int, seed: int, repeats: int) -> float:
    """Median time to cluster ``n`` crops from scratch in one ``add``."""
    emb, _ = clustered_embeddings(n, dim, seed=seed + 1)
    times = []
    for _ in range(repeats):
        linker = linker_from_config(Config())  # default: ungated cosine
        t0 = time.perf_counter()
        linker.add(LinkBatch.from_embeddings(emb.copy()))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_assign(s: Settings, report: Report) -> None:
    """Part 2: per-crop cost of micro-batches into an index of N crops."""
    scratch_n = min(10_000, max(s.sizes)) if s.quick else 10_000
    scratch_s = recluster_seconds(scratch_n, s.dim, s.seed, 1 if s.quick else 3)
    report.add(f"re-cluster {scratch_n} from scratch", scratch_s, "s")
    report.add(f"re-cluster {scratch_n} from scratch, per crop", 1000 * scratch_s / scratch_n, "ms")
    sizes: dict[str, object] = {}
    for n in s.sizes:
        extra_n = s.micro_batches * MICRO_BATCH
        emb, _ = clustered_embeddings(n + extra_n, s.dim, seed=s.seed)
        # The first n rows are a C-contiguous view the linker adopts without a copy;
        # the held-back rows come from the same individuals, like tomorrow's crops.
        extra = emb[n:].copy()
        linker = linker_from_config(Config())  # default: ungated cosine
        t0 = time.perf_counter()
        linker.add(LinkBatch.from_embeddings(emb[:n]))
        build_s = time.perf_counter() - t0
        del emb
        batches = time_micro_batches(linker, extra)
        per_crop_ms = [1000 * t / MICRO_BATCH for t in batches]
        median_batch = float(np.median(batches))
        label = f"{n:,}"
        report.add(f"assign at {label}: median", float(np.median(per_crop_ms)), "ms/crop", "< 2")
        report.add(f"assign at {label}: p95", percentile(per_crop_ms, 95), "ms/crop")
        # The first micro-batch after the big add also grows the adopted columns.
        report.add(f"assign at {label}: max", max(per_crop_ms), "ms/crop")
        report.add(
            f"re-cluster {scratch_n} / one micro-batch at {label}",
            scratch_s / median_batch,
            "ratio",
        )
        report.add(f"build index of {label} (one add)", build_s, "s")
        sizes[str(n)] = {
            "build_s": build_s,
            "micro_batches": len(batches),
            "batch_s": batches,
            "median_ms_per_crop": float(np.median(per_crop_ms)),
            "p95_ms_per_crop": percentile(per_crop_ms, 95),
            "max_ms_per_crop": max(per_crop_ms),
            "recluster_over_micro_batch": scratch_s / median_batch,
        }
        del linker, extra
        gc.collect()
    report.details["assign"] = {
        "dim": s.dim,
        "threshold": COSINE_THRESHOLD,
        "micro_batch": MICRO_BATCH,
        "recluster_n": scratch_n,
        "recluster_s": scratch_s,
        "sizes": sizes,
    }


# --- 3. latency ------------------------------------------------------------------------


def write_frames(
    frames: Sequence[Path],
    watch: Path,
    rate: float,
    seconds: float,
    stop: threading.Event,
) -> dict[str, float]:
    """Copy frames into ``watch`` at ``rate`` crops/s; return each crop's landing wall time.

    Each frame gets a new folder, its crops one by one, then its JSON (as flat-bug
    writes them). The frame in progress when ``seconds`` runs out is finished.
    """
    landed: dict[str, float] = {}
    start = time.monotonic()
    k = 0
    for frame in frames:
        if k / rate >= seconds or stop.is_set():
            break
        dest = watch / frame.name / "crops"
        dest.mkdir(parents=True)
        for crop in sorted((frame / "crops").glob("*.png")):
            delay = start + k / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            target = dest / crop.name
            shutil.copyfile(crop, target)
            landed[str(target)] = time.time()
            k += 1
        for meta in frame.glob("metadata_*.json"):
            shutil.copyfile(meta, watch / frame.name / meta.name)
    return landed


def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    """Poll ``condition`` until true or ``timeout_s`` passes; return whether it held."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def bench_latency(s: Settings, base: Config, embedder: Embedder, report: Report) -> None:
    """Part 3: landing -> commit latency at a steady arrival rate."""
    wanted = math.ceil(s.rate * s.seconds)
    src = s.work / "latency-session"
    frames = session(src, wanted + 40, s.seed + 2, mean_present=8.0)
    watch = s.work / "latency-watch"
    watch.mkdir()
    config = daemon_config(base, watch, s.work / "latency-run")
    daemon = Daemon(config, embedder=embedder)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            daemon.run()
        except BaseException as exc:
            errors.append(exc)

    runner = threading.Thread(target=run, name="bench-daemon")
    runner.start()
    stop = threading.Event()
    try:
        if not wait_until(lambda: (config.state.folder / DB_NAME).exists(), 120):
            raise RuntimeError("the daemon did not start within 120 s")
        # The daemon's first full scan happens at start; let it finish on an empty tree.
        time.sleep(1.0)
        landed = write_frames(frames, watch, s.rate, s.seconds, stop)
        if not wait_until(lambda: committed_count(config.state.folder) >= len(landed), 120):
            raise RuntimeError("the daemon did not commit every landed crop within 120 s")
    finally:
        stop.set()
        daemon.request_stop("bench done")
        runner.join(120)
    if errors:
        raise RuntimeError(f"the daemon failed: {errors[0]}") from errors[0]
    added = {p: a for p, a, _ in committed_rows(config.state.folder)}
    latency = np.array([added[p] - t for p, t in landed.items()], dtype=np.float64)
    # The daemon keeps a frame's crops together, so a crop also waits for the rest
    # of its frame to land: that part follows from the arrival rate, not the daemon.
    last_of_frame: dict[str, float] = {}
    for p, t in landed.items():
        frame = str(Path(p).parent.parent)
        last_of_frame[frame] = max(t, last_of_frame.get(frame, t))
    gather = np.array([last_of_frame[str(Path(p).parent.parent)] - t for p, t in landed.items()])
    settle_s = config.watch.settle_ms / 1000.0
    wait_s = config.embed.max_wait_ms / 1000.0
    p50 = percentile(latency, 50)
    # A crop settles (settle_ms of quiet), then its frame must be quiet for the
    # intake's frame-quiet time (metadata is off by default, so the frame is not
    # known to be complete).
    quiet_s = FRAME_QUIET_S
    design = gather + settle_s + quiet_s + wait_s
    work = latency - design
    report.add("latency p50", p50, "s")
    report.add("latency p95", percentile(latency, 95), "s")
    report.add("latency max", float(latency.max()), "s")
    report.add("  of p50: frame gathering (median)", float(np.median(gather)) / p50, "share")
    report.add(
        f"  of p50: settle {config.watch.settle_ms} ms + frame quiet {quiet_s * 1000:.0f} ms",
        (settle_s + quiet_s) / p50,
        "share",
    )
    report.add(f"  of p50: micro-batch wait {config.embed.max_wait_ms} ms", wait_s / p50, "share")
    report.add("  rest (decode, model, link, commit) p50", percentile(work, 50), "s")
    report.details["latency"] = {
        "rate_crops_per_s": s.rate,
        "seconds": s.seconds,
        "crops": len(landed),
        "settle_ms": config.watch.settle_ms,
        "max_wait_ms": config.embed.max_wait_ms,
        "metadata_enabled": config.metadata.enabled,
        "p50_s": p50,
        "p95_s": percentile(latency, 95),
        "max_s": float(latency.max()),
        "min_s": float(latency.min()),
        "frame_gather_median_s": float(np.median(gather)),
        "design_wait_median_s": float(np.median(design)),
        "rest_median_s": percentile(work, 50),
        "rest_p95_s": percentile(work, 95),
    }


# --- the command -----------------------------------------------------------------------


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def format_table(rows: Sequence[Row]) -> str:
    """The rows as an aligned plain-text table."""
    cells = [(r.figure, _number(r.value), r.unit, r.goal) for r in rows]
    header = ("figure", "value", "unit", "goal")
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(4)]
    lines = []
    for c in [header, *cells]:
        lines.append(
            f"{c[0]:<{widths[0]}}  {c[1]:>{widths[1]}}  {c[2]:<{widths[2]}}  {c[3]}".rstrip()
        )
        if c is header:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, Path | None]:
    """Read the command line into `Settings` and the JSON path."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--crops", type=int, default=800, help="crops in the throughput session")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=Config().embed.batch_size,
        help="embed.batch_size for parts 1 and 3 (default: the config default)",
    )
    parser.add_argument("--reps", type=int, default=2, help="forward/pipeline pairs (A B A B)")
    parser.add_argument(
        "--sizes", default="10000,100000,1000000", help="index sizes for the assignment cost"
    )
    parser.add_argument("--dims", type=int, default=384, help="embedding dimension (synthetic)")
    parser.add_argument("--micro-batches", type=int, default=50, help="micro-batches per size")
    parser.add_argument("--rate", type=float, default=5.0, help="arrival rate, crops/s")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long crops arrive")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--parts",
        default="throughput,assign,latency,gallery",
        help="comma-separated subset of throughput,assign,latency,gallery",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: seconds, for tests")
    args = parser.parse_args(argv)
    parts = frozenset(p.strip() for p in args.parts.split(",") if p.strip())
    unknown = parts - {"throughput", "assign", "latency", "gallery"}
    if unknown:
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))}")
    try:
        sizes = tuple(int(x) for x in args.sizes.split(",") if x.strip())
    except ValueError:
        parser.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    if args.quick:
        # Small batches so the daemon commits several times even on a few crops.
        sizes, dim, crops, batch, micro, rate, seconds = (2000, 5000), 64, 24, 8, 5, 5.0, 2.0
    else:
        sizes, dim, crops, batch = sizes, args.dims, args.crops, args.batch_size
        micro, rate, seconds = args.micro_batches, args.rate, args.seconds
    if min(sizes, default=0) < 1 or min(crops, batch, micro, args.reps) < 1:
        parser.error("sizes, crops, batch size, micro-batches and reps must be positive")
    if rate <= 0 or seconds <= 0:
        parser.error("rate and seconds must be positive")
    work = args.work or Path(tempfile.mkdtemp(prefix="crop-clusterd-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        parser.error(f"--work {work} must be a new or empty folder")
    settings = Settings(
        work=work,
        crops=crops,
        batch_size=batch,
        reps=args.reps,
        sizes=sizes,
        dim=dim,
        micro_batches=micro,
        rate=rate,
        seconds=seconds,
        seed=args.seed,
        parts=parts,
        quick=args.quick,
    )
    return settings, args.json


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen parts, print the table, write the JSON."""
    s, json_path = parse_args(argv)
    configure_logging("console", "warning")
    default = Config()
    base = dataclasses.replace(
        default, embed=dataclasses.replace(default.embed, batch_size=s.batch_size)
    )
    report = Report()
    started = time.perf_counter()
    embedder: Embedder | None = None
    if s.parts & {"throughput", "latency", "gallery"}:
        embedder, load_s = load_embedder(base)
        report.details["model"] = {"name": MODEL, "device": "cpu", "load_s": load_s}
    if "throughput" in s.parts:
        assert embedder is not None
        bench_throughput(s, base, embedder, report)
    if "assign" in s.parts:
        bench_assign(s, report)
    if "latency" in s.parts:
        assert embedder is not None
        bench_latency(s, base, embedder, report)
    if "gallery" in s.parts:
        assert embedder is not None
        bench_gallery(s, base, embedder, report)
    report.details["wall_s"] = time.perf_counter() - started
    report.details["cpus"] = len(os.sched_getaffinity(0))
    print(format_table(report.rows))
    if json_path is not None:
        data = {
            "command": " ".join(["scripts/bench.py", *(sys.argv[1:] if argv is None else argv)]),
            "table": [dataclasses.asdict(r) for r in report.rows],
            **report.details,
        }
        json_path.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
