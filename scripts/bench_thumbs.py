#!/usr/bin/env python3
"""What thumbnails add to the daemon's per-crop cost (issue 12: at most +20%).

Run from the repository root with the package installed::

    python scripts/bench_thumbs.py --crops 600 --json /tmp/bench-thumbs.json

On the same simulated crops, one thread each, interleaved (A B A B):
(a) the daemon's per-crop work that every crop costs: decode and preprocess
(as intake does) and the bundled model's forward pass (``bench.raw_forward``);
(b) making the crop's thumbnail (:func:`crop_clusterd.thumbs.make_thumbnails`:
decode again, shrink, JPEG, atomic write) into an empty folder. The ratio
b / a is the thumbnail's share; ratios come from one run on a shared machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import crop_files, load_embedder, raw_forward, session

from crop_clusterd.config import Config
from crop_clusterd.thumbs import make_thumbnails


def thumbs_seconds(files: Sequence[Path], folder: Path, config: Config) -> float:
    """Seconds to make every thumbnail of ``files`` into a new ``folder``."""
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    count = make_thumbnails(
        folder, ((str(f), f) for f in files), background=config.input.background_rgb
    )
    seconds = time.perf_counter() - t0
    if count.written != len(files):
        raise RuntimeError(f"made {count.written} thumbnails of {len(files)} crops")
    return seconds


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison and print (and optionally write) the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crops", type=int, default=600, help="simulated crops (default 600)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    base = Config()
    base = dataclasses.replace(base, input=dataclasses.replace(base.input, workers=1))
    with tempfile.TemporaryDirectory(prefix="bench-thumbs-") as tmp:
        work = Path(tmp)
        files = crop_files(session(work / "frames", args.crops, args.seed))
        embedder, _ = load_embedder(base)
        daemon_s: list[float] = []
        thumb_s: list[float] = []
        for rep in range(2):
            run = raw_forward(files, embedder, base, batch_size=32)
            daemon_s.append(run.decode_s + run.embed_s)
            thumb_s.append(thumbs_seconds(files, work / f"out{rep}", base))
        sizes = [p.stat().st_size for p in (work / "out1" / "thumbs").iterdir()]
    n = len(files)
    figures = {
        "crops": n,
        "daemon_ms_per_crop": [round(1000 * s / n, 2) for s in daemon_s],
        "thumb_ms_per_crop": [round(1000 * s / n, 2) for s in thumb_s],
        "ratio": [round(t / d, 4) for t, d in zip(thumb_s, daemon_s, strict=True)],
        "thumb_bytes_mean": round(sum(sizes) / len(sizes)),
    }
    print(json.dumps(figures, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
