"""Endurance: nights back to back through the real daemon, and on top of a season.

    python scripts/endurance.py --nights 7 --crops-per-night 5000 --work /var/tmp/endurance
    python scripts/endurance.py --nights 0 --history 1000000 --history-nights 1 --json e.json

Issue 10, point 8. Simulated nights (``crop_clusterd.simulate``, 22:00 on
consecutive dates, other individuals each night) are generated and cached in
``WORK/nights`` first; nothing is measured while they are drawn. One daemon
(:class:`crop_clusterd.supervisor.Daemon`, in this process, metadata on,
snapshots every ``--snapshot-s``) then takes them one after another at full
speed: each night is renamed into the watched folder whole (``--rate``: frame by
frame at that many crops a second), and is done once every crop is committed,
the daemon is idle and a snapshot has read the last commit (with sessions: once
the night's session is closed, after ``--close-after-s`` of silence as it would
be during the day, and its final files and ``summary.json`` are written).
Nights stay in the watched folder, as on a trap. Per night it prints:

* crops, and KB written per crop: ``write_bytes`` of ``/proc/self/io`` (page cache
  dirtied towards the disk), the net after ``cancelled_write_bytes``, and
  ``wchar`` (everything passed to ``write``), from the night's first file to done;
* snapshot seconds, median and max of the night's ``snapshot_written`` events;
* peak memory: the process's RSS high-water mark during the night, MiB (the
  whole process: Python, torch and the daemon; malloc arenas capped at two, so
  that restarts inside this one process leave no arenas behind: see
  ``nightbench.limit_malloc_arenas``);
* the restart at the night's end: the daemon is stopped (final snapshot
  included: ``stop s``), a new one is started on the same folders, and timed to
  ``daemon_started`` (state restored, model loaded, READY: ``ready s``), to
  caught up (its first scan, of the folders changed since the stored walk, done
  and nothing queued: ``caught up s``) and to the end of the verify walk that
  then stats every file of the tree in the background (``verify s``, from the
  same start; waited for before the next night, and not among the compared
  figures: it grows with the files kept in the watched folder), with the RSS
  high-water mark of the restart. The new daemon takes the next night.

``--history N`` then does the same on top of N crops of history: a state folder
with N synthetic crops committed through the daemon's own link stage, without
image files (see ``history.py`` for how and what differs; built once in a child
process and cached in ``WORK``; each run copies its database and hard-links its
output files), and ``--history-nights`` nights
(default 1) on top. Figures, not pass/fail: the issue asks that night 7's bytes
per crop, snapshot time, memory and restart time be within 1.2x of night 1's,
and the same at 10^6 crops of history; the last lines give those ratios.

The embedder is ``projection-<dim>`` (``tests/fakes.py``): deterministic, of the
real model's width (1,280 for ``efficientnet-lite0``), well under a millisecond
per crop, so the model's speed is not what is measured. ``--model`` takes any
registered embedder instead. ``WORK`` must be on a disk file system (tmpfs
counts no ``write_bytes``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nightbench as nb
import simnights as sn

from crop_clusterd.defaults import METHODS

COLUMNS = (
    ("phase", "phase"),
    ("night", "night"),
    ("crops", "crops"),
    ("write_kb_per_crop", "KB/crop"),
    ("net_write_kb_per_crop", "net KB/crop"),
    ("wchar_kb_per_crop", "wchar KB/crop"),
    ("device_kb_per_crop", "device KB/crop"),
    ("snapshots", "snaps"),
    ("snapshot_s_median", "snap s med"),
    ("snapshot_s_max", "snap s max"),
    ("peak_mib", "peak MiB"),
    ("seconds", "night s"),
    ("stop_s", "stop s"),
    ("restart_ready_s", "ready s"),
    ("restart_caught_up_s", "caught up s"),
    ("restart_verify_s", "verify s"),
    ("restart_peak_mib", "restart MiB"),
)

# The figures the issue compares, night N against night 1 (and history against fresh).
COMPARED = (
    "write_kb_per_crop",
    "wchar_kb_per_crop",
    "snapshot_s_median",
    "peak_mib",
    "restart_ready_s",
    "restart_caught_up_s",
)


def run_nights(
    config: Any,
    nights: Sequence[sn.Night],
    events: nb.EventLog,
    phase: str,
    say: Callable[[str], None],
    rate: float | None = None,
) -> list[dict[str, Any]]:
    """One daemon through ``nights``, restarted after each; one row per night."""
    memory = nb.PeakMemory()
    staging = config.state.folder.parent / "staging"
    daemon = nb.RunningDaemon(config, events)
    daemon.wait_verified()
    rows: list[dict[str, Any]] = []
    try:
        for i, night in enumerate(nights, start=1):
            staged = sn.stage_night(night, staging)
            figures = nb.run_night(daemon, staged, night.crops, memory, rate)
            stop_s = daemon.stop()
            memory.reset()
            daemon = nb.RunningDaemon(config, events)
            ready = daemon.wait_ready()
            caught_up = daemon.wait_idle()
            # Waited for here so that the next night's figures are the night's alone.
            verified = daemon.wait_verified()
            row = {
                "phase": phase,
                "night": i,
                "date": f"{night.start:%Y-%m-%d}",
                **figures.row(),
                "stop_s": round(stop_s, 2),
                "restart_ready_s": round(ready, 2),
                "restart_caught_up_s": round(caught_up, 2),
                "restart_verify_s": round(verified, 2),
                "restart_peak_mib": memory.peak_mib(),
            }
            rows.append(row)
            say(nb.fmt_table([row], COLUMNS).splitlines()[1])
    finally:
        daemon.stop()
    return rows


def history_state(args: argparse.Namespace, model: str) -> Path:
    """The cached history folder (state/ and out/) for these options; built in a child
    process when missing, so this process never holds the history's memory."""
    key = (
        f"history2-{args.method}-{model}-{args.split}-{args.history}-"
        f"{args.crops_per_night}-seed{args.seed}"
    )
    folder: Path = args.work / key
    if not (folder / ".complete").exists():
        nb.fresh_folder(folder)
        cmd = [sys.executable, __file__, "--make-history", str(folder), *sys.argv[1:]]
        subprocess.run(cmd, check=True)
    return folder


def make_history(folder: Path, args: argparse.Namespace, model: str) -> int:
    """The child: build the history into ``folder`` and mark it complete."""
    import history

    from crop_clusterd.log import configure_logging

    configure_logging("console", "warning")
    config = nb.bench_config(
        folder, method=args.method, model=model, threshold=args.threshold, split=args.split
    )
    seconds = history.build_history(
        config,
        args.history,
        dim=args.dim,
        crops_per_night=args.crops_per_night,
        seed=args.seed,
    )
    (folder / ".complete").write_text(f"{seconds:.1f}\n")
    print(f"history: {args.history:,} crops built in {seconds:.0f} s -> {folder}")
    return 0


def ratios(rows: Sequence[dict[str, Any]], base: dict[str, Any], label: str) -> list[str]:
    """``label``: each compared figure of the last row over ``base``'s."""
    if not rows:
        return []
    last = rows[-1]
    parts = []
    for key in COMPARED:
        a, b = last.get(key), base.get(key)
        text = "-" if a is None or not b else f"{a / b:.2f}x"
        parts.append(f"{key} {text}")
    return [f"{label}: " + ", ".join(parts)]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nights", type=int, default=7, help="nights on a fresh state (0: none)")
    p.add_argument("--crops-per-night", type=int, default=5000)
    p.add_argument("--method", choices=METHODS, default="track")
    p.add_argument(
        "--dim", type=int, default=1280, help="embedding width (projection; history vectors)"
    )
    p.add_argument("--model", help="a registered embedder instead of projection-<dim>")
    p.add_argument("--threshold", type=float, help="default: tuned for projection-<dim>")
    p.add_argument("--snapshot-s", type=float, default=1.0, help="snapshot.interval_s")
    p.add_argument("--split", choices=nb.SPLITS, default="night", help="session.split")
    p.add_argument(
        "--close-after-s",
        type=float,
        default=3.0,
        help="session.close_after_s: the silence that closes a night's session",
    )
    p.add_argument("--history", type=int, default=0, help="crops of synthetic history")
    p.add_argument("--history-nights", type=int, default=1, help="nights on top of it")
    p.add_argument(
        "--rate",
        type=float,
        help="feed each night frame by frame at this many crops/s (default: whole at once)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("/var/tmp/crop-clusterd-endurance"))
    p.add_argument("--json", type=Path, help="also write the rows and ratios here")
    p.add_argument(
        "--no-disk-check",
        action="store_true",
        help="run even where write_bytes is not counted (tmpfs): smoke tests only",
    )
    p.add_argument("--make-history", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threshold is None and args.model is None:
        args.threshold = nb.PROJECTION_THRESHOLDS[args.method]
    return args


def phases(
    args: argparse.Namespace, model: str, say: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Simulate the nights, then run the fresh phase and the history phase; all rows."""
    count = max(args.nights, args.history_nights if args.history else 0)
    say(f"simulating {count} nights of {args.crops_per_night} crops (cached in {args.work})")
    cache = args.work / "nights"
    nights = [sn.make_night(cache, i, args.crops_per_night, args.seed) for i in range(count)]
    events = nb.capture_logs()
    say(nb.fmt_table([], COLUMNS))

    def config(root: Path) -> Any:
        return nb.bench_config(
            root,
            method=args.method,
            model=model,
            threshold=args.threshold,
            snapshot_s=args.snapshot_s,
            split=args.split,
            close_after_s=args.close_after_s,
        )

    rows: list[dict[str, Any]] = []
    if args.nights:
        root = nb.fresh_folder(args.work / "fresh")
        rows += run_nights(config(root), nights[: args.nights], events, "fresh", say, args.rate)
    if args.history:
        cached = history_state(args, model)
        root = nb.fresh_folder(args.work / "on-history")
        # The database changes in place: a copy. Output files are only ever replaced
        # (atomic renames), never changed in place: hard links, instant at any size.
        shutil.copytree(cached / "state", root / "state")
        nb.evict_page_cache(root / "state")  # the copy's large folios would inflate write_bytes
        shutil.copytree(cached / "out", root / "out", symlinks=True, copy_function=os.link)
        phase = f"history {args.history:,}"
        rows += run_nights(
            config(root), nights[: args.history_nights], events, phase, say, args.rate
        )
    return rows


def summary(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The issue's comparisons: last night over night 1, history over fresh."""
    fresh = [r for r in rows if r["phase"] == "fresh"]
    hist = [r for r in rows if r["phase"] != "fresh"]
    lines: list[str] = []
    if fresh:
        lines += ratios(fresh, fresh[0], f"fresh night {len(fresh)} / night 1")
    if hist and fresh:
        lines += ratios(hist, fresh[0], f"history night {len(hist)} / fresh night 1")
    if len(hist) > 1:
        lines += ratios(hist, hist[0], f"history night {len(hist)} / history night 1")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Run the phases, print the table and the ratios; 0 unless something failed."""
    nb.limit_malloc_arenas()
    args = parse_args(argv)
    model = args.model or nb.register_projection(args.dim)
    if args.make_history:
        return make_history(args.make_history, args, model)
    if not args.no_disk_check:
        nb.check_disk(args.work)
    rows = phases(args, model, print)
    lines = summary(rows)
    print()
    print(nb.fmt_table(rows, COLUMNS))
    for line in lines:
        print(line)
    if warning := nb.folio_warning(rows):
        print(warning)
    if args.json:
        nb.write_json(args.json, args, model, rows=rows, ratios=lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
