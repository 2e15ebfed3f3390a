"""Peak memory of ``crop-clusterd cluster -e dino`` with and without a thin crop.

    python scripts/bench_thin_crop.py --work /tmp/thin [--crops DIR] [--rounds 2]

Issue 9, case 6: a 6000 x 1 RGBA crop among ordinary ones made peak memory 4.4 GB
instead of 0.6 GB, because the DINOv2 processor scales the short side up. This runs
the real batch command in child processes, alternately on the ordinary crops alone
and on the same crops plus a 6000 x 1 and a 1 x 6000 RGBA crop, and reports each
child's peak RSS (``wait4``) and the ratio, from one run (goal: at most 1.2).

The model is a randomly initialised DINOv2 with the dimensions of dinov2-small and
the image processor settings of dinov2-base (resize the short side to 256, centre
crop 224), built locally: no network. Memory behaviour depends on the processor and
the input size, not on the weights.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEED_CROPS = REPO.parent / "shared" / "seed-example" / "crops"
THIN_SIZES = ((6000, 1), (1, 6000))


def make_model(folder: Path) -> None:
    """Save a dinov2-small-shaped model with dinov2-base's processor into ``folder``."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518
    )
    Dinov2Model(config).save_pretrained(folder)
    BitImageProcessor(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(folder)


def make_thin(folder: Path) -> list[Path]:
    """Write the thin RGBA crops into ``folder``."""
    import numpy as np
    from PIL import Image

    paths = []
    rng = np.random.default_rng(0)
    for width, height in THIN_SIZES:
        pixels = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
        path = folder / f"thin_{width}x{height}.png"
        Image.fromarray(pixels, "RGBA").save(path)
        paths.append(path)
    return paths


def child_peak(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd``; its peak RSS in MiB (Linux reports KiB) and its wall time in s."""
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return usage.ru_maxrss / 1024, wall


def main() -> int:
    """Prepare the inputs (in children, so this process stays small), run, print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/crop-clusterd-thin"))
    parser.add_argument("--crops", type=Path, default=SEED_CROPS, help="ordinary crops")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each")
    parser.add_argument("--make-model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--make-thin", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_model:
        make_model(args.make_model)
        return 0
    if args.make_thin:
        make_thin(args.make_thin)
        return 0
    if not args.crops.is_dir():
        raise SystemExit(f"no crops folder {args.crops}; pass --crops DIR")
    work = args.work
    model = work / "dinov2-small-random"
    if not (model / "config.json").exists():
        # A forked child's peak RSS counts the parent's memory at fork: build elsewhere.
        subprocess.run([sys.executable, __file__, "--make-model", str(model)], check=True)
    plain, thin = work / "plain", work / "thin"
    for folder in (plain, thin):
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(args.crops, folder)
    subprocess.run([sys.executable, __file__, "--make-thin", str(thin)], check=True)
    peaks: dict[str, list[float]] = {"plain": [], "thin": []}
    for _ in range(args.rounds):
        for name, folder in (("plain", plain), ("thin", thin)):
            cmd = [
                sys.executable, "-m", "crop_clusterd.cli", "cluster", "-i", str(folder),
                "-o", str(work / f"out-{name}"), "-e", "dino", "-fp", str(model), "-d", "cpu",
            ]  # fmt: skip
            peak, wall = child_peak(cmd)
            peaks[name].append(peak)
            print(f"{name:5s} peak RSS {peak:8.1f} MiB  wall {wall:6.1f} s", flush=True)
    ratio = max(peaks["thin"]) / max(peaks["plain"])
    count = sum(1 for p in args.crops.iterdir() if p.is_file())
    print(
        f"{count} crops; with the thin crops / without, peak RSS (max of {args.rounds} each): "
        f"{ratio:.3f} (goal <= 1.2)"
    )
    return 0 if ratio <= 1.2 else 1


if __name__ == "__main__":
    sys.exit(main())
