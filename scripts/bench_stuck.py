"""A stuck insect: ungated cosine on data with a dense near-duplicate group, side by side.

    python scripts/bench_stuck.py --n 12000 --stuck 3000

A dead moth on the screen yields thousands of near-identical crops. This links
``n`` ordinary embeddings (synth.py) and, in the same run, ``n`` embeddings of
which ``stuck`` are near-duplicates of one crop (pairwise cosine about
``--stuck-cosine``), each with ``CosineLinker(threshold).add`` on one batch.
The two runs alternate ``--repeat`` times (other load on the machine hits both
alike); prints every time, the medians, their ratio (stuck / ordinary), the
stuck group's cluster count, and whether each partition equals the exact
all-pairs oracle (check_oracle.py's; skipped with ``--no-oracle``).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import numpy.typing as npt
from check_oracle import oracle
from synth import clustered_embeddings

from crop_clusterd.defaults import COSINE_THRESHOLD
from crop_clusterd.linking import CosineLinker, LinkBatch


def with_stuck_group(
    n: int, stuck: int, dim: int, seed: int, cosine: float
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """``n`` unit rows: ``n - stuck`` ordinary ones and ``stuck`` near-duplicates
    of one of them (pairwise cosine about ``cosine``), shuffled together.

    Returns the rows and the indices of the stuck ones.
    """
    base, _ = clustered_embeddings(n - stuck, dim, seed=seed)
    rng = np.random.default_rng(seed + 1)
    centre = base[rng.integers(len(base))].astype(np.float64)
    # For unit centre c and noise e with |e|^2 = s^2: cos(c + e1, c + e2) ~ 1 / (1 + s^2).
    spread = np.sqrt(1.0 / cosine - 1.0)
    noise = rng.standard_normal((stuck, dim)) * spread / np.sqrt(dim)
    group = centre + noise
    group /= np.linalg.norm(group, axis=1, keepdims=True)
    emb = np.vstack([base, group.astype(np.float32)])
    order = rng.permutation(n)
    emb = np.ascontiguousarray(emb[order])
    stuck_rows = np.flatnonzero(order >= n - stuck).astype(np.int64)
    return emb, stuck_rows


def timed_link(
    emb: npt.NDArray[np.float32], threshold: float
) -> tuple[float, npt.NDArray[np.int64]]:
    """Seconds to link ``emb`` as one batch, and the cluster ids."""
    linker = CosineLinker(threshold)
    start = time.perf_counter()
    linker.add(LinkBatch.from_embeddings(emb))
    ids = linker.cluster_ids()
    return time.perf_counter() - start, ids


def main() -> int:
    """Time both runs, compare with the oracle, print the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=12_000)
    parser.add_argument("--stuck", type=int, default=3_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--stuck-cosine", type=float, default=0.99)
    parser.add_argument("--threshold", type=float, default=COSINE_THRESHOLD)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs of each")
    parser.add_argument("--no-oracle", action="store_true", help="skip the all-pairs check")
    args = parser.parse_args()

    ordinary, _ = clustered_embeddings(args.n, args.dim, seed=args.seed)
    stuck, stuck_rows = with_stuck_group(args.n, args.stuck, args.dim, args.seed, args.stuck_cosine)
    probe = stuck[stuck_rows[:200]] @ stuck[stuck_rows].T
    off_diagonal = np.arange(probe.shape[1])[None, :] != np.arange(len(probe))[:, None]
    times: dict[str, list[float]] = {"ordinary": [], "stuck": []}
    for _ in range(max(1, args.repeat)):
        seconds, ids_ordinary = timed_link(ordinary, args.threshold)
        times["ordinary"].append(round(seconds, 2))
        seconds, ids_stuck = timed_link(stuck, args.threshold)
        times["stuck"].append(round(seconds, 2))
    t_ordinary = float(np.median(times["ordinary"]))
    t_stuck = float(np.median(times["stuck"]))
    result: dict[str, object] = {
        "n": args.n,
        "stuck": args.stuck,
        "stuck_pairwise_cosine_median": round(float(np.median(probe[off_diagonal])), 4),
        "ordinary_s": times["ordinary"],
        "stuck_s": times["stuck"],
        "ratio_of_medians": round(t_stuck / t_ordinary, 2),
        "stuck_group_clusters": len(np.unique(ids_stuck[stuck_rows])),
    }
    ok = True
    if not args.no_oracle:
        for name, emb, ids in (("ordinary", ordinary, ids_ordinary), ("stuck", stuck, ids_stuck)):
            expected, _ = oracle(emb, args.threshold)
            equal = bool(np.array_equal(ids, expected))
            result[f"{name}_equals_oracle"] = equal
            ok = ok and equal
    print(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
