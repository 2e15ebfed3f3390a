#!/usr/bin/env python3
"""The CUDA path in one command: throughput, bf16, memory, live equals batch.

Run from the repository root with the package installed::

    python scripts/gpu_check.py --out gpu-check            # on the GPU machine (< 8 min)
    python scripts/gpu_check.py --smoke --out /tmp/smoke   # the same steps, tiny, on CPU

Writes ``gpu_check.json`` (every figure) and ``gpu_check.md`` (the table, also
printed) to ``--out``, and the daemon's JSON log to ``gpu_check.log``. Steps:

1. raw forward, crops/s: the bundled model and DINOv2-base (randomly
   initialised from ``Dinov2Config()``: weights do not change speed; no
   network), fp32 and bf16 autocast, batch sizes 32..512, on a batch already on
   the device (``Embedder.embed``, output copied back);
2. decode + preprocess, crops/s, with 1, 4, 8 and 16 worker threads on
   simulated crops (:mod:`crop_clusterd.simulate`), as the daemon's intake does,
   and decoding alone (model ``decode-only``), to show which of the two costs;
3. the whole daemon on a burst of 20,000 simulated crops present at start
   (DINOv2-base, bf16): crops/s between first and last commit, and its ratio to
   the raw forward on the same crops in the same batches; device memory
   (``torch.cuda.memory_allocated``) sampled over the run, peak and end;
4. live equals batch on the device: the daemon's partition against the batch
   command's on the same crops (bundled model, cosine and track);
5. bf16 against fp32 on the same crops: per-crop cosine (median, minimum),
   and whether the default thresholds still give the same partition;
6. a real out-of-memory error: a filler tensor leaves room for about a sixth of
   a 512-crop batch, which must then split (:mod:`crop_clusterd.oomsplit`) and
   embed every crop (CUDA only).

A step that fails is recorded with its error and the others still run; the
JSON is rewritten after each step; the exit status is 1 when a step failed.

``--smoke`` runs every step tiny on CPU (a 2-layer DINOv2, batch sizes 2 and 4,
1 and 2 workers, a 200-crop burst) in about a minute on a busy 2-core
machine; the test suite runs it. Needs only what the GPU image has (torch,
transformers, pillow, numpy) and this package with its own dependencies
(hnswlib, watchdog, structlog, scipy, scikit-learn: scripts/gpu_wheels.sh).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import multiprocessing
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gpu_check_parts import (
    MB,
    MemorySampler,
    Vectors,
    autocast_as,
    batches_of,
    commit_times,
    components,
    partition,
    prepared,
    rate,
    same_partition,
    simulate_crops,
    table,
)

from crop_clusterd.batch import BatchRequest, run_batch
from crop_clusterd.config import Config
from crop_clusterd.csvfiles import read_clusters_csv
from crop_clusterd.decode import prepare
from crop_clusterd.defaults import COSINE_THRESHOLD, DEFAULT_EMBEDDER, TRACK_THRESHOLDS
from crop_clusterd.embed import Embedder
from crop_clusterd.factory import embedder_from_config
from crop_clusterd.images import load_rgb
from crop_clusterd.log import configure_logging
from crop_clusterd.oomsplit import OomSplitter, is_out_of_memory
from crop_clusterd.records import Crop, Prepared, Skipped
from crop_clusterd.supervisor import Daemon


@dataclasses.dataclass(frozen=True)
class Settings:
    """What to run: the GPU sizes, or the smoke sizes on CPU."""

    smoke: bool
    out: Path
    work: Path
    device: str
    batch_sizes: tuple[int, ...]
    workers: tuple[int, ...]
    burst_crops: int
    decode_crops: int
    sample_crops: int
    live_crops: int
    daemon_batch: int
    min_seconds: float
    processes: int


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, bool]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON, table and log")
    p.add_argument("--smoke", action="store_true", help="every step tiny, on CPU (< 1 min)")
    p.add_argument("--device", default=None, help="torch device (default: cuda, smoke: cpu)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp one)")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch folder")
    p.add_argument("--burst", type=int, default=None, help="crops in the daemon burst")
    p.add_argument("--daemon-batch", type=int, default=None, help="embed.batch_size for step 3")
    a = p.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    cores = multiprocessing.cpu_count()
    sizes: dict[str, Any]
    if a.smoke:
        sizes = {
            "device": a.device or "cpu",
            "batch_sizes": (2, 4),
            "workers": (1, 2),
            "burst_crops": a.burst or 200,
            "decode_crops": 24,
            "sample_crops": 16,
            "live_crops": 20,
            "daemon_batch": a.daemon_batch or 8,
            "min_seconds": 0.0,
            "processes": 2,
        }
    else:
        sizes = {
            "device": a.device or "cuda",
            "batch_sizes": (32, 64, 128, 256, 512),
            "workers": (1, 4, 8, 16),
            "burst_crops": a.burst or 20_000,
            "decode_crops": 2_000,
            "sample_crops": 512,
            "live_crops": 2_000,
            "daemon_batch": a.daemon_batch or 256,
            "min_seconds": 1.0,
            "processes": min(16, cores),
        }
    s = Settings(smoke=bool(a.smoke), out=a.out, work=work, **sizes)
    return s, bool(a.keep_work)


# --- set-up: models, crops --------------------------------------------------------------


def save_dinov2(folder: Path, smoke: bool) -> Path:
    """A randomly initialised DINOv2 and the dinov2-base processor, saved locally.

    Full: DINOv2-base's sizes (``Dinov2Config()`` defaults: 768 wide, 12 layers,
    patch 14; image_size 518 as the real one); smoke: 2 layers, 32 wide, 56 px.
    """
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    if smoke:
        config = Dinov2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=56
        )
        size, crop = 64, 56
    else:
        # facebook/dinov2-base's config.json: the defaults but image_size 518, so its
        # position embeddings are interpolated to the 224-px input at every forward.
        config = Dinov2Config(image_size=518)
        size, crop = 256, 224  # its preprocessor_config.json
    torch.manual_seed(0)
    Dinov2Model(config).save_pretrained(folder)
    BitImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": crop, "width": crop},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(folder)
    return folder


def model_configs(s: Settings) -> dict[str, Config]:
    """The two models as configs: the bundled one and DINOv2 (base, or tiny for smoke)."""
    base = Config()
    dino = save_dinov2(s.work / "dinov2", s.smoke)
    embed = dataclasses.replace(base.embed, device=s.device)
    return {
        DEFAULT_EMBEDDER: dataclasses.replace(
            base, embed=dataclasses.replace(embed, model=DEFAULT_EMBEDDER)
        ),
        "dinov2-tiny" if s.smoke else "dinov2-base": dataclasses.replace(
            base, embed=dataclasses.replace(embed, model="dino", from_pretrained=str(dino))
        ),
    }


# --- 1. raw forward ----------------------------------------------------------------------


def step_forward(s: Settings, embedders: dict[str, Embedder]) -> list[dict[str, Any]]:
    """Crops/s of ``Embedder.embed`` on a batch already on the device."""
    rows: list[dict[str, Any]] = []
    for name, embedder in embedders.items():
        shape = sample_shape(embedder)
        for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            for size in s.batch_sizes:
                row: dict[str, Any] = {"model": name, "precision": precision, "batch_size": size}
                with autocast_as(embedder, dtype):
                    row["crops_per_s"] = forward_on_noise(embedder, (size, *shape), s.min_seconds)
                if row["crops_per_s"] is None:
                    row["error"] = "out of memory"
                rows.append(row)
    return rows


def forward_on_noise(
    embedder: Embedder, shape: tuple[int, ...], min_seconds: float
) -> float | None:
    """Crops/s on a random batch of ``shape`` on the device; None when it runs out of memory."""
    x = torch.randn(*shape, device=embedder.device)
    try:
        return rate(lambda: len(embedder.embed(x)), min_seconds, embedder.device)
    except RuntimeError as exc:
        if not is_out_of_memory(exc):
            raise
        return None


def sample_shape(embedder: Embedder) -> tuple[int, ...]:
    from PIL import Image

    return tuple(embedder.preprocess(Image.new("RGB", (120, 90), (90, 60, 30))).shape)


# --- 2. decode + preprocess --------------------------------------------------------------


def prepare_file(embedder: Embedder, path: Path) -> Prepared | Skipped:
    return prepare(Crop(path, str(path)), embedder)


def step_decode(
    s: Settings, embedders: dict[str, Embedder], files: Sequence[Path]
) -> list[dict[str, Any]]:
    """Crops/s of decode + preprocess in a pool of each size (files read once first);
    model ``decode-only`` decodes without preprocessing, to show which of the two costs."""
    for path in files:
        path.read_bytes()  # into the page cache: the first pool size must not pay for disk
    jobs: dict[str, Callable[[Path], object]] = {"decode-only": load_rgb}
    for name, embedder in embedders.items():
        jobs[name] = functools.partial(prepare_file, embedder)
    rows: list[dict[str, Any]] = []
    for name, job in jobs.items():
        for workers in s.workers:
            t0 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=workers) as pool:
                done = sum(1 for r in pool.map(job, files) if not isinstance(r, Skipped))
            seconds = time.perf_counter() - t0
            rows.append(
                {"model": name, "workers": workers, "crops": done, "crops_per_s": done / seconds}
            )
    return rows


# --- 3. the daemon on a burst --------------------------------------------------------------


def daemon_config(base: Config, watch: Path, run: Path, **embed: Any) -> Config:
    return dataclasses.replace(
        base,
        input=dataclasses.replace(base.input, recursive=True),
        embed=dataclasses.replace(base.embed, **embed),
        watch=dataclasses.replace(base.watch, folder=watch, recursive=True),
        state=dataclasses.replace(base.state, folder=run / "state"),
        output=dataclasses.replace(base.output, folder=run / "out"),
        session=dataclasses.replace(base.session, split="none"),
    )


def forward_rate(
    embedder: Embedder, tensors: Sequence[torch.Tensor], batch_size: int, min_seconds: float
) -> float:
    """Crops/s of ``Embedder.embed`` on these crops, already on the device, in batches."""
    batches = batches_of([t.to(embedder.device) for t in tensors], batch_size)
    return rate(lambda: sum(len(embedder.embed(b)) for b in batches), min_seconds, embedder.device)


def sample_threshold(embedder: Embedder, tensors: Sequence[torch.Tensor]) -> float:
    """A link threshold for random weights: the 99.9th percentile of the sample's
    pairwise cosines, so each crop links to about as many others as in a real
    session (random DINOv2 puts most crops above 0.9: one cluster of everything)."""
    vectors = embedder.embed(torch.stack(list(tensors)))
    sims = vectors @ vectors.T
    off = sims[~np.eye(len(vectors), dtype=bool)]
    return float(min(0.999, np.percentile(off, 99.9)))


def step_daemon(s: Settings, name: str, config: Config, embedder: Embedder) -> dict[str, Any]:
    """The daemon on ``s.burst_crops`` crops present at start, and the raw forward
    on the same crops in batches of the same size."""
    watch = s.work / "burst"
    t0 = time.perf_counter()
    files = simulate_crops(watch, s.burst_crops, s.processes)
    simulate_s = time.perf_counter() - t0
    workers = max(s.workers)
    sample = prepared(files[: 8 * s.daemon_batch], embedder, workers)
    forward = forward_rate(embedder, [p.tensor for p in sample], s.daemon_batch, s.min_seconds)
    threshold = sample_threshold(embedder, [p.tensor for p in sample[:512]])
    run = daemon_config(config, watch, s.work / "burst-run", batch_size=s.daemon_batch)
    run = dataclasses.replace(
        run,
        input=dataclasses.replace(run.input, workers=workers),
        link=dataclasses.replace(run.link, threshold=threshold),
    )
    with MemorySampler(embedder.device) as memory:
        started = time.time()
        summary = Daemon(run, embedder=embedder, exit_when_idle_s=1.0).run()
    commits = commit_times(run.state.folder)
    span = commits[-1][0] - commits[0][0] if len(commits) > 1 else math.nan
    after_first = sum(n for _, n in commits[1:])
    end_to_end = after_first / span if span > 0 else math.nan
    return {
        "model": name,
        "crops": len(files),
        "committed": summary.crops,
        "clusters": summary.clusters,
        "link_threshold": threshold,
        "batch_size": s.daemon_batch,
        "workers": workers,
        "simulate_s": simulate_s,
        "commits": len(commits),
        "first_commit_after_s": commits[0][0] - started if commits else math.nan,
        "commit_span_s": span,
        "end_to_end_crops_per_s": end_to_end,
        "wall_crops_per_s": summary.crops / (commits[-1][0] - started) if commits else math.nan,
        "forward_same_batches_crops_per_s": forward,
        "ratio_to_forward": end_to_end / forward,
        "memory": memory.report(commits[0][0], commits[-1][0]) if commits else {},
    }


# --- 4. live equals batch -------------------------------------------------------------------


def step_live_batch(s: Settings, config: Config, embedder: Embedder) -> list[dict[str, Any]]:
    """The daemon's clusters against the batch command's, same crops, same device."""
    watch = s.work / "live"
    files = simulate_crops(watch, s.live_crops, s.processes)
    results: list[dict[str, Any]] = []
    for method in ("cosine", "track"):
        run = daemon_config(config, watch, s.work / f"live-{method}")
        run = dataclasses.replace(
            run,
            input=dataclasses.replace(run.input, recursive=True, meta_folder=watch),
            link=dataclasses.replace(run.link, method=method),
            metadata=dataclasses.replace(run.metadata, enabled=True),
        )
        Daemon(run, embedder=embedder, exit_when_idle_s=1.0).run()
        live = partition(read_clusters_csv(run.output.folder / "clusters.csv"))
        out = s.work / f"batch-{method}"
        batch = dataclasses.replace(run, output=dataclasses.replace(run.output, folder=out))
        run_batch(BatchRequest(batch, inputs=(str(watch),)))
        offline = partition(read_clusters_csv(out / "clusters.csv"))
        results.append(
            {
                "method": method,
                "crops": len(files),
                "clusters_live": len(live),
                "clusters_batch": len(offline),
                "equal": live == offline,
            }
        )
    return results


# --- 5. bf16 against fp32 -------------------------------------------------------------------


def step_precision(
    s: Settings, embedders: dict[str, Embedder], files: Sequence[Path]
) -> list[dict[str, Any]]:
    """Per-crop cosine of bf16 to fp32 embeddings; the default thresholds on both."""
    rows: list[dict[str, Any]] = []
    for name, embedder in embedders.items():
        tensors = [p.tensor for p in prepared(files, embedder, max(s.workers))]
        vectors: dict[str, Vectors] = {}
        for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            with autocast_as(embedder, dtype):
                vectors[precision] = np.concatenate(
                    [embedder.embed(b) for b in batches_of(tensors, max(s.batch_sizes))]
                )
        fp32, bf16 = vectors["fp32"], vectors["bf16"]
        cosine = np.sum(fp32 * bf16, axis=1)
        row: dict[str, Any] = {
            "model": name,
            "crops": len(tensors),
            "cosine_median": float(np.median(cosine)),
            "cosine_min": float(np.min(cosine)),
            "random_weights": name.startswith("dinov2"),
        }
        model = "dino" if name.startswith("dinov2") else name
        for label, threshold in (("cosine", COSINE_THRESHOLD), ("track", TRACK_THRESHOLDS[model])):
            above32, above16 = fp32 @ fp32.T >= threshold, bf16 @ bf16.T >= threshold
            row[f"{label}_threshold"] = threshold
            row[f"{label}_pairs_flipped"] = int(np.triu(above32 != above16, 1).sum())
            row[f"{label}_same_partition"] = same_partition(
                components(fp32, threshold), components(bf16, threshold)
            )
        rows.append(row)
    return rows


# --- 6. a real out-of-memory error ----------------------------------------------------------


def step_oom(s: Settings, embedder: Embedder) -> dict[str, Any]:
    """Out of memory for real: a filler tensor takes the device's free memory but
    room for about a sixth of the largest batch, whose crops then go through
    :class:`OomSplitter` (as the daemon's embed stage does): the batch must split
    and every crop be embedded."""
    device = embedder.device
    if device.type != "cuda":
        return {"ran": False, "reason": f"device {device} is not CUDA"}
    crops, shape = max(s.batch_sizes), sample_shape(embedder)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    embedder.embed(torch.randn(64, *shape, device=device))
    per_crop = (torch.cuda.max_memory_allocated(device) - base) / 64
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    budget = int(per_crop * crops / 6) + 256 * MB  # and room for kernels' workspaces
    filler = torch.empty(max(0, free - budget), dtype=torch.uint8, device=device)
    splitter = OomSplitter(embedder)
    try:
        result = splitter.embed([torch.randn(*shape) for _ in range(crops)])
    finally:
        del filler
        torch.cuda.empty_cache()
    return {
        "ran": True,
        "crops": crops,
        "per_crop_mb": per_crop / MB,
        "room_mb": budget / MB,
        "ran_out_at": list(result.ran_out_at),
        "embedded": len(result.rows),
        "skipped": len(result.failed),
        "batch_size": splitter.cap,
    }


def environment(s: Settings) -> dict[str, Any]:
    device = torch.device(s.device)
    env: dict[str, Any] = {
        "smoke": s.smoke,
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_cores": multiprocessing.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # What "fp32" means for the forward figures: TF32 tensor cores or not.
        "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_memory_gb"] = torch.cuda.get_device_properties(device).total_memory / 1024**3
    return env


def run(s: Settings) -> dict[str, Any]:
    """Every step; the results dict, also written as JSON after each step (a run
    killed at its time limit keeps what it had). A step that fails is recorded
    with its error and the next one runs: the GPU machine is lent for minutes."""
    results: dict[str, Any] = {"environment": environment(s), "seconds": {}}

    def timed(key: str, step: Callable[[], Any]) -> None:
        t0 = time.perf_counter()
        try:
            results[key] = step()
        except Exception as exc:
            results[key] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            results[key]["traceback"] = traceback.format_exc()
            print(results[key]["traceback"], file=sys.stderr)
        results["seconds"][key] = round(time.perf_counter() - t0, 2)
        print(f"gpu_check: {key} done in {results['seconds'][key]} s", file=sys.stderr)
        write_json(s.out, results)

    configs = model_configs(s)
    embedders = {name: embedder_from_config(c) for name, c in configs.items()}
    for embedder in embedders.values():
        embedder.load()
    files = simulate_crops(s.work / "sample", max(s.decode_crops, s.sample_crops), s.processes)
    dino = next(name for name in configs if name.startswith("dinov2"))
    timed("forward", lambda: step_forward(s, embedders))
    timed("decode", lambda: step_decode(s, embedders, files[: s.decode_crops]))
    timed("daemon", lambda: step_daemon(s, dino, configs[dino], embedders[dino]))
    bundled = embedders[DEFAULT_EMBEDDER]
    timed("live_batch", lambda: step_live_batch(s, configs[DEFAULT_EMBEDDER], bundled))
    timed("precision", lambda: step_precision(s, embedders, files[: s.sample_crops]))
    # Last: it fills the device's memory on purpose.
    timed("oom", lambda: step_oom(s, embedders[dino]))
    return results


def write_json(out: Path, results: dict[str, Any]) -> None:
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    s, keep = parse_args(argv)
    s.out.mkdir(parents=True, exist_ok=True)
    s.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with (s.out / "gpu_check.log").open("w") as log:
        configure_logging("json", "info", log, environ={})
        try:
            results = run(s)
        finally:
            if not keep:
                shutil.rmtree(s.work, ignore_errors=True)
    results["seconds"]["total"] = round(time.perf_counter() - started, 2)
    write_json(s.out, results)
    text = table(results)
    (s.out / "gpu_check.md").write_text(text)
    sys.stdout.write(text)
    failed = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
