#!/usr/bin/env python3
"""How long the gallery takes to write and to open in headless Chromium (issue 12).

Run from the repository root with the package, playwright and Debian's chromium::

    python scripts/bench_gallery.py --crops 20000 --clusters 2000
    python scripts/bench_gallery.py --crops 100000 --clusters 10000 --json /tmp/g.json
    python scripts/bench_gallery.py --simulated --crops 20000 --work /var/tmp/g20k

A synthetic night: ``crops`` crop names over ``clusters`` clusters (sizes drawn
from a geometric law, so many singletons and a few large clusters), capture
times across 8 hours; every thumbnail is a hard link to a small JPEG (the
page loads only the visible ones, lazily). Figures: seconds to write the
gallery from scratch and again after one cluster grew (what a snapshot pays),
bytes of data, and the page's open time in Chromium (navigation to the first
rows rendered, and to its visible thumbnails loaded), best of ``--opens``.

``--simulated`` opens a real page instead: the trap simulator writes a night
of about ``crops`` crops (frames, metadata), ``crop-clusterd cluster
--gallery -mf`` clusters it (a fast random-projection embedder from
``tests/fakes.py`` stands in for the model, whose choice the page does not
see) and makes every thumbnail and box track; then the same open times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from crop_clusterd.batch import BatchRequest, run_batch
from crop_clusterd.config import Config
from crop_clusterd.gallery import GALLERY_DIR, INDEX_HTML, GalleryCrops, GalleryWriter
from crop_clusterd.gallerybuild import build_galleries
from crop_clusterd.log import configure_logging
from crop_clusterd.summary import summarize
from crop_clusterd.thumbs import THUMBS_DIR, thumb_name

T0 = 1_719_871_200.0  # 2024-07-01 22:00 local capture time


def night(crops: int, clusters: int, seed: int) -> GalleryCrops:
    """A synthetic night; a cluster's id is its first crop's number, as in the daemon."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, clusters, size=crops)
    labels[: min(clusters, crops)] = np.arange(min(clusters, crops))  # every cluster used
    skew = rng.geometric(0.3, size=crops)  # a few clusters much larger than the rest
    labels = np.where(skew > 4, labels % max(1, clusters // 50), labels)
    order = np.argsort(rng.random(crops))
    labels = labels[order]
    first: dict[int, int] = {}
    for i, c in enumerate(labels.tolist()):
        first.setdefault(c, i)
    ids = np.array([first[c] for c in labels.tolist()], dtype=np.int64)
    times = T0 + np.sort(rng.uniform(0, 8 * 3600, size=crops))
    names = [
        f"/traps/night1/f{i // 10:06d}/crops/crop_20240701_{i // 10:06d}_CROPNUMBER_{i % 10}.png"
        for i in range(crops)
    ]
    frames = [f"f{i // 10}" for i in range(crops)]
    return GalleryCrops(names, ids, times, frames)


def link_thumbs(folder: Path, names: Sequence[str]) -> None:
    """Every crop's thumbnail: a hard link to one small JPEG."""
    thumbs = folder / THUMBS_DIR
    thumbs.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        one = folder / f"one-{i // 50_000}.jpg"  # under ext4's 65,000 links a file
        if i % 50_000 == 0:
            Image.new("RGB", (96, 72), (150, 90, 40)).save(one, "JPEG")
        os.link(one, thumbs / thumb_name(name))


def open_times(page_path: Path, chromium: str, opens: int) -> dict[str, float]:
    """Best-of seconds to the first rows rendered and to the visible thumbnails loaded."""
    from playwright.sync_api import sync_playwright

    best: dict[str, float] = {"rows_s": float("inf"), "thumbs_s": float("inf")}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        for _ in range(opens):
            page: Any = browser.new_page(viewport={"width": 1280, "height": 900})
            t0 = time.perf_counter()
            page.goto(page_path.as_uri())
            page.wait_for_selector("body[data-ready='1']", timeout=60_000)
            rows = time.perf_counter() - t0
            page.wait_for_function(
                """() => Array.from(document.querySelectorAll('.strip img')).filter(i => {
                     const r = i.getBoundingClientRect(); return r.top < innerHeight;
                   }).every(i => i.complete && i.naturalWidth > 0)""",
                timeout=60_000,
            )
            thumbs = time.perf_counter() - t0
            best = {"rows_s": min(best["rows_s"], rows), "thumbs_s": min(best["thumbs_s"], thumbs)}
            page.close()
        browser.close()
    return best


def simulated(crops: int, seed: int, work: Path) -> tuple[Path, dict[str, object]]:
    """A simulated night clustered with ``--gallery``: its page and figures."""
    from nightbench import register_projection

    from crop_clusterd.csvfiles import read_clusters_csv
    from crop_clusterd.simulate import SimConfig, simulate

    root, out = work / "night", work / "out"
    t0 = time.perf_counter()
    # About 14 crops a frame at mean_present 15 (detections missed, insects off the
    # screen): 14,859 crops from 1,000 frames, seed 0.
    simulate(SimConfig(seed=seed, frames=max(1, round(crops / 14.0)), mean_present=15.0), root)
    sim_s = time.perf_counter() - t0
    base = Config()
    config = dataclasses.replace(
        base,
        embed=dataclasses.replace(base.embed, model=register_projection(384)),
        input=dataclasses.replace(base.input, recursive=True, meta_folder=root),
        output=dataclasses.replace(base.output, folder=out),
    )
    t0 = time.perf_counter()
    run_batch(BatchRequest(config, inputs=(str(root),)))
    build_galleries(out, meta_folder=root)  # what cluster --gallery -mf does next
    rows = read_clusters_csv(out / "clusters.csv")
    return out / INDEX_HTML, {
        "crops": len(rows),
        "clusters": len({c for _, c in rows}),
        "simulate_s": round(sim_s, 1),
        "cluster_and_gallery_s": round(time.perf_counter() - t0, 1),
        "data_bytes": sum(p.stat().st_size for p in (out / GALLERY_DIR).iterdir()),
    }


def report(figures: dict[str, object], path: Path | None) -> int:
    """Print the figures as JSON (and write them to ``path``); the exit status."""
    text = json.dumps(figures, indent=1)
    print(text)
    if path is not None:
        path.write_text(text + "\n", encoding="utf-8")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Write the gallery of a synthetic night, open it, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crops", type=int, default=20_000)
    parser.add_argument("--clusters", type=int, default=2_000)
    parser.add_argument("--opens", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--simulated", action="store_true", help="a simulated trap night")
    parser.add_argument("--work", type=Path, help="--simulated: a new or empty folder")
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if args.simulated:
        configure_logging("console", "warning")
        work = args.work or Path(tempfile.mkdtemp(prefix="bench-gallery-"))
        work.mkdir(parents=True, exist_ok=True)
        if any(work.iterdir()):
            parser.error(f"--work {work} must be a new or empty folder")
        page, sim = simulated(args.crops, args.seed, work)
        if chromium is not None:
            sim |= {k: round(v, 3) for k, v in open_times(page, chromium, args.opens).items()}
        return report(sim, args.json)
    crops = night(args.crops, args.clusters, args.seed)
    summary = summarize("bench", crops.clusters, crops.times)
    with tempfile.TemporaryDirectory(prefix="bench-gallery-") as tmp:
        folder = Path(tmp)
        writer = GalleryWriter()
        t0 = time.perf_counter()
        blocks = writer.write(folder, crops, summary, title="bench")
        first_s = time.perf_counter() - t0
        grown = GalleryCrops(
            [*crops.names, crops.names[0] + ".late.png"],
            np.append(crops.clusters, crops.clusters[0]),
            np.append(crops.times, crops.times[-1] + 1),
            [*crops.frames, "late"],
        )
        t0 = time.perf_counter()
        rewritten = writer.write(folder, grown, summary, title="bench")
        again_s = time.perf_counter() - t0
        data = sum(p.stat().st_size for p in (folder / GALLERY_DIR).iterdir())
        link_thumbs(folder, grown.names)
        figures: dict[str, object] = {
            "crops": len(grown.names),
            "clusters": summary.clusters,
            "singletons": summary.singletons,
            "blocks": blocks,
            "write_s": round(first_s, 3),
            "rewrite_one_cluster_s": round(again_s, 3),
            "blocks_rewritten": rewritten,
            "data_bytes": data,
        }
        if chromium is None:
            figures["open"] = "no chromium"
        else:
            opened = open_times(folder / INDEX_HTML, chromium, args.opens)
            figures |= {k: round(v, 3) for k, v in opened.items()}
    return report(figures, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
