"""Bytes written per crop by the daemon: a small night after a big one, against fresh.

    python scripts/bench_writes.py --work /var/tmp/bench-writes --json writes.json

Issue 10's measurement (its first "must hold"): one big night (``--big``, 8,872
crops) then a small night (``--small``, 1,330 crops) on the same state folder,
against the same small night on a fresh state folder; metadata on, snapshots
every ``--snapshot-s`` (1 s), for each ``--methods`` (``track`` and ``cosine``).
The target: the small night after the big one writes at most 1.3x the bytes per
crop of the fresh one (the issue measured 699 KB against 66 KB: 10.6x).

Both nights are simulated first (``crop_clusterd.simulate``: capture times from
22:00 of two consecutive dates, other individuals each night; cached in
``WORK/nights``) and hard-linked into a staging folder. The daemon
(:class:`crop_clusterd.supervisor.Daemon`, in this process) is started on empty
folders and left to go idle; then each night is renamed into its watched folder
whole (``--rate``: frame by frame at that many crops a second), and measured
from that rename until every crop is committed, the daemon is idle and a
snapshot has read the last commit (with sessions, ``--split night`` by default:
until the night's session is closed, ``--close-after-s`` after its last crop as
it would close during the day, and its final files and ``summary.json`` are
written). The daemon keeps running between the big and the small night, as
beside a trap; start-up and stop are outside every window.

Bytes come from ``/proc/self/io`` deltas over the window, after ``os.sync()``
(see ``nightbench.py``): ``write_bytes`` (page cache dirtied towards the disk:
the issue's figure, and the ratio's), net of ``cancelled_write_bytes`` (pages
dropped before reaching the disk), and ``wchar`` (everything passed to
``write``). The embedder is ``projection-<dim>`` from ``tests/fakes.py``,
deterministic, 1,280 floats per crop by default (``efficientnet-lite0``'s width),
well under a millisecond per crop: the model is not what is measured.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nightbench as nb
import simnights as sn

from crop_clusterd.defaults import METHODS

TARGET = 1.3

COLUMNS = (
    ("method", "method"),
    ("scenario", "scenario"),
    ("crops", "crops"),
    ("write_kb_per_crop", "KB/crop"),
    ("net_write_kb_per_crop", "net KB/crop"),
    ("wchar_kb_per_crop", "wchar KB/crop"),
    ("device_kb_per_crop", "device KB/crop"),
    ("snapshots", "snaps"),
    ("snapshot_s_max", "snap s max"),
    ("seconds", "s"),
)


def run_method(
    args: argparse.Namespace,
    method: str,
    model: str,
    nights: Sequence[sn.Night],
    events: nb.EventLog,
) -> list[dict[str, Any]]:
    """The three measured nights of one method: big, small after it, small on fresh."""
    big, small = nights
    threshold = args.threshold
    if threshold is None and args.model is None:
        threshold = nb.PROJECTION_THRESHOLDS[method]
    rows: list[dict[str, Any]] = []

    def measure(root: Path, sequence: Sequence[tuple[str, sn.Night]]) -> None:
        config = nb.bench_config(
            nb.fresh_folder(root),
            method=method,
            model=model,
            threshold=threshold,
            snapshot_s=args.snapshot_s,
            split=args.split,
            close_after_s=args.close_after_s,
        )
        staged = [(label, sn.stage_night(n, root / "staging"), n.crops) for label, n in sequence]
        daemon = nb.RunningDaemon(config, events)
        try:
            daemon.wait_verified()
            for label, folder, crops in staged:
                figures = nb.run_night(daemon, folder, crops, rate=args.rate)
                rows.append({"method": method, "scenario": label, **figures.row()})
                print(nb.fmt_table(rows[-1:], COLUMNS, left=2).splitlines()[1], flush=True)
        finally:
            daemon.stop()

    measure(
        args.work / f"{method}-after-big",
        [(f"big night ({big.start:%m-%d})", big), ("small night after big", small)],
    )
    measure(args.work / f"{method}-fresh", [("small night, fresh state", small)])
    return rows


def ratio(rows: Sequence[dict[str, Any]], method: str, counter: str = "write_bytes") -> float:
    """``counter`` (a row's byte count) per crop of the small night after the big one
    over the fresh one."""
    after = next(
        r for r in rows if r["method"] == method and r["scenario"] == "small night after big"
    )
    fresh = next(
        r for r in rows if r["method"] == method and r["scenario"] == "small night, fresh state"
    )
    per_crop: float = after[counter] / after["crops"]
    fresh_per_crop: float = fresh[counter] / fresh["crops"]
    return per_crop / max(1e-9, fresh_per_crop)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every method, print the table and the ratios; 0 unless something failed."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--big", type=int, default=8872, help="crops of the big night")
    p.add_argument("--small", type=int, default=1330, help="crops of the small night")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=["track", "cosine"])
    p.add_argument("--dim", type=int, default=1280, help="projection embedder width")
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
    p.add_argument(
        "--rate",
        type=float,
        help="feed each night frame by frame at this many crops/s (default: whole at once)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("/var/tmp/crop-clusterd-bench-writes"))
    p.add_argument("--json", type=Path, help="also write the rows and ratios here")
    p.add_argument(
        "--no-disk-check",
        action="store_true",
        help="run even where write_bytes is not counted (tmpfs): smoke tests only",
    )
    args = p.parse_args(argv)
    nb.limit_malloc_arenas()

    model = args.model or nb.register_projection(args.dim)
    if not args.no_disk_check:
        nb.check_disk(args.work)
    print(f"simulating nights of {args.big} and {args.small} crops (cached in {args.work})")
    nights = [
        sn.make_night(args.work / "nights", 0, args.big, args.seed),
        sn.make_night(args.work / "nights", 1, args.small, args.seed),
    ]
    events = nb.capture_logs()
    print(nb.fmt_table([], COLUMNS, left=2), flush=True)
    rows: list[dict[str, Any]] = []
    for method in args.methods:
        rows += run_method(args, method, model, nights, events)
    ratios = {m: round(ratio(rows, m), 2) for m in args.methods}
    wchar = {m: round(ratio(rows, m, "wchar"), 2) for m in args.methods}
    print()
    print(nb.fmt_table(rows, COLUMNS, left=2))
    for method, value in ratios.items():
        verdict = "within" if value <= TARGET else "over"
        print(
            f"{method}: small night after the big one / on a fresh state = {value:.2f}x "
            f"write_bytes per crop ({verdict} the {TARGET}x target), {wchar[method]:.2f}x wchar"
        )
    if warning := nb.folio_warning(rows):
        print(warning)
    if args.json:
        nb.write_json(
            args.json, args, model, rows=rows, ratios=ratios, wchar_ratios=wchar, target=TARGET
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
