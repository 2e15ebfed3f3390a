"""crop-clusterd's exact cosine engine side by side with what people would use instead.

    python scripts/bench_peers.py --sizes 10000 50000 200000 --repeats 2

For each dataset (``easy``: synth.clustered_embeddings, species / individuals /
crops; ``near``: synth.near_threshold_embeddings, issue 13's groups of 8 right
at the threshold), size and dimension, one pickle is written and every method
clusters it at the same threshold, interleaved (A B C D A B C D ...), each run
in a child process of its own so that its CPU time (user + sys) and peak RSS
(``ru_maxrss``, from ``os.wait4``) are its own. Methods:

* ``crop-clusterd``: the batch engine (``CosineLinker``, what ``cluster
  --from-embeddings -c cosine`` runs), through the Python API.
* ``faiss-flat``: exact, ``faiss.IndexFlatIP.range_search`` in query blocks.
* ``faiss-hnsw``: ``faiss.IndexHNSWFlat`` (inner product) with growing k.
* ``hnswlib``: ``hnswlib.Index(space="ip")`` with growing k.
* ``faiss-ivf`` (on request): ``faiss.IndexIVFFlat`` with the engine's bucket
  settings, ``range_search``; the peer of the buckets past the crossover.

The peers share the engine's settings (M 32, ef_construction 100, ef 128, k
from 16 up by 4x while the k-th neighbour is above the threshold) and its exact
confirmation (:func:`crop_clusterd.linking.accept`), then take connected
components with scipy. Every partition is compared with the oracle's
(scripts/check_oracle.py's all-pairs oracle, cached in the work folder). Needs
the ``bench`` extra (faiss-cpu, threadpoolctl). Prints a markdown table; with
``--json`` also writes every run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from synth import GENERATORS

from crop_clusterd.defaults import (
    BUCKET_CROPS,
    BUCKET_PROBES,
    COSINE_THRESHOLD,
    HNSW_EF_CONSTRUCTION,
    HNSW_EF_SEARCH,
    HNSW_M,
)
from crop_clusterd.embfile import load_embeddings_pickle
from crop_clusterd.linking import CosineLinker, HnswParams, LinkBatch, Pairs, accept
from crop_clusterd.linking.exact import candidate_floor

Labels = npt.NDArray[np.int64]
Emb = npt.NDArray[np.float32]
METHODS = ("crop-clusterd", "faiss-flat", "faiss-hnsw", "hnswlib")
# The engine with its HNSW path forced (not a peer: for the cost model), and faiss's
# inverted file, the peer of the engine's buckets past the exact crossover.
EXTRA = ("crop-clusterd-index", "faiss-ivf")
K_START = 16


def smallest_member(component: npt.NDArray[np.integer[Any]]) -> Labels:
    """Relabel a partition so each crop's label is its cluster's smallest member."""
    n = len(component)
    first = np.full(int(component.max()) + 1, n, dtype=np.int64)
    np.minimum.at(first, component, np.arange(n))
    labels: Labels = first[component]
    return labels


def components(
    emb: Emb, threshold: float, a: Labels, b: Labels, approx: npt.NDArray[np.floating[Any]]
) -> Labels:
    """Confirm candidate pairs exactly (as the engine does) and take components."""
    n = len(emb)
    keep = a != b
    pairs = Pairs(a[keep], b[keep], approx[keep])
    ok = accept(emb, pairs, threshold)
    graph = coo_matrix(
        (np.ones(int(ok.sum()), dtype=np.int8), (pairs.a[ok], pairs.b[ok])), shape=(n, n)
    )
    _, comp = connected_components(graph, directed=False)
    return smallest_member(comp)


def run_engine(emb: Emb, threshold: float) -> Labels:
    """crop-clusterd's batch engine, as ``cluster --from-embeddings`` runs it."""
    linker = CosineLinker(threshold)
    linker.add(LinkBatch.from_embeddings(emb))
    return linker.cluster_ids()


def run_engine_index(emb: Emb, threshold: float) -> Labels:
    """The engine with the index forced at every size (``brute_force_below=0``)."""
    linker = CosineLinker(threshold, None, HnswParams(brute_force_below=0))
    linker.add(LinkBatch.from_embeddings(emb))
    return linker.cluster_ids()


def run_faiss_flat(emb: Emb, threshold: float) -> Labels:
    """Exact: every row's range search over all rows, in blocks of 4,096 queries."""
    import faiss

    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)
    floor = candidate_floor(threshold)
    a, b, sims = [], [], []
    for start in range(0, len(emb), 4096):
        lims, dist, ids = index.range_search(emb[start : start + 4096], floor)
        a.append(start + np.repeat(np.arange(len(lims) - 1), np.diff(lims).astype(np.int64)))
        b.append(ids.astype(np.int64))
        sims.append(dist)
    return components(emb, threshold, np.concatenate(a), np.concatenate(b), np.concatenate(sims))


def growing_k(search: Any, emb: Emb, floor: float) -> tuple[Labels, Labels, npt.NDArray[Any]]:
    """Query every row at k = 16, 64, ... while its k-th neighbour is above ``floor``.

    ``search(rows, k)`` returns (similarities, labels), both len(rows) x k.
    """
    n = len(emb)
    pending = np.arange(n)
    k = min(K_START, n)
    a, b, sims = [], [], []
    while len(pending):
        sim, lab = search(emb[pending], k)
        full = (sim[:, -1] >= floor) & (k < n)
        r, c = np.nonzero((sim >= floor) & ~full[:, None] & (lab >= 0))
        a.append(pending[r])
        b.append(lab[r, c].astype(np.int64))
        sims.append(sim[r, c])
        pending = pending[full]
        k = min(4 * k, n)
    return np.concatenate(a), np.concatenate(b), np.concatenate(sims)


def run_faiss_hnsw(emb: Emb, threshold: float) -> Labels:
    """faiss HNSW (inner product), the engine's M / ef settings, growing k."""
    import faiss

    index = faiss.IndexHNSWFlat(emb.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(emb)

    def search(x: Emb, k: int) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        index.hnsw.efSearch = max(HNSW_EF_SEARCH, k)
        sim, lab = index.search(x, k)
        return sim, lab

    floor = candidate_floor(threshold)
    return components(emb, threshold, *growing_k(search, emb, floor))


def run_hnswlib(emb: Emb, threshold: float) -> Labels:
    """hnswlib (inner product), the engine's M / ef settings, growing k."""
    import hnswlib

    index = hnswlib.Index(space="ip", dim=emb.shape[1])
    index.init_index(max_elements=len(emb), M=HNSW_M, ef_construction=HNSW_EF_CONSTRUCTION)
    index.set_num_threads(len(os.sched_getaffinity(0)))
    index.add_items(emb, np.arange(len(emb)))

    def search(x: Emb, k: int) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        index.set_ef(max(HNSW_EF_SEARCH, k))
        lab, dist = index.knn_query(x, k=k)
        return 1.0 - dist, lab

    floor = candidate_floor(threshold)
    return components(emb, threshold, *growing_k(search, emb, floor))


def run_faiss_ivf(emb: Emb, threshold: float) -> Labels:
    """faiss's inverted file, the engine's bucket settings: k-means into one list
    per BUCKET_CROPS crops (faiss's training sample, 256 rows per list at most),
    BUCKET_PROBES lists probed per query, ``range_search`` in query blocks."""
    import faiss

    dim, n = emb.shape[1], len(emb)
    lists = max(1, round(n / BUCKET_CROPS))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
    index.train(emb)
    index.add(emb)
    index.nprobe = min(BUCKET_PROBES, lists)
    floor = candidate_floor(threshold)
    a, b, sims = [], [], []
    for start in range(0, n, 4096):
        lims, dist, ids = index.range_search(emb[start : start + 4096], floor)
        a.append(start + np.repeat(np.arange(len(lims) - 1), np.diff(lims).astype(np.int64)))
        b.append(ids.astype(np.int64))
        sims.append(dist)
    return components(emb, threshold, np.concatenate(a), np.concatenate(b), np.concatenate(sims))


RUNNERS = {
    "crop-clusterd": run_engine,
    "crop-clusterd-index": run_engine_index,
    "faiss-flat": run_faiss_flat,
    "faiss-hnsw": run_faiss_hnsw,
    "hnswlib": run_hnswlib,
    "faiss-ivf": run_faiss_ivf,
}


def child(method: str, pkl: Path, out: Path, threshold: float) -> int:
    """One method on one pickle: labels to ``out`` (.npy), its own times on stdout."""
    emb = load_embeddings_pickle(pkl).embeddings
    wall, cpu = time.perf_counter(), time.process_time()
    labels = RUNNERS[method](emb, threshold)
    figures = {
        "method_wall_s": time.perf_counter() - wall,
        "method_cpu_s": time.process_time() - cpu,
    }
    np.save(out, labels)
    print(json.dumps(figures))
    return 0


def timed_child(
    method: str, pkl: Path, out: Path, threshold: float, timeout: float
) -> dict[str, Any]:
    """Run one method in a child; wall, user + sys CPU and peak RSS of that child alone."""
    cmd = [sys.executable, __file__, "--child", method, "--pkl", str(pkl), "--out", str(out)]
    cmd += ["--threshold", str(threshold)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    deadline = start + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            os.wait4(proc.pid, 0)
            return {"method": method, "status": f"timeout {timeout:.0f} s"}
        time.sleep(0.05)
    wall = time.perf_counter() - start
    stdout = proc.stdout.read() if proc.stdout else ""
    if os.waitstatus_to_exitcode(status) != 0:
        return {"method": method, "status": f"failed ({status})"}
    inner = json.loads(stdout.strip().splitlines()[-1])
    return {
        "method": method,
        "status": "ok",
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_mib": round(usage.ru_maxrss / 1024, 1),
        "method_wall_s": round(inner["method_wall_s"], 2),
        "method_cpu_s": round(inner["method_cpu_s"], 2),
    }


def dataset(work: Path, kind: str, n: int, dim: int, seed: int) -> Path:
    """The pickle of one dataset, written once (in a child, so that this
    process stays small: a forked child's peak RSS would count its memory)."""
    pkl = work / f"{kind}-{n}x{dim}-s{seed}.pkl"
    if not pkl.exists():
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]); import synth; "
            "from crop_clusterd.embfile import write_embeddings_pickle as w; "
            "from pathlib import Path; n, d, s = map(int, sys.argv[4:7]); "
            "e, _ = synth.GENERATORS[sys.argv[3]](n, d, seed=s); "
            "w(Path(sys.argv[2]), [f'crop_{i:07d}.png' for i in range(n)], e)"
        )
        here = str(Path(__file__).parent)
        argv = [here, str(pkl), kind, str(n), str(dim), str(seed)]
        subprocess.run([sys.executable, "-c", code, *argv], check=True)
    return pkl


def oracle_labels(pkl: Path, threshold: float) -> Labels:
    """The all-pairs oracle's partition (check_oracle.oracle), cached next to the pickle."""
    cache = pkl.with_name(f"{pkl.stem}-oracle-{threshold}.npy")
    if cache.exists():
        labels: Labels = np.load(cache)
        return labels
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import numpy as np; "
        "from check_oracle import oracle; "
        "from crop_clusterd.embfile import load_embeddings_pickle as load; "
        "e = load(sys.argv[2]).embeddings; np.save(sys.argv[3], oracle(e, float(sys.argv[4]))[0])"
    )
    here = str(Path(__file__).parent)
    subprocess.run(
        [sys.executable, "-c", code, here, str(pkl), str(cache), str(threshold)], check=True
    )
    labels = np.load(cache)
    return labels


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per dataset and method, medians over the repeats."""
    lines = [
        "| data | n | dim | method | wall s | CPU s | method CPU s | peak MiB | = oracle | runs |",
        "|---|---:|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    keys = dict.fromkeys((r["kind"], r["n"], r["dim"], r["method"]) for r in rows)
    for kind, n, dim, method in keys:
        runs = [
            r for r in rows if (r["kind"], r["n"], r["dim"], r["method"]) == (kind, n, dim, method)
        ]
        ok = [r for r in runs if r["status"] == "ok"]
        if not ok:
            lines.append(f"| {kind} | {n:,} | {dim} | {method} | {runs[0]['status']} | | | | | 0 |")
            continue
        med = {
            k: float(np.median([r[k] for r in ok]))
            for k in ("wall_s", "cpu_s", "method_cpu_s", "peak_mib")
        }
        equal = "yes" if all(r["equal"] for r in ok) else "NO"
        lines.append(
            f"| {kind} | {n:,} | {dim} | {method} | {med['wall_s']:.1f} | {med['cpu_s']:.1f} "
            f"| {med['method_cpu_s']:.1f} | {med['peak_mib']:.0f} | {equal} | {len(ok)} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[384], help="e.g. 384 1280")
    parser.add_argument("--kinds", nargs="+", choices=sorted(GENERATORS), default=["easy", "near"])
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS + EXTRA,
        default=list(METHODS),
        help="crop-clusterd-index: the engine with its index forced (for the cost model)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds per dataset")
    parser.add_argument("--threshold", type=float, default=COSINE_THRESHOLD)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/crop-clusterd-peers"))
    parser.add_argument("--json", type=Path, help="also write every run here")
    parser.add_argument("--no-oracle", action="store_true", help="compare with crop-clusterd")
    parser.add_argument("--child", choices=METHODS + EXTRA, help=argparse.SUPPRESS)
    parser.add_argument("--pkl", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> int:
    """Every dataset, every method, interleaved; the table (and JSON)."""
    args = parse_args()
    if args.child:
        return child(args.child, args.pkl, args.out, args.threshold)
    args.work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for dim in args.dims:
        for n in args.sizes:
            for kind in args.kinds:
                rows += measure(args, kind, n, dim)
                print(table(rows), flush=True)
                if args.json:
                    args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all(r.get("equal", True) for r in rows) else 1


def measure(args: argparse.Namespace, kind: str, n: int, dim: int) -> list[dict[str, Any]]:
    """All methods on one dataset, ``args.repeats`` interleaved rounds."""
    pkl = dataset(args.work, kind, n, dim, args.seed)
    expected = None if args.no_oracle else oracle_labels(pkl, args.threshold)
    out = args.work / f"labels-{os.getpid()}.npy"  # two runs may share a work folder
    rows = []
    load = os.getloadavg()[0]
    for _ in range(args.repeats):
        for method in args.methods:
            row = {"kind": kind, "n": n, "dim": dim, "load1": round(load, 2)}
            row |= timed_child(method, pkl, out, args.threshold, args.timeout)
            if row["status"] == "ok":
                labels = np.load(out)
                if expected is None:
                    expected = labels
                row["equal"] = bool(np.array_equal(labels, expected))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            load = os.getloadavg()[0]
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
