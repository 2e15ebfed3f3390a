"""Cluster a million embeddings through the real command and measure it.

    python scripts/bench_scale.py --n 1000000 --dim 384 --work /tmp/scale [--kind near]

Writes a synthetic embeddings pickle (species / individuals / crops, or with
``--kind near`` issue 13's near-threshold groups; see synth.py), then runs
``crop-clusterd cluster --from-embeddings`` on it in a child process and
reports wall time, the child's peak RSS and that peak as a multiple of the raw
embedding bytes (n x dim x 4).

    python scripts/bench_scale.py --held --n 100000 --micro 32

feeds the vectors to an ungated cosine linker in micro-batches, as the daemon
does, once with its columns in memory and once memory-mapped (each in a child
of its own), and reports the linker's anonymous and file-backed resident bytes
per vector (/proc/self/status RssAnon, RssFile) against the vector's own bytes,
and the seconds the adds took.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from synth import GENERATORS, clustered_embeddings

from crop_clusterd.csvfiles import read_clusters_csv
from crop_clusterd.defaults import COSINE_THRESHOLD
from crop_clusterd.embfile import write_embeddings_pickle
from crop_clusterd.linking import CosineLinker, LinkBatch


def main() -> int:
    """Generate (or reuse) the pickle, cluster it, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument(
        "--kind", choices=sorted(GENERATORS), default="easy",
        help="easy: species/individuals (the default); near: issue 13's near-threshold groups",
    )  # fmt: skip
    parser.add_argument("--threshold", type=float, default=COSINE_THRESHOLD)
    parser.add_argument("--work", type=Path, default=Path("/tmp/crop-clusterd-scale"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--config", type=Path, help="config file for the cluster command")
    parser.add_argument(
        "--held", action="store_true", help="measure the bytes a live linker holds per vector"
    )
    parser.add_argument("--micro", type=int, default=32, help="crops per add with --held")
    parser.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--held-child", choices=["memory", "mapped"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.held_child:
        print(json.dumps(held_child(args, mapped=args.held_child == "mapped")))
        return 0
    if args.held:
        return held(args)

    args.work.mkdir(parents=True, exist_ok=True)
    kind = "" if args.kind == "easy" else f"{args.kind}-"
    pkl = args.work / f"embeddings-{kind}{args.n}x{args.dim}.pkl"
    if args.generate_only:
        emb, _ = GENERATORS[args.kind](args.n, args.dim)
        write_embeddings_pickle(pkl, [f"crop_{i:07d}.png" for i in range(args.n)], emb)
        return 0
    if not pkl.exists():
        # In a child of its own: a forked child's peak RSS counts the parent's
        # memory at fork time, so this process must stay small.
        subprocess.run([sys.executable, *sys.argv, "--generate-only"], check=True)
    out = args.work / "out"
    cmd = [
        sys.executable, "-m", "crop_clusterd.cli", "cluster",
        "--from-embeddings", str(pkl), "-o", str(out),
        "-th", str(args.threshold), "--log-format", "json",
        *(["--config", str(args.config)] if args.config else []),
    ]  # fmt: skip
    start = time.perf_counter()
    child = subprocess.Popen(cmd)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        print(f"cluster command failed with status {status}", file=sys.stderr)
        return 1
    rows = read_clusters_csv(out / "clusters.csv")
    raw = args.n * args.dim * 4
    peak = usage.ru_maxrss * 1024  # kilobytes on Linux
    result = {
        "n": args.n,
        "dim": args.dim,
        "kind": args.kind,
        "threshold": args.threshold,
        "rows_in_clusters_csv": len(rows),
        "clusters": len({c for _, c in rows}),
        "wall_s": round(wall, 1),
        "peak_rss_gb": round(peak / 1e9, 2),
        "raw_embedding_gb": round(raw / 1e9, 2),
        "peak_over_raw": round(peak / raw, 2),
        "cpus": len(os.sched_getaffinity(0)),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def rss_bytes() -> tuple[int, int]:
    """(RssAnon, RssFile) of this process in bytes, from /proc/self/status."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["RssAnon"], fields["RssFile"]


def held_child(args: argparse.Namespace, *, mapped: bool) -> dict[str, object]:
    """Feed ``args.n`` vectors in micro-batches; the resident bytes they added."""
    emb, _ = clustered_embeddings(args.n, args.dim)
    linker = CosineLinker(args.threshold)
    with tempfile.TemporaryDirectory(dir=args.work) as folder:
        if mapped and not linker.map_vectors(Path(folder)):
            raise SystemExit("this linker cannot map its vectors")
        gc.collect()
        anon0, file0 = rss_bytes()
        start = time.perf_counter()
        for lo in range(0, args.n, args.micro):
            linker.add(LinkBatch.from_embeddings(emb[lo : lo + args.micro].copy()))
        seconds = time.perf_counter() - start
        gc.collect()
        anon1, file1 = rss_bytes()
    vector = args.dim * 4
    return {
        "columns": "mapped" if mapped else "memory",
        "anon_per_vector": round((anon1 - anon0) / args.n),
        "file_per_vector": round((file1 - file0) / args.n),
        "anon_over_vector": round((anon1 - anon0) / args.n / vector, 2),
        "add_s": round(seconds, 1),
    }


def held(args: argparse.Namespace) -> int:
    """Both column kinds, each measured in a fresh child process."""
    args.work.mkdir(parents=True, exist_ok=True)
    argv = [a for a in sys.argv[1:] if a != "--held"]
    rows = []
    for kind in ("memory", "mapped"):
        done = subprocess.run(
            [sys.executable, sys.argv[0], *argv, "--held-child", kind],
            check=True,
            capture_output=True,
            text=True,
        )
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    result = {"n": args.n, "dim": args.dim, "micro": args.micro, "vector_bytes": args.dim * 4}
    result["runs"] = rows
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
