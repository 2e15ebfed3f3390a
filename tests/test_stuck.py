"""Case 5, a stuck insect, through the batch command: ``cluster --from-embeddings -c cosine``
on embeddings with a dense group of near-duplicates gives the all-pairs oracle's
partition, the stuck group one cluster. Timing is scripts/bench_stuck.py's job."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from oracles import cosine_oracle, partition

from crop_clusterd import cli
from crop_clusterd.csvfiles import read_clusters_csv
from crop_clusterd.embfile import load_embeddings_pickle, write_embeddings_pickle
from crop_clusterd.linking import HnswParams

pytestmark = pytest.mark.usefixtures("restore_logging")


def test_cluster_from_embeddings_with_a_stuck_insect_equals_the_oracle(tmp_path: Path) -> None:
    n, stuck, dim = HnswParams().brute_force_below + 900, 1500, 24
    rng = np.random.default_rng(21)
    centres = rng.standard_normal((n // 6, dim))
    ordinary = centres[rng.integers(0, len(centres), n - stuck)]
    ordinary += 0.3 / np.sqrt(dim) * rng.standard_normal(ordinary.shape)
    # Pairwise cosine about 0.99 around one ordinary crop: a moth stuck on the screen.
    group = ordinary[0] / np.linalg.norm(ordinary[0])
    group = group + 0.1 / np.sqrt(dim) * rng.standard_normal((stuck, dim))
    order = rng.permutation(n)
    emb = np.vstack([ordinary, group])[order]
    names = [f"crop_{i:05d}.png" for i in range(n)]
    pkl = tmp_path / "embeddings.pkl"
    write_embeddings_pickle(pkl, names, emb)

    out = tmp_path / "out"
    args = ["cluster", "--from-embeddings", str(pkl), "-o", str(out), "-c", "cosine"]
    assert cli.main([*args, "-th", "0.9", "--log-level", "error"]) == 0

    cluster_of = dict(read_clusters_csv(out / "clusters.csv"))
    assert sorted(cluster_of) == names, "every crop exactly once"
    got = [cluster_of[name] for name in names]
    loaded = load_embeddings_pickle(pkl).embeddings
    assert partition(got) == partition(cosine_oracle(loaded, 0.9))
    stuck_rows = np.flatnonzero(order >= n - stuck)
    assert len({got[i] for i in stuck_rows}) == 1
