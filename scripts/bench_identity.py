"""What a crop's identity costs at intake: hashing a file vs decoding it, side by side.

    python scripts/bench_identity.py --crops ../shared/seed-example/crops --rounds 20

The intake hashes every settled crop once (:func:`crop_clusterd.identity.content_hash`)
before it is decoded; the decode here is a plain Pillow open, RGB convert and load
(the least a decode of that crop costs). Both read the same file from the page
cache. Prints each per-crop time and the ratio hash / decode, measured in one run,
rounds interleaved so that neither gets a warmer cache or a quieter machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from crop_clusterd.identity import content_hash


def _decode(path: Path) -> None:
    with Image.open(path) as image:
        image.convert("RGB").load()


def main(argv: Sequence[str] | None = None) -> int:
    """Time hashing and decoding the crops in a folder; print per-crop times and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", type=Path, required=True, help="a folder of crop images")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    files = sorted(p for p in args.crops.iterdir() if p.suffix.lower() in {".png", ".jpg"})
    if not files:
        print(f"no .png/.jpg crops in {args.crops}", file=sys.stderr)
        return 2
    hash_s = decode_s = 0.0
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        for f in files:
            content_hash(f)
        t1 = time.perf_counter()
        for f in files:
            _decode(f)
        t2 = time.perf_counter()
        hash_s += t1 - t0
        decode_s += t2 - t1
    n = len(files) * args.rounds
    size = sum(f.stat().st_size for f in files) / len(files)
    print(f"{len(files)} crops (mean {size / 1024:.1f} KiB) x {args.rounds} rounds")
    print(f"hash   {1e6 * hash_s / n:8.1f} us/crop")
    print(f"decode {1e6 * decode_s / n:8.1f} us/crop")
    print(f"hash / decode = {hash_s / decode_s:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
