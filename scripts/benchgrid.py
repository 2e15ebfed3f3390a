#!/usr/bin/env python3
"""The threshold grid of ``scripts/bench_methods.py --grid``: cosine against track.

Simulates a session (or reuses one), embeds its crops once with the batch
command, then re-clusters the embeddings pickle over a grid of thresholds for
both methods, with and without spatio-temporal gating (``-mf``), and scores
every run against ``labels.csv`` (ARI, AMI, B-cubed, purity). Prints a table,
the best threshold per method, and optionally writes everything as JSON.

Run from the repository root with the package installed::

    python scripts/bench_methods.py --grid --work /tmp/bench --json bench.json
    python scripts/bench_methods.py --grid --work /tmp/bench -e dino -fp facebook/dinov2-base \\
        --allow-download --track-thresholds 0.4 0.5 0.6 0.7

``--work DIR`` keeps the simulation (``DIR/sim``) and each embedder's pickle
(``DIR/embed-<name>``), so a second run skips straight to clustering.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from crop_clusterd.batch import BatchRequest, run_batch
from crop_clusterd.cli import build_parser, config_from_args
from crop_clusterd.csvfiles import CLUSTERS_CSV
from crop_clusterd.defaults import DEFAULT_EMBEDDER, METHODS
from crop_clusterd.embfile import EMBEDDINGS_PKL
from crop_clusterd.evaluate import Evaluation, load_labels_csv, match_labels
from crop_clusterd.log import configure_logging
from crop_clusterd.simulate import SimConfig, simulate

# Wide enough to see both sides of the optimum for the bundled model; the
# refinement pass then looks at 0.01 steps around each best value.
DEFAULT_COSINE_GRID = (0.70, 0.75, 0.80, 0.84, 0.88, 0.90, 0.92, 0.94, 0.96, 0.98)
DEFAULT_TRACK_GRID = (0.40, 0.50, 0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90, 0.95)
DEFAULT_FRAMES = 340  # ~5,200 crops with the simulator's defaults (300 give ~4,600)


@dataclass(frozen=True)
class SpeciesMixing:
    """How much cross-species (and look-alike) confusion a clustering keeps.

    A cluster is *mixed* when its crops come from two or more species; it is a
    *look-alike* mix when two of those species are a simulated look-alike pair.
    ``cross_species_pairs`` is the share of same-cluster crop pairs whose
    species differ; ``lookalike_share`` the part of those that are look-alikes.
    """

    mixed_clusters: int
    lookalike_clusters: int
    crops_in_mixed: float
    cross_species_pairs: float
    lookalike_share: float


@dataclass(frozen=True)
class Run:
    """One clustering of the embeddings and its scores."""

    method: str
    gated: bool
    threshold: float
    seconds: float
    evaluation: Evaluation
    mixing: SpeciesMixing | None


@dataclass(frozen=True)
class Workspace:
    """Where the simulation and the embeddings of one embedder live."""

    sim: Path
    labels: Path
    embed_dir: Path

    @property
    def pickle(self) -> Path:
        """The embeddings pickle the batch command writes."""
        return self.embed_dir / str(EMBEDDINGS_PKL)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The benchmark's command line."""
    p = argparse.ArgumentParser(
        prog="bench_methods --grid",
        description="Compare cosine and track clustering on simulated ground truth.",
    )
    p.add_argument("--work", type=Path, help="working folder, reused when it already holds "
                   "a simulation/embeddings (default: a new temporary folder)")  # fmt: skip
    p.add_argument("--frames", type=int, default=DEFAULT_FRAMES,
                   help="frames to simulate (default %(default)s)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="simulation seed (default 0)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--gating", choices=("both", "on", "off"), default="both",
                   help="run with -mf, without, or both (default both)")  # fmt: skip
    p.add_argument("--cosine-thresholds", nargs="+", type=float,
                   default=list(DEFAULT_COSINE_GRID))  # fmt: skip
    p.add_argument("--track-thresholds", nargs="+", type=float,
                   default=list(DEFAULT_TRACK_GRID))  # fmt: skip
    p.add_argument("--no-refine", action="store_true",
                   help="skip the 0.01-step pass around each best threshold")  # fmt: skip
    p.add_argument("--json", type=Path, help="write all runs and the best thresholds here")
    p.add_argument("--config", type=Path,
                   help="TOML config for the re-clusterings (other gating windows)")  # fmt: skip
    p.add_argument("--species", action="store_true",
                   help="also measure cross-species / look-alike mixing per run")  # fmt: skip
    add_embedder_arguments(p)
    return p.parse_args(argv)


def add_embedder_arguments(p: argparse.ArgumentParser) -> None:
    """The embedder flags passed on to ``crop-clusterd cluster`` (see :func:`_embed_flags`)."""
    emb = p.add_argument_group("embedder (passed to crop-clusterd cluster)")
    emb.add_argument("-e", "--embed", default=DEFAULT_EMBEDDER)
    emb.add_argument("-fp", "--from_pretrained")
    emb.add_argument("--arch")
    emb.add_argument("-d", "--device")
    emb.add_argument("--batch-size", type=int)
    emb.add_argument("--workers", type=int)
    emb.add_argument("--allow-download", action="store_true")


def _embed_flags(ns: argparse.Namespace) -> list[str]:
    flags = ["-e", ns.embed]
    for flag, value in (
        ("-fp", ns.from_pretrained),
        ("--arch", ns.arch),
        ("-d", ns.device),
        ("--batch-size", ns.batch_size),
        ("--workers", ns.workers),
    ):
        if value is not None:
            flags += [flag, str(value)]
    if ns.allow_download:
        flags.append("--allow-download")
    return flags


def prepare_simulation(work: Path, frames: int, seed: int) -> tuple[Path, Path]:
    """Simulate into ``work/sim`` unless a matching simulation is already there."""
    sim = work / "sim"
    report = sim / "simulation.json"
    if report.exists():
        config = json.loads(report.read_text())["config"]
        if (config["frames"], config["seed"]) != (frames, seed):
            raise SystemExit(
                f"bench_methods: {sim} holds a simulation with frames={config['frames']}, "
                f"seed={config['seed']}, not frames={frames}, seed={seed}; pass matching "
                f"--frames/--seed or another --work folder"
            )
        print(f"reusing simulation {sim}")
    else:
        began = time.monotonic()
        summary = simulate(SimConfig(seed=seed, frames=frames), sim)
        print(
            f"simulated {summary.crops} crops of {summary.individuals} individuals "
            f"({summary.species} species) in {time.monotonic() - began:.0f} s -> {sim}"
        )
    return sim, sim / "labels.csv"


def prepare_embeddings(work: Path, sim: Path, labels: Path, flags: list[str]) -> Path:
    """Embed the simulation once with the batch command; reuse a matching pickle."""
    # The folder name carries a hash of the embedder flags, so -fp/--arch changes
    # can never silently reuse another model's vectors.
    key = hashlib.sha1(" ".join(flags).encode()).hexdigest()[:8]
    embed_dir = work / f"embed-{flags[1]}-{key}"
    pickle = embed_dir / EMBEDDINGS_PKL
    if pickle.exists():
        print(f"reusing embeddings {pickle}")
        return embed_dir
    cmd = [
        sys.executable, "-m", "crop_clusterd.cli", "cluster",
        "-i", str(sim), "--recursive", "-o", str(embed_dir),
        "--labels", str(labels), "--log-level", "warning", *flags,
    ]  # fmt: skip
    print("embedding:", " ".join(cmd), flush=True)
    began = time.monotonic()
    subprocess.run(cmd, check=True)
    print(f"embedded in {time.monotonic() - began:.0f} s")
    (embed_dir / "embed-flags.json").write_text(json.dumps(flags) + "\n")
    return embed_dir


def load_lookalikes(sim: Path) -> set[frozenset[str]]:
    """The look-alike species pairs of a simulation, as sets of species codes."""
    species = json.loads((sim / "simulation.json").read_text()).get("species", [])
    pairs = set()
    for sp in species:
        if sp.get("look_alike_of") is not None:
            pairs.add(frozenset({f"sp{sp['index']:02d}", f"sp{sp['look_alike_of']:02d}"}))
    return pairs


def species_mixing(
    clusters: Sequence[int], labels: Sequence[str], lookalikes: set[frozenset[str]]
) -> SpeciesMixing:
    """Cross-species confusion of a clustering; labels read ``<species>-<individual>``."""
    members: dict[int, Counter[str]] = defaultdict(Counter)
    for c, label in zip(clusters, labels, strict=True):
        members[c][label.split("-", 1)[0]] += 1
    mixed = lookalike = crops_mixed = 0
    pairs_same = pairs_cross = pairs_lookalike = 0
    for counts in members.values():
        size = sum(counts.values())
        pairs_same += size * (size - 1) // 2
        if len(counts) < 2:
            continue
        mixed += 1
        crops_mixed += size
        codes = sorted(counts)
        has_lookalike = False
        for i, a in enumerate(codes):
            for b in codes[i + 1 :]:
                n = counts[a] * counts[b]
                pairs_cross += n
                if frozenset({a, b}) in lookalikes:
                    pairs_lookalike += n
                    has_lookalike = True
        lookalike += has_lookalike
    return SpeciesMixing(
        mixed_clusters=mixed,
        lookalike_clusters=lookalike,
        crops_in_mixed=crops_mixed / max(1, len(labels)),
        cross_species_pairs=pairs_cross / max(1, pairs_same),
        lookalike_share=pairs_lookalike / max(1, pairs_cross),
    )


def _read_clusters(path: Path) -> tuple[list[str], list[int]]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [r["filename"] for r in rows], [int(r["cluster"]) for r in rows]


def cluster_once(
    ws: Workspace,
    method: str,
    gated: bool,
    threshold: float,
    labels: dict[str, str],
    lookalikes: set[frozenset[str]] | None,
    config_file: Path | None = None,
) -> Run:
    """Re-cluster the pickle exactly as ``crop-clusterd cluster --from-embeddings`` would."""
    tag = f"{method}-{'gated' if gated else 'ungated'}-{threshold:.2f}"
    if config_file is not None:
        tag += f"-{config_file.stem}"
    out = ws.embed_dir / "runs" / tag
    argv = [
        "cluster", "--from-embeddings", str(ws.pickle), "-o", str(out),
        "-c", method, "-th", repr(threshold), "--labels", str(ws.labels),
    ]  # fmt: skip
    if gated:
        argv += ["-mf", str(ws.sim)]
    if config_file is not None:
        argv += ["--config", str(config_file)]
    config = config_from_args(build_parser().parse_args(argv))
    began = time.perf_counter()
    result = run_batch(BatchRequest(config=config, from_embeddings=ws.pickle, labels_csv=ws.labels))
    seconds = time.perf_counter() - began
    if result.evaluation is None:
        raise SystemExit(f"bench_methods: no crop of {ws.pickle} matched {ws.labels}")
    mixing = None
    if lookalikes is not None:
        names, ids = _read_clusters(out / CLUSTERS_CSV)
        known = [
            (c, lab)
            for c, lab in zip(ids, match_labels(names, labels), strict=True)
            if lab is not None
        ]
        mixing = species_mixing([c for c, _ in known], [lab for _, lab in known], lookalikes)
    return Run(method, gated, threshold, seconds, result.evaluation, mixing)


def best_runs(runs: Sequence[Run]) -> dict[tuple[str, bool], Run]:
    """The highest-ARI run per (method, gating); ties go to the higher threshold."""
    best: dict[tuple[str, bool], Run] = {}
    for run in runs:
        key = (run.method, run.gated)
        cur = best.get(key)
        if cur is None or (run.evaluation.ari, run.threshold) > (
            cur.evaluation.ari,
            cur.threshold,
        ):
            best[key] = run
    return best


def _refine_grid(grid: Sequence[float], best: float) -> list[float]:
    """0.01 steps strictly between the best threshold's grid neighbours."""
    ordered = sorted(grid)
    i = ordered.index(best)
    low = ordered[i - 1] if i > 0 else best - 0.05
    high = ordered[i + 1] if i + 1 < len(ordered) else min(0.999, best + 0.05)
    steps = round((high - low) / 0.01)
    return [
        round(low + k * 0.01, 2)
        for k in range(1, steps)
        if round(low + k * 0.01, 2) not in {round(g, 2) for g in grid}
    ]


HEADER = (
    f"{'method':<7} {'gating':<6} {'thresh':>6} {'clusters':>8} {'ARI':>7} {'AMI':>7} "
    f"{'B3-P':>7} {'B3-R':>7} {'B3-F1':>7} {'purity':>7} {'secs':>6}"
)


def format_row(run: Run) -> str:
    """One table line for a run."""
    e = run.evaluation
    line = (
        f"{run.method:<7} {'-mf' if run.gated else 'none':<6} {run.threshold:>6.2f} "
        f"{e.n_clusters:>8d} {e.ari:>7.4f} {e.ami:>7.4f} {e.bcubed_precision:>7.4f} "
        f"{e.bcubed_recall:>7.4f} {e.bcubed_f1:>7.4f} {e.purity:>7.4f} {run.seconds:>6.1f}"
    )
    if run.mixing is not None:
        m = run.mixing
        line += (
            f"  mixed={m.mixed_clusters} lookalike={m.lookalike_clusters} "
            f"crops_in_mixed={m.crops_in_mixed:.3f} xsp_pairs={m.cross_species_pairs:.4f}"
        )
    return line


def _run_dict(run: Run) -> dict[str, object]:
    return {
        "method": run.method,
        "gated": run.gated,
        "threshold": run.threshold,
        "seconds": round(run.seconds, 3),
        **run.evaluation.to_dict(),
        **({"species_mixing": asdict(run.mixing)} if run.mixing is not None else {}),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the process exit status."""
    ns = parse_args(argv)
    configure_logging("console", "warning")
    work = ns.work or Path(tempfile.mkdtemp(prefix="bench-methods-"))
    work.mkdir(parents=True, exist_ok=True)
    sim, labels_csv = prepare_simulation(work, ns.frames, ns.seed)
    flags = _embed_flags(ns)
    ws = Workspace(sim, labels_csv, prepare_embeddings(work, sim, labels_csv, flags))
    labels = load_labels_csv(labels_csv)
    lookalikes = load_lookalikes(sim) if ns.species else None
    gatings = {"both": (False, True), "on": (True,), "off": (False,)}[ns.gating]
    grids = {"cosine": ns.cosine_thresholds, "track": ns.track_thresholds}

    runs: list[Run] = []
    print(HEADER)
    for method in ns.methods:
        for gated in gatings:
            done: list[Run] = []
            for th in grids[method]:
                done.append(cluster_once(ws, method, gated, th, labels, lookalikes, ns.config))
                print(format_row(done[-1]), flush=True)
            if not ns.no_refine:
                top = best_runs(done)[(method, gated)].threshold
                for th in _refine_grid(grids[method], top):
                    done.append(cluster_once(ws, method, gated, th, labels, lookalikes, ns.config))
                    print(format_row(done[-1]), flush=True)
            runs.extend(done)

    best = best_runs(runs)
    n_crops = runs[0].evaluation.n_items if runs else 0
    print(f"\nbest threshold by ARI ({n_crops} crops, embedder {ns.embed}):")
    print(HEADER)
    for key in sorted(best):
        print(format_row(best[key]))
    for gated in gatings:
        pair = [best.get((m, gated)) for m in METHODS]
        if all(r is not None for r in pair):
            cos, trk = pair
            assert cos is not None and trk is not None
            verdict = "beats" if trk.evaluation.ari > cos.evaluation.ari else "does NOT beat"
            print(
                f"{'with' if gated else 'without'} gating: track (th {trk.threshold:.2f}, "
                f"ARI {trk.evaluation.ari:.4f}) {verdict} cosine (th {cos.threshold:.2f}, "
                f"ARI {cos.evaluation.ari:.4f})"
            )

    if ns.json is not None:
        payload = {
            "embedder_flags": flags,
            "simulation": {"folder": str(sim), "frames": ns.frames, "seed": ns.seed},
            "crops": n_crops,
            "runs": [_run_dict(r) for r in runs],
            "best": {
                f"{m}-{'gated' if g else 'ungated'}": _run_dict(r)
                for (m, g), r in sorted(best.items())
            },
        }
        ns.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {ns.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
