"""Helpers of scripts/gpu_check.py: simulated crops, timing, device memory, the table.

Kept apart so the command reads as its five steps; nothing here is specific to
one step. Imports only what the GPU machine's image has plus this package.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from crop_clusterd.decode import prepare
from crop_clusterd.embed import Embedder
from crop_clusterd.records import Crop, Prepared
from crop_clusterd.store import DB_NAME

Vectors = npt.NDArray[np.float32]
# Crops per simulated frame, about: mean_present less the simulator's misses.
CROPS_PER_FRAME = 15.0 * 0.98
MB = 1024 * 1024


def simulate_crops(root: Path, crops: int, processes: int) -> list[Path]:
    """About ``crops`` simulated crops: up to ``processes`` traps simulated at once,
    each in a fresh interpreter (no torch imported there, nothing forked from here)."""
    traps = max(1, min(processes, math.ceil(crops / 100)))
    frames = max(2, math.ceil(crops / traps / CROPS_PER_FRAME))
    code = "import sys; from crop_clusterd.simulate import main; sys.exit(main(sys.argv[1:]))"
    jobs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                code,
                "--out",
                str(root / f"trap{k:02d}"),
                "--seed",
                str(k),
                "--frames",
                str(frames),
                "--present",
                "15",
            ],
            stdout=subprocess.DEVNULL,
        )
        for k in range(traps)
    ]
    failed = [job.args for job in jobs if job.wait() != 0]
    if failed:
        raise RuntimeError(f"simulating crops failed: {failed}")
    return sorted(root.rglob("*.png"))


# --- measuring helpers -------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def autocast_as(embedder: Embedder, dtype: torch.dtype | None) -> Iterator[None]:
    """Run ``embedder``'s forwards under ``dtype`` autocast (None: fp32) for a while."""
    before = embedder.autocast_dtype
    embedder.autocast_dtype = dtype
    try:
        yield
    finally:
        embedder.autocast_dtype = before


def rate(run: Callable[[], int], min_seconds: float, device: torch.device) -> float:
    """Items per second of ``run`` (which returns items done): one untimed warm-up
    call, then calls until ``min_seconds`` have passed (at least one).

    Runs on a thread of its own, as the daemon's embed stage does: on a busy CPU
    torch on the main thread measured less than half as fast (scripts/bench.py).
    """
    result: list[float] = []
    error: list[BaseException] = []

    def measure() -> None:
        try:
            run()
            sync(device)
            done, calls, t0 = 0, 0, time.perf_counter()
            while calls < 1 or time.perf_counter() - t0 < min_seconds:
                done += run()
                calls += 1
            sync(device)
            result.append(done / (time.perf_counter() - t0))
        except BaseException as exc:  # handed to the caller's thread
            error.append(exc)

    thread = threading.Thread(target=measure, name="gpu-check-forward")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def prepared(files: Sequence[Path], embedder: Embedder, workers: int) -> list[Prepared]:
    """Decode and preprocess ``files`` as the daemon's intake does."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        done = list(pool.map(lambda p: prepare(Crop(p, str(p)), embedder), files))
    return [d for d in done if isinstance(d, Prepared)]


def batches_of(tensors: Sequence[torch.Tensor], size: int) -> list[torch.Tensor]:
    return [torch.stack(list(tensors[i : i + size])) for i in range(0, len(tensors), size)]


class MemorySampler:
    """Samples the device's allocated memory (MB) every ``every_s`` on a thread."""

    def __init__(self, device: torch.device, every_s: float = 0.2) -> None:
        self.device = device
        self.every_s = every_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-memory", daemon=True)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def __enter__(self) -> MemorySampler:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            allocated = torch.cuda.memory_allocated(self.device) / MB
            self.samples.append((time.time(), allocated))

    def report(self, start: float, end: float) -> dict[str, Any]:
        """Allocated MB in the first and last tenth of [start, end], the peak and now."""
        if not self.cuda:
            return {"measured": False, "reason": f"device {self.device} is not CUDA"}
        span = [a for t, a in self.samples if start <= t <= end]
        tenth = max(1, len(span) // 10)
        early = max(span[:tenth], default=math.nan)
        late = max(span[-tenth:], default=math.nan)
        return {
            "measured": True,
            "samples": len(span),
            "allocated_mb_early": early,
            "allocated_mb_late": late,
            "growth_mb": late - early,
            "peak_mb": torch.cuda.max_memory_allocated(self.device) / MB,
            "end_mb": torch.cuda.memory_allocated(self.device) / MB,
            "flat": bool(late - early <= 64.0),
        }


def commit_times(state: Path) -> list[tuple[float, int]]:
    """(wall time, crops) of each committed micro-batch, in time order."""
    db = sqlite3.connect(f"file:{state / DB_NAME}?mode=ro", uri=True, timeout=30)
    try:
        rows = db.execute("SELECT min(added), count(*) FROM crops GROUP BY batch").fetchall()
    finally:
        db.close()
    return sorted((float(t), int(n)) for t, n in rows)


def partition(rows: Sequence[tuple[str, int]]) -> set[frozenset[str]]:
    groups: dict[int, set[str]] = {}
    for name, cluster in rows:
        groups.setdefault(cluster, set()).add(name)
    return {frozenset(g) for g in groups.values()}


def components(vectors: Vectors, threshold: float) -> list[int]:
    """Connected components of the graph of pairs with cosine >= threshold."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    _, labels = connected_components(csr_matrix(vectors @ vectors.T >= threshold), directed=False)
    return [int(x) for x in labels]


def same_partition(a: Sequence[int], b: Sequence[int]) -> bool:
    return partition([(str(i), c) for i, c in enumerate(a)]) == partition(
        [(str(i), c) for i, c in enumerate(b)]
    )


# --- output ---------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.4g}"
    return str(value)


Row = tuple[str, Any, str]


def _forward_rows(rows: list[dict[str, Any]]) -> list[Row]:
    return [
        (
            f"forward {r['model']} {r['precision']} batch {r['batch_size']}, crops/s",
            r["crops_per_s"],
            "",
        )
        for r in rows
    ]


def _decode_rows(rows: list[dict[str, Any]]) -> list[Row]:
    out: list[Row] = []
    for r in rows:
        what = "decode only" if r["model"] == "decode-only" else f"decode+preprocess {r['model']}"
        out.append((f"{what}, {r['workers']} workers, crops/s", r["crops_per_s"], ""))
    return out


def _daemon_rows(d: dict[str, Any]) -> list[Row]:
    out: list[Row] = [
        (
            f"daemon {d['model']} {d['crops']} crops end to end, crops/s",
            d["end_to_end_crops_per_s"],
            ">= 3,000 (dinov2-base)",
        ),
        ("raw forward, same batches, crops/s", d["forward_same_batches_crops_per_s"], ""),
        ("end to end / raw forward", d["ratio_to_forward"], ">= 0.8"),
    ]
    m = d["memory"]
    if m.get("measured"):
        out.append(("GPU memory peak / end, MB", f"{m['peak_mb']:,.0f} / {m['end_mb']:,.0f}", ""))
        out.append(("GPU memory growth over the burst, MB", m["growth_mb"], "flat (<= 64)"))
    else:
        out.append(("GPU memory", "not measured", m.get("reason", "")))
    return out


def _live_rows(rows: list[dict[str, Any]]) -> list[Row]:
    return [
        (f"live equals batch ({r['method']}, {r['crops']} crops)", r["equal"], "True") for r in rows
    ]


def _precision_rows(rows: list[dict[str, Any]]) -> list[Row]:
    out: list[Row] = []
    for r in rows:
        cosines = f"{r['cosine_median']:.5f} / {r['cosine_min']:.5f}"
        out.append((f"bf16 vs fp32 cosine {r['model']} median / min", cosines, ">= 0.99 median"))
        pairs = r["crops"] * (r["crops"] - 1) // 2
        for label in ("cosine", "track"):
            # Components of the graph of pairs above the threshold, fp32 against bf16.
            figure = (
                f"{r['model']} bf16 same partition at {label} threshold {r[f'{label}_threshold']}"
            )
            same, flipped = r[f"{label}_same_partition"], r[f"{label}_pairs_flipped"]
            value = f"{same} ({flipped} of {pairs} pairs flipped)"
            out.append((figure, value, "True"))
    return out


def _oom_rows(r: dict[str, Any]) -> list[Row]:
    if not r.get("ran"):
        return [("real out-of-memory split", "not run", r.get("reason", ""))]
    return [
        (f"real out-of-memory split of {r['crops']} crops: ran out at", r["ran_out_at"], ""),
        (
            "... embedded / skipped / finished at batch",
            f"{r['embedded']} / {r['skipped']} / {r['batch_size']}",
            "all / 0",
        ),
    ]


ROWS: dict[str, Callable[[Any], list[Row]]] = {
    "forward": _forward_rows,
    "decode": _decode_rows,
    "daemon": _daemon_rows,
    "live_batch": _live_rows,
    "precision": _precision_rows,
    "oom": _oom_rows,
}


def table(results: dict[str, Any]) -> str:
    """The figures as a markdown table, goals beside the ones the issue sets; a
    step that failed gets one row with its error."""
    lines = ["| figure | value | goal |", "| --- | --- | --- |"]
    for step, rows in ROWS.items():
        if step not in results:
            continue
        value = results[step]
        if isinstance(value, dict) and "error" in value:
            lines.append(f"| {step} FAILED | {value['error']} | |")
            continue
        lines.extend(f"| {f} | {_fmt(v)} | {g} |" for f, v, g in rows(value))
    return "\n".join(lines) + "\n"
