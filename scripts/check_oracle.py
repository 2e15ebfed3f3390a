"""Check the cosine engine against an exact all-pairs oracle at scale.

    python scripts/check_oracle.py --n 200000 --dim 384

The oracle visits every pair (blocked float32 products, pairs near the threshold
settled in float64 like the engine) and takes connected components; no index.
Prints both partitions' sizes, whether they are equal, and the times.

At a million crops the full oracle takes hours on two cores; ``--sample-rows N``
instead finds every pair above the threshold that involves N random rows, exactly,
and counts the pairs the engine put in different clusters (missed links):

    python scripts/check_oracle.py --n 1000000 --sample-rows 5000
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from synth import clustered_embeddings, near_threshold_embeddings

from crop_clusterd.defaults import COSINE_THRESHOLD
from crop_clusterd.linking import CosineLinker, HnswParams, LinkBatch, pair_cosine


def oracle(
    emb: npt.NDArray[np.float32], threshold: float, block: int = 2048
) -> tuple[npt.NDArray[np.int64], int]:
    """Cluster id (smallest member) per row, from all pairs, and how many pairs linked."""
    n = len(emb)
    rows, cols = [], []
    for start in range(0, n, block):
        stop = min(n, start + block)
        sims = emb[start:stop] @ emb[:stop].T  # pairs (i, j) with j < i only
        r, c = np.nonzero(sims >= threshold - 1e-4)
        r += start
        keep = c < r
        r, c = r[keep], c[keep]
        exact = pair_cosine(emb, r, c) >= threshold
        rows.append(r[exact])
        cols.append(c[exact])
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(r), dtype=np.int8), (r, c)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    first = np.full(comp.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, comp, np.arange(n))
    return first[comp], len(r)


def sampled_misses(
    emb: npt.NDArray[np.float32],
    ids: npt.NDArray[np.int64],
    threshold: float,
    rows: int,
    seed: int = 1,
    block: int = 512,
) -> tuple[int, int]:
    """(pairs above the threshold involving ``rows`` random rows, pairs split by ``ids``)."""
    sample = np.random.default_rng(seed).choice(len(emb), size=rows, replace=False)
    pairs = missed = 0
    for start in range(0, rows, block):
        part = sample[start : start + block]
        sims = emb[part] @ emb.T
        r, c = np.nonzero(sims >= threshold - 1e-4)
        a, b = part[r], c.astype(np.int64)
        keep = a != b
        a, b = a[keep], b[keep]
        exact = pair_cosine(emb, a, b) >= threshold
        a, b = a[exact], b[exact]
        pairs += len(a)
        missed += int(np.count_nonzero(ids[a] != ids[b]))
    return pairs, missed


def main() -> int:
    """Run engine and oracle on the same synthetic embeddings and compare."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--threshold", type=float, default=COSINE_THRESHOLD)
    parser.add_argument("--seed", type=int, default=0)
    defaults = HnswParams()
    parser.add_argument("--m", type=int, default=defaults.m)
    parser.add_argument("--ef-construction", type=int, default=defaults.ef_construction)
    parser.add_argument("--ef", type=int, default=defaults.ef_search)
    parser.add_argument("--k", type=int, default=defaults.k_start)
    parser.add_argument(
        "--side-index-from",
        type=int,
        default=defaults.side_index_from,
        help="lost queries that trigger the side index (0 = always use it)",
    )
    parser.add_argument("--side-ef", type=int, default=defaults.side_ef)
    parser.add_argument(
        "--sample-rows",
        type=int,
        default=0,
        help="check only the pairs of N random rows",
    )
    parser.add_argument(
        "--force-index",
        action="store_true",
        help="search through the HNSW index at any size (by default a batch below the "
        "cost model's crossover is searched by exact products, equal by construction)",
    )
    parser.add_argument(
        "--force-buckets",
        action="store_true",
        help="search through k-means buckets at any size (by default only past "
        "the cost model's crossover)",
    )
    parser.add_argument(
        "--force-exact",
        action="store_true",
        help="search by exact products at any size (brute_force_below above n)",
    )
    parser.add_argument(
        "--near",
        action="store_true",
        help="issue 13's near-threshold groups (synth.near_threshold_embeddings) "
        "instead of species / individuals / crops",
    )
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument(
        "--cache", type=Path, help="folder to keep the oracle's result in, to compare settings"
    )
    args = parser.parse_args()

    generate = near_threshold_embeddings if args.near else clustered_embeddings
    emb, _ = generate(args.n, args.dim, seed=args.seed)
    # Against at most 200,000 columns, scaled: a 1,000 x n block is 4 GB at a million.
    cols = min(args.n, 200_000)
    probe = emb[:1000] @ emb[:cols].T
    near = int(np.count_nonzero(np.abs(probe - args.threshold) < 0.01) * args.n / cols)
    del probe
    # brute_force_below: 0 = never exact without an index, n + 1 = always exact.
    below = {"force_index": 0, "force_exact": args.n + 1, "force_buckets": 1}
    forced = [below[flag] for flag in below if getattr(args, flag)]
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    linker = CosineLinker(
        args.threshold,
        None,
        HnswParams(
            m=args.m,
            ef_construction=args.ef_construction,
            ef_search=args.ef,
            k_start=args.k,
            side_index_from=args.side_index_from,
            side_ef=args.side_ef,
            brute_force_below=forced[0] if forced else HnswParams().brute_force_below,
            force_buckets=args.force_buckets,
        ),
    )
    linker.add(LinkBatch.from_embeddings(emb))
    engine = linker.cluster_ids()
    t_engine = time.perf_counter() - t0
    t_cpu = time.process_time() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's, data included
    if args.sample_rows:
        t0 = time.perf_counter()
        pairs, missed = sampled_misses(emb, engine, args.threshold, args.sample_rows)
        sampled = {
            "n": args.n,
            "engine_clusters": len(np.unique(engine)),
            "sampled_rows": args.sample_rows,
            "pairs_above_threshold": pairs,
            "pairs_split_by_engine": missed,
            "data": "near" if args.near else "easy",
            "search": search_name(args),
            "engine_s": round(t_engine, 1),
            "engine_cpu_s": round(t_cpu, 1),
            "peak_rss_over_raw": round(peak / emb.nbytes, 2),
            "check_s": round(time.perf_counter() - t0, 1),
        }
        print(json.dumps(sampled, indent=2))
        return 0 if missed == 0 else 1
    t0 = time.perf_counter()
    cache = None
    if args.cache is not None:
        kind = "near" if args.near else "easy"
        cache = args.cache / f"oracle-{kind}-{args.n}-{args.dim}-{args.seed}-{args.threshold}.npz"
    if cache is not None and cache.exists():
        saved = np.load(cache)
        expected, n_links = saved["ids"], int(saved["links"])
    else:
        expected, n_links = oracle(emb, args.threshold)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, ids=expected, links=n_links)
    t_oracle = time.perf_counter() - t0
    result = {
        "n": args.n,
        "dim": args.dim,
        "threshold": args.threshold,
        "pairs_within_0.01_of_threshold_per_1000_rows": near,
        "oracle_links": n_links,
        "engine_clusters": len(np.unique(engine)),
        "oracle_clusters": len(np.unique(expected)),
        "equal": bool(np.array_equal(engine, expected)),
        "crops_in_differing_clusters": int(np.count_nonzero(engine != expected)),
        "data": "near" if args.near else "easy",
        "search": search_name(args),
        "hnsw": [args.m, args.ef_construction, args.ef, args.k],
        "side_index": [args.side_index_from, args.side_ef],
        "engine_s": round(t_engine, 1),
        "oracle_s": round(t_oracle, 1),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0 if result["equal"] else 1


def search_name(args: argparse.Namespace) -> str:
    """How the engine was told to search, for the report."""
    for flag in ("force_index", "force_buckets", "force_exact"):
        if getattr(args, flag):
            return flag.replace("_", " ")
    return "by the cost model"


if __name__ == "__main__":
    raise SystemExit(main())
