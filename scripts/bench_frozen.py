"""The walk after a restart over a season of night folders, with and without freezing.

    python scripts/bench_frozen.py --nights 30 --frames 2000 --work /var/tmp/bench-frozen

Builds ``WORK/tree``: ``--nights`` night folders of ``--frames`` frame folders
(``n<k>/f<i>/crops/x.png``, as flat-bug writes them), all two days old but the
last night (an hour old); cached in WORK. For each setting (``freeze_after_s``
unset: every folder visited; 6 h: old nights frozen) it walks the tree once in
full with a fresh scan cache, then "restarts": a new ``DirMtimes`` restores the
cache and walks as the first scan after a start does. Prints, per setting, the
restore's seconds, the walk's seconds, the folders it visited (one ``stat``
each) and skipped as frozen, and the folders held in memory. Figures, not
pass/fail; run it on a quiet machine (each walk is short).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from crop_clusterd.scancache import ScanCache
from crop_clusterd.watch import DirMtimes, scan_tree

DAY_NS = 24 * 3600 * 10**9


def build(tree: Path, nights: int, frames: int) -> None:
    """The season's folders (skipped when ``tree/.complete`` says they are there)."""
    done = tree / ".complete"
    if done.exists() and done.read_text() == f"{nights} {frames}":
        return
    now = time.time_ns()
    for k in range(nights):
        t = now - (3600 * 10**9 if k == nights - 1 else 2 * DAY_NS)
        for i in range(frames):
            crops = tree / f"n{k:03d}" / f"f{i:05d}" / "crops"
            crops.mkdir(parents=True, exist_ok=True)
            (crops / "x.png").touch()
            os.utime(crops, ns=(t, t))
            os.utime(crops.parent, ns=(t, t))
        os.utime(tree / f"n{k:03d}", ns=(t, t))
    done.write_text(f"{nights} {frames}")
    os.utime(tree, ns=(now - 3600 * 10**9,) * 2)


def measure(tree: Path, cache_file: Path, freeze_after_s: float | None) -> dict[str, float]:
    """One full walk into a fresh cache, then a restart's restore and first walk."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{cache_file}{suffix}").unlink(missing_ok=True)

    def dirs() -> DirMtimes:
        cache = ScanCache(cache_file, root=tree, recursive=True)
        return DirMtimes(freeze_after_s=freeze_after_s, cache=cache)

    first = dirs()
    first.restore()
    first.begin(full=True)
    sum(1 for _ in scan_tree(tree, dirs=first))
    assert first.cache is not None
    first.cache.close()
    again = dirs()
    t0 = time.perf_counter()
    again.restore()
    restore_s = time.perf_counter() - t0
    again.begin(full=False)
    t0 = time.perf_counter()
    files = sum(1 for _ in scan_tree(tree, dirs=again))
    walk_s = time.perf_counter() - t0
    return {
        "restore_s": restore_s,
        "walk_s": walk_s,
        "visited": again.listed + again.unchanged,
        "frozen": again.frozen,
        "held": len(again),
        "files": files,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nights", type=int, default=30)
    p.add_argument("--frames", type=int, default=2000, help="frame folders a night")
    p.add_argument("--work", type=Path, default=Path("/var/tmp/bench-frozen"))
    args = p.parse_args(argv)
    tree = args.work / "tree"
    tree.mkdir(parents=True, exist_ok=True)
    build(tree, args.nights, args.frames)
    folders = 1 + args.nights * (1 + 2 * args.frames)
    print(f"{folders:,} folders; the first scan after a restart:")
    for label, freeze in (("every folder", None), ("freeze_after_s 6 h", 6 * 3600.0)):
        m = measure(tree, args.work / "scan-cache.sqlite", freeze)
        print(
            f"  {label:20s} restore {m['restore_s']:.3f} s, walk {m['walk_s']:.3f} s, "
            f"{m['visited']:,.0f} folders visited, {m['frozen']:,.0f} skipped frozen, "
            f"{m['held']:,.0f} held in memory"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
