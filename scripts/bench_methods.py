#!/usr/bin/env python3
"""What each linking setting gets right and wrong, per session, by kind of error.

For each simulated session (seeds x simulator behaviours) and the real crops of
``../shared/seed-example/`` (labelled by eye in ``scripts/seed_example_labels.csv``:
41 crops, 9 individuals), embeds the crops once with the batch command, then
re-clusters the embeddings pickle with each setting and reports ARI, B-cubed
precision and recall, clusters per individual and the error kinds of
:mod:`crop_clusterd.trackerrors` (breaks within a visit, of those with a blurred
crop, at a move, at a return; takeovers, swaps, singletons, mixed clusters).

Truth comes from the simulator's ``truth.csv`` when the session has one; else it
is derived from labels, frame times and box centres (one visit per individual,
a jump where the centre moved more than 60 px, no blur), and the output says so.

Run from the repository root with the package installed::

    python scripts/bench_methods.py --work /tmp/bench --json errors.json
    python scripts/bench_methods.py --work /tmp/bench --settings track track:0.7 cosine:0.9
    python scripts/bench_methods.py --grid --work /tmp/grid   # the old threshold grid

``--work DIR`` keeps each session (``DIR/<session>/sim``) and its pickle
(``DIR/<session>/embed-<embedder>-<hash>``), so a second run only re-clusters.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchgrid import _embed_flags, add_embedder_arguments, prepare_embeddings

from crop_clusterd.batch import BatchRequest, run_batch
from crop_clusterd.cli import build_parser, config_from_args
from crop_clusterd.csvfiles import read_clusters_csv
from crop_clusterd.defaults import METHODS
from crop_clusterd.embfile import EMBEDDINGS_PKL, load_embeddings_pickle
from crop_clusterd.evaluate import Evaluation, load_labels_csv, match_labels
from crop_clusterd.flatbug import TimeFormat
from crop_clusterd.log import configure_logging
from crop_clusterd.simulate import SimConfig, simulate
from crop_clusterd.trackerrors import (
    TrackErrors,
    Truth,
    analyse,
    derive_truth,
    load_truth_csv,
    metadata_centres,
)

REPO = Path(__file__).resolve().parents[1]
SEED_EXAMPLE = REPO.parent / "shared" / "seed-example"
SEED_LABELS = REPO / "scripts" / "seed_example_labels.csv"
DEFAULT_SETTINGS = ("track", "cosine:0.9")
TIME_FORMAT = "%Y%m%d%H%M%S"  # the simulator's and the seed example's frame names


@dataclass(frozen=True)
class Session:
    """One set of crops with labels: where they are and where its cache goes."""

    name: str
    work: Path
    crops: Path
    labels: Path
    metadata: Path | None
    truth_csv: Path | None


@dataclass(frozen=True)
class Setting:
    """A linking method and its threshold (None: the method's default)."""

    method: str
    threshold: float | None

    @classmethod
    def parse(cls, text: str) -> Setting:
        """``METHOD`` or ``METHOD:THRESHOLD``; raises ``argparse.ArgumentTypeError``."""
        method, _, th = text.partition(":")
        if method not in METHODS:
            raise argparse.ArgumentTypeError(f"{text!r}: method must be one of {METHODS}")
        try:
            return cls(method, float(th) if th else None)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: threshold is not a number") from None

    def __str__(self) -> str:
        return self.method if self.threshold is None else f"{self.method}:{self.threshold:g}"


@dataclass(frozen=True)
class Result:
    """One setting on one session: its threshold, scores and errors."""

    session: str
    setting: str
    threshold: float
    seconds: float
    evaluation: Evaluation
    errors: TrackErrors


def behaviours_available() -> tuple[str, ...]:
    """The simulator's behaviours (``trap``/``classic``), or none before it has them."""
    field = {f.name: f for f in dataclasses.fields(SimConfig)}.get("behaviour")
    return () if field is None else ("trap", "classic")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The benchmark's command line."""
    p = argparse.ArgumentParser(
        prog="bench_methods",
        description="Score linking settings on simulated sessions and the seed example, "
        "with error kinds. --grid (first) runs the old threshold grid instead.",
    )
    p.add_argument("--work", type=Path, help="cache folder, reused across runs "
                   "(default: a new temporary folder)")  # fmt: skip
    p.add_argument("--frames", type=int, default=220,
                   help="frames per simulated session (default %(default)s)")  # fmt: skip
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2],
                   help="simulation seeds (default 0 1 2; none: no simulated session)")  # fmt: skip
    p.add_argument(
        "--behaviour",
        nargs="+",
        choices=("trap", "classic"),
        help="simulator behaviours (default: both where the simulator has them)",
    )
    p.add_argument("--settings", nargs="+", type=Setting.parse,
                   default=[Setting.parse(s) for s in DEFAULT_SETTINGS],
                   help="METHOD or METHOD:THRESHOLD each (default: "
                   f"{' '.join(DEFAULT_SETTINGS)})")  # fmt: skip
    p.add_argument("--real", type=Path, default=SEED_EXAMPLE,
                   help="the seed example folder (crops/, metadata/); skipped when absent "
                   "(default ../shared/seed-example)")  # fmt: skip
    p.add_argument("--no-real", action="store_true", help="leave out the seed example")
    p.add_argument(
        "--no-metadata",
        action="store_true",
        help="re-cluster without box positions (-mf) where sessions have them",
    )
    p.add_argument("--config", type=Path, help="TOML config for the re-clusterings")
    p.add_argument("--json", type=Path, help="write every result here")
    add_embedder_arguments(p)
    return p.parse_args(argv)


def simulated_session(work: Path, frames: int, seed: int, behaviour: str | None) -> Session:
    """Simulate into ``work/<name>/sim`` unless it is already there."""
    name = f"s{seed}-f{frames}" if behaviour is None else f"{behaviour}-s{seed}-f{frames}"
    folder = work / name
    sim = folder / "sim"
    if not (sim / "simulation.json").exists():
        extra = {} if behaviour is None else {"behaviour": behaviour}
        began = time.monotonic()
        summary = simulate(SimConfig(seed=seed, frames=frames, **extra), sim)  # type: ignore[arg-type]
        print(f"simulated {name}: {summary.crops} crops of {summary.individuals} individuals "
              f"in {time.monotonic() - began:.0f} s", flush=True)  # fmt: skip
    truth = sim / "truth.csv"
    return Session(name, folder, sim, sim / "labels.csv", sim, truth if truth.exists() else None)


def real_session(work: Path, folder: Path) -> Session:
    """The seed example, its metadata only when it has flat-bug JSON (it has Markdown)."""
    meta = folder / "metadata"
    has_json = meta.is_dir() and any(meta.glob("metadata_*.json"))
    return Session(
        "seed-example", work / "seed-example", folder / "crops", SEED_LABELS,
        meta if has_json else None, None,
    )  # fmt: skip


def session_truth(session: Session, names: Sequence[str]) -> Truth:
    """The session's truth rows keyed to ``names`` (the pickle's paths)."""
    if session.truth_csv is not None:
        return Truth(tuple(load_truth_csv(session.truth_csv)))
    labels = load_labels_csv(session.labels)
    known = {n: lab for n, lab in zip(names, match_labels(names, labels), strict=True) if lab}
    centres = None if session.metadata is None else metadata_centres(session.metadata)
    return derive_truth(names, known, TimeFormat.compile(TIME_FORMAT), centres)


def _basename(name: str) -> str:
    return name.replace("\\", "/").rsplit("/", 1)[-1]


def run_setting(
    session: Session, embed_dir: Path, setting: Setting, truth: Truth, ns: argparse.Namespace
) -> Result:
    """Re-cluster the session's pickle as ``cluster --from-embeddings`` would; score it."""
    pickle = embed_dir / str(EMBEDDINGS_PKL)
    out = embed_dir / "runs" / str(setting).replace(":", "-")
    argv = ["cluster", "--from-embeddings", str(pickle), "-o", str(out),
            "-c", setting.method, "--labels", str(session.labels), "-e", ns.embed]  # fmt: skip
    if setting.threshold is not None:
        argv += ["-th", repr(setting.threshold)]
    if session.metadata is not None and not ns.no_metadata:
        argv += ["-mf", str(session.metadata)]
    if ns.config is not None:
        argv += ["--config", str(ns.config)]
    config = config_from_args(build_parser().parse_args(argv))
    began = time.perf_counter()
    result = run_batch(
        BatchRequest(config=config, from_embeddings=pickle, labels_csv=session.labels)
    )
    seconds = time.perf_counter() - began
    if result.evaluation is None:
        raise SystemExit(f"bench_methods: no crop of {pickle} matched {session.labels}")
    ids = {_basename(n): c for n, c in read_clusters_csv(out / "clusters.csv")}
    rows = [r for r in truth.rows if _basename(r.filename) in ids]
    errors = analyse([ids[_basename(r.filename)] for r in rows], rows)
    return Result(session.name, str(setting), result.threshold, seconds, result.evaluation, errors)


COLUMNS = (
    ("session", 18), ("setting", 10), ("th", 5), ("crops", 5), ("ind", 4), ("clus", 4),
    ("cl/ind", 6), ("ARI", 6), ("B3-P", 6), ("B3-R", 6), ("brk-v", 5), ("blur", 4),
    ("brk-m", 5), ("brk-r", 5), ("take", 4), ("swap", 4), ("single", 6), ("mixed", 5),
)  # fmt: skip
FRACTIONS = frozenset({"cl/ind", "ARI", "B3-P", "B3-R"})
HEADER = " ".join(f"{name:>{w}}" if i > 1 else f"{name:<{w}}" for i, (name, w) in
                  enumerate(COLUMNS))  # fmt: skip


def format_row(session: str, setting: str, th: float | None, values: Sequence[float]) -> str:
    """One table line: ``values`` in the order of :data:`COLUMNS` after ``th``."""
    cells = [f"{session:<18}", f"{setting:<10}", "  -  " if th is None else f"{th:>5.2f}"]
    for (name, width), value in zip(COLUMNS[3:], values, strict=True):
        if name in FRACTIONS:
            text = f"{value:.3f}"
        else:  # a count; a mean of counts keeps one decimal
            text = f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"
        cells.append(f"{text:>{width}}")
    return " ".join(cells)


def row_values(r: Result) -> list[float]:
    """A result's figures in table order."""
    e, x = r.evaluation, r.errors
    return [
        x.crops, x.individuals, x.clusters, x.clusters_per_individual, e.ari,
        e.bcubed_precision, e.bcubed_recall, x.breaks_within_visit, x.breaks_blurred,
        x.breaks_at_move, x.breaks_at_return, x.takeovers, x.swaps, x.singletons,
        x.mixed_clusters,
    ]  # fmt: skip


def mean_rows(results: Sequence[Result], simulated: Sequence[str]) -> list[str]:
    """Per setting and behaviour, the mean over simulated sessions of every figure."""
    lines = []
    groups: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        if r.session in simulated:
            behaviour = r.session.split("-s")[0] if "-s" in r.session else "sim"
            groups.setdefault((behaviour, r.setting), []).append(r)
    for (behaviour, setting), rs in groups.items():
        if len(rs) < 2:
            continue
        columns = zip(*(row_values(r) for r in rs), strict=True)
        means = [round(statistics.fmean(col), 3) for col in columns]
        lines.append(format_row(f"mean {behaviour} x{len(rs)}", setting, None, means))
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--grid"]:
        import benchgrid

        return benchgrid.main(argv[1:])
    ns = parse_args(argv)
    configure_logging("console", "warning")
    work = ns.work or Path(tempfile.mkdtemp(prefix="bench-methods-"))
    work.mkdir(parents=True, exist_ok=True)
    sessions = collect_sessions(ns, work)
    flags = _embed_flags(ns)
    results: list[Result] = []
    notes: dict[str, list[str]] = {}
    for s in sessions:
        embed_dir = prepare_embeddings(s.work, s.crops, s.labels, flags)
        names = load_embeddings_pickle(embed_dir / str(EMBEDDINGS_PKL)).names
        truth = session_truth(s, names)
        notes[s.name] = ["truth.csv"] if s.truth_csv is not None else list(truth.derived)
        for setting in ns.settings:
            results.append(run_setting(s, embed_dir, setting, truth, ns))
            r = results[-1]
            print(f"{r.session} {r.setting}: ARI {r.evaluation.ari:.3f}", flush=True)
    print("\n" + HEADER)
    for r in results:
        print(format_row(r.session, r.setting, r.threshold, row_values(r)))
    simulated = [s.name for s in sessions if s.name != "seed-example"]
    for line in mean_rows(results, simulated):
        print(line)
    print(
        "\ncolumns: brk-v breaks within a visit (blur: of those, touching a blurred crop), "
        "brk-m at a move, brk-r at a return; take takeovers; mixed: clusters of 2+ individuals"
    )
    for name, why in notes.items():
        print(f"truth of {name}: {'; '.join(why) or 'truth.csv'}")
    if ns.json is not None:
        write_json(ns.json, flags, ns, results, notes)
        print(f"wrote {ns.json}")
    return 0


def collect_sessions(ns: argparse.Namespace, work: Path) -> list[Session]:
    """The simulated sessions asked for, then the seed example when present."""
    available = behaviours_available()
    if ns.behaviour and not available:
        raise SystemExit("bench_methods: this simulator has no --behaviour option yet")
    behaviours: Sequence[str | None] = ns.behaviour or available or (None,)
    sessions = [
        simulated_session(work, ns.frames, seed, b) for b in behaviours for seed in ns.seeds
    ]
    if ns.no_real:
        pass
    elif (ns.real / "crops").is_dir():
        sessions.append(real_session(work, ns.real))
    else:
        print(f"seed example skipped: no crops folder at {ns.real / 'crops'}")
    return sessions


def write_json(
    path: Path,
    flags: list[str],
    ns: argparse.Namespace,
    results: Sequence[Result],
    notes: dict[str, list[str]],
) -> None:
    """Every result, with the truth's provenance per session."""
    payload = {
        "embedder_flags": flags,
        "frames": ns.frames,
        "settings": [str(s) for s in ns.settings],
        "truth": notes,
        "results": [
            {
                "session": r.session,
                "setting": r.setting,
                "threshold": r.threshold,
                "seconds": round(r.seconds, 3),
                "evaluation": r.evaluation.to_dict(),
                "errors": r.errors.to_dict(),
            }
            for r in results
        ],
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
