"""What the intake's file registry costs with a season of history, before and after issue 10.

    python scripts/bench_registry.py --crops 100000 1000000 --before /work/main/daemon

For each size a state database is filled directly with cheap rows (4-d vectors,
made-up paths, stats and hashes; the registry reads none of the vectors), then a
fresh Python process per variant opens the registry the daemon's start-up opens:

- ``before`` (the package source given by ``--before``, e.g. main before this
  change): every live crop and skip loaded into an in-memory registry;
- ``after`` (this checkout): a registry over the intake's read-only connection,
  holding nothing until files are in flight.

It prints the seconds and the memory (resident growth, and peak growth while
loading) of opening it, and the cost of the look-ups the intake makes per file
found (by path) and per new file (where could it have moved from). The one-time
cost of building the look-up indexes on a state from before them is timed too.

Then a rescan: a tree of ``--frames`` old frame folders (``crops/`` of
``--per-frame`` empty crop files each) walked in full (what every rescan did)
and incrementally after one new folder landed (what a rescan does now). Last,
the scan after a restart, which still reads every folder: that tree's files all
committed in a state, the registry opened and every file walked and looked up
(unchanged), before and after. Figures, not a test; one run each.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SAMPLE = 20_000  # look-ups timed per variant
NEW_INDEXES = (
    "crops_live_content",
    "crops_live_inode",
    "crops_live_stat",
    "skipped_content",
    "skipped_inode",
    "skipped_stat",
)


def crop_row(i: int) -> tuple[object, ...]:
    """Row ``i`` of the crops table (see storeschema): a plausible path, stat and hash."""
    frame = f"20240701{i // 8:08d}-00-06"
    path = (
        f"/srv/crop-clusterd/crops/2024-07-{i % 30:02d}/{frame}/crops/"
        f"crop_{frame}_CROPNUMBER_{i % 8}_UUID_SIM.png"
    )
    vector = b"\x00\x00\x80\x3e" * 4  # four 0.25s
    return (
        i, path, 20_000 + i % 5000, 1_700_000_000_000_000_000 + i * 1000, 1_000_000 + i,
        f"{i:032x}", frame, i % 8, 1.7e9 + i, 10.0, 20.0, i // 64, i, 1.7e9, vector, "all", i,
    )  # fmt: skip


def build_state(folder: Path, rows: Iterable[tuple[object, ...]]) -> dict[str, float]:
    """A state database of these crops rows; returns its size and index build time."""
    from crop_clusterd.store import StateStore

    StateStore(folder).close()  # the schema, as the daemon creates it
    db = sqlite3.connect(folder / "state.sqlite3")
    for name in NEW_INDEXES:  # a state from before them: they are built at the next open
        db.execute(f"DROP INDEX IF EXISTS {name}")
    with db:
        db.executemany(
            "INSERT INTO crops(seq, path, size, mtime_ns, inode, content, frame, crop_index, "
            "time, cx, cy, batch, cluster, added, vector, session, local) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            rows,
        )
        db.execute("INSERT INTO sessions(id, opened) VALUES ('all', 1.7e9)")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    t0 = time.perf_counter()
    StateStore(folder).close()  # the first start after the upgrade builds the indexes
    index_s = time.perf_counter() - t0
    size = (folder / "state.sqlite3").stat().st_size
    return {"index_build_s": index_s, "db_mb": size / 2**20}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def open_registry(variant: str, state: Path) -> tuple[Any, dict[str, float]]:
    """The registry as the daemon's start-up opens it, with the seconds and memory it took."""
    from crop_clusterd import identity
    from crop_clusterd.store import StateStore

    if variant == "after":
        from crop_clusterd.storedfiles import StoredFiles
    rss0 = _status_kb("VmRSS")
    t0 = time.perf_counter()
    registry: Any
    if variant == "before":
        with StateStore(state, readonly=True) as store:
            registry = identity.registry_from(store.registry_rows())  # type: ignore[attr-defined]
    else:
        registry = identity.Registry(StoredFiles(state))
    open_s = time.perf_counter() - t0
    rss1, hwm = _status_kb("VmRSS"), _status_kb("VmHWM")
    return registry, {
        "open_s": round(open_s, 3),
        "rss_mb": round((rss1 - rss0) / 1024, 1),
        "peak_mb": round(max(0, hwm - rss0) / 1024, 1),
        "held": len(registry),
    }


def time_lookups(registry: Any, crops: int) -> dict[str, float]:
    """Microseconds per look-up: by path one at a time (a hint), by path in batches
    of 256 (a scan; ``prefetch`` where the registry has it), and a new file's
    search for an old path (a stat and a hash no row has, the usual case)."""
    from crop_clusterd.identity import Fingerprint

    rng = random.Random(1)
    picks = sorted(str(crop_row(rng.randrange(crops))[1]) for _ in range(SAMPLE))
    t0 = time.perf_counter()
    found = sum(registry.get(p) is not None for p in reversed(picks))
    get_us = 1e6 * (time.perf_counter() - t0) / SAMPLE
    t0 = time.perf_counter()
    for start in range(0, SAMPLE, 256):
        batch = picks[start : start + 256]
        if hasattr(registry, "prefetch"):
            registry.prefetch(batch)
        found -= sum(registry.get(p) is not None for p in batch)
    scan_us = 1e6 * (time.perf_counter() - t0) / SAMPLE
    assert found == 0, "the two ways found different rows"
    t0 = time.perf_counter()
    for k in range(SAMPLE // 10):
        registry.moved_from(Fingerprint(123, 456 + k, 7 + k), f"{k:031x}z")
    moved_us = 1e6 * (time.perf_counter() - t0) / (SAMPLE // 10)
    return {
        "get_us": round(get_us, 1),
        "scan_us": round(scan_us, 1),
        "moved_from_us": round(moved_us, 1),
    }


def time_first_scan(registry: Any, tree: Path) -> dict[str, float]:
    """The scan after a restart: walk every folder and look every file up, as the intake
    does (a batch of 256 at a time, prefetched where the registry can)."""
    from crop_clusterd.identity import Fingerprint
    from crop_clusterd.watch import FileSeen, scan_tree

    unchanged = files = 0

    def check(batch: list[FileSeen]) -> int:
        names = [str(seen.path) for seen in batch]
        if hasattr(registry, "prefetch"):
            registry.prefetch(names)
        same = 0
        for name, seen in zip(names, batch, strict=True):
            entry = registry.get(name)
            fp = Fingerprint(seen.size, seen.mtime_ns, seen.inode)
            same += entry is not None and entry.fingerprint is not None and entry.fingerprint == fp
        return same

    t0 = time.perf_counter()
    batch: list[FileSeen] = []
    for seen in scan_tree(tree):
        files += 1
        batch.append(seen)
        if len(batch) == 256:
            unchanged += check(batch)
            batch = []
    unchanged += check(batch)
    scan_s = time.perf_counter() - t0
    assert unchanged == files, f"{files - unchanged} files not recognised as unchanged"
    return {"first_scan_s": round(scan_s, 2), "files": files}


def child(variant: str, state: Path, crops: int, tree: Path | None) -> dict[str, Any]:
    """In a fresh process: open the registry; time look-ups, or the first scan of ``tree``."""
    registry, opened = open_registry(variant, state)
    result: dict[str, Any] = {"variant": variant, **opened}
    if tree is not None:
        result.update(time_first_scan(registry, tree))
    else:
        result.update(time_lookups(registry, crops))
    return result


def run_child(
    variant: str, source: Path, state: Path, crops: int, tree: Path | None = None
) -> dict[str, Any]:
    """Run :func:`child` in a new interpreter importing ``crop_clusterd`` from ``source``."""
    with tempfile.TemporaryDirectory() as shim:
        (Path(shim) / "crop_clusterd").symlink_to(source.resolve())
        env = dict(os.environ, PYTHONPATH=shim)
        args = ["--child", variant, "--state", str(state), "--crops", str(crops)]
        if tree is not None:
            args += ["--tree", str(tree)]
        done = subprocess.run(
            [sys.executable, __file__, *args], env=env, capture_output=True, text=True, check=False
        )
    if done.returncode != 0:
        raise RuntimeError(f"{variant} child failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def bench_registry(work: Path, sizes: Sequence[int], before: Path | None) -> list[dict[str, Any]]:
    """Build a state per size and open both registries on it; prints a line per result."""
    results: list[dict[str, Any]] = []
    for crops in sizes:
        state = work / f"state-{crops}"
        if state.exists():
            raise SystemExit(f"{state} exists: give an empty --work folder")
        t0 = time.perf_counter()
        built = build_state(state, (crop_row(i) for i in range(crops)))
        print(
            f"\n{crops:,} crops of history: state {built['db_mb']:.0f} MB, filled in "
            f"{time.perf_counter() - t0:.0f} s; new look-up indexes built once in "
            f"{built['index_build_s']:.1f} s"
        )
        variants = [("before", before)] if before is not None else []
        variants.append(("after", REPO / "daemon"))
        for variant, source in variants:
            assert source is not None
            r = run_child(variant, source, state, crops)
            r.update(crops=crops, **built)
            results.append(r)
            print(
                f"  {variant:6} open {r['open_s']:7.3f} s  resident +{r['rss_mb']:7.1f} MB  "
                f"peak +{r['peak_mb']:7.1f} MB  held {r['held']:>9,}  "
                f"get {r['get_us']:5.1f} us  scan {r['scan_us']:5.1f} us/file  "
                f"moved_from {r['moved_from_us']:6.1f} us"
            )
    return results


def make_tree(root: Path, frames: int, per_frame: int) -> None:
    """``frames`` old frame folders of ``per_frame`` empty crops each, all mtimes an hour ago."""
    old = time.time_ns() - 3600 * 10**9
    for i in range(frames):
        crops = root / f"night{i // 2000:02d}" / f"frame{i:07d}" / "crops"
        crops.mkdir(parents=True)
        for j in range(per_frame):
            (crops / f"crop_{i:07d}_CROPNUMBER_{j}.png").touch()
        os.utime(crops, ns=(old, old))
        os.utime(crops.parent, ns=(old, old))
    for night in root.iterdir():
        os.utime(night, ns=(old, old))
    os.utime(root, ns=(old, old))


def _walk(root: Path, dirs: Any | None) -> tuple[float, int, Any]:
    from crop_clusterd.watch import scan_tree

    t0 = time.perf_counter()
    if dirs is not None:
        dirs.begin(full=False)
    files = sum(1 for _ in scan_tree(root, dirs=dirs))
    return time.perf_counter() - t0, files, dirs


def bench_rescan(work: Path, frames: int, per_frame: int) -> dict[str, Any]:
    """A full walk against an incremental one after one new folder, on a tree of old ones."""
    from crop_clusterd.watch import DirMtimes

    root = work / "tree"
    t0 = time.perf_counter()
    make_tree(root, frames, per_frame)
    print(
        f"\nrescan: {frames:,} old frame folders x {per_frame} crops "
        f"({frames * per_frame:,} files), made in {time.perf_counter() - t0:.0f} s"
    )
    _walk(root, None)  # warm the dentry and inode caches for both
    full_s, full_files, _ = _walk(root, None)
    dirs = DirMtimes()
    _walk(root, dirs)  # the first walk lists everything and keeps the mtimes
    new = root / "night99" / "frame9999999" / "crops"
    new.mkdir(parents=True)
    for j in range(per_frame):
        (new / f"crop_new_CROPNUMBER_{j}.png").touch()
    inc_s, inc_files, _ = _walk(root, dirs)
    print(
        f"  full walk (every rescan before): {full_s:.3f} s, {full_files:,} files stat'ed\n"
        f"  rescan now, one new folder: {inc_s:.3f} s, {inc_files} files found, "
        f"{dirs.listed} folders listed, {dirs.unchanged:,} unchanged (one stat each)"
    )
    return {
        "frames": frames,
        "files": frames * per_frame,
        "full_s": round(full_s, 3),
        "full_files": full_files,
        "incremental_s": round(inc_s, 3),
        "incremental_files": inc_files,
        "dirs_listed": dirs.listed,
        "dirs_unchanged": dirs.unchanged,
    }


def tree_rows(root: Path) -> Iterator[tuple[object, ...]]:
    """Crops rows for every file of a tree, with its real stat: all committed, unchanged."""
    from crop_clusterd.watch import scan_tree

    for i, seen in enumerate(scan_tree(root)):
        row = list(crop_row(i))
        row[1:5] = [str(seen.path), seen.size, seen.mtime_ns, seen.inode]
        yield tuple(row)


def bench_first_scan(work: Path, before: Path | None) -> list[dict[str, Any]]:
    """The scan after a restart over the rescan's tree, every file committed already."""
    state = work / "state-tree"
    built = build_state(state, tree_rows(work / "tree"))
    print("\nfirst scan after a restart (open the registry, then walk and look every file up):")
    variants = [("before", before)] if before is not None else []
    variants.append(("after", REPO / "daemon"))
    results: list[dict[str, Any]] = []
    for variant, source in variants:
        assert source is not None
        r = run_child(variant, source, state, 0, tree=work / "tree")
        r.update(built)
        results.append(r)
        print(
            f"  {variant:6} open {r['open_s']:6.2f} s + scan {r['first_scan_s']:6.2f} s "
            f"({r['files']:,} files)  resident +{r['rss_mb']:6.1f} MB"
        )
    return results


def iter_sizes(values: Sequence[str]) -> Iterator[int]:
    for v in values:
        yield int(float(v))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the registry and rescan benchmarks (or, with ``--child``, one measurement)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", nargs="+", default=["1e5", "1e6"], help="history sizes")
    parser.add_argument("--before", type=Path, help="package source before, e.g. /work/main/daemon")
    parser.add_argument("--work", type=Path, help="an empty folder (default: a temporary one)")
    parser.add_argument("--frames", type=int, default=20_000, help="old frame folders (rescan)")
    parser.add_argument("--per-frame", type=int, default=10, help="crops per frame folder")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--child", choices=["before", "after"], help=argparse.SUPPRESS)
    parser.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tree", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        crops = int(float(args.crops[0]))
        print(json.dumps(child(args.child, args.state, crops, args.tree)))
        return 0
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        figures = {
            "registry": bench_registry(work, list(iter_sizes(args.crops)), args.before),
            "rescan": bench_rescan(work, args.frames, args.per_frame),
            "first_scan": bench_first_scan(work, args.before),
        }
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
