"""Brute-force reference implementations the engine is checked against.

Deliberately naive: all pairs, a dict-based union-find, no index.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from crop_clusterd.linking import Gating


def cosine_oracle(
    embeddings: npt.NDArray[np.float32],
    threshold: float,
    times: npt.NDArray[np.float64] | None = None,
    centers: npt.NDArray[np.float64] | None = None,
    gating: Gating | None = None,
) -> list[int]:
    """Cluster id (smallest member index) per item, from every pair."""
    n = len(embeddings)
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    e64 = embeddings.astype(np.float64)
    for i in range(n):
        # Same definition as the engine: float64 dot of the float32 vectors.
        sims = np.einsum("ij,ij->i", np.broadcast_to(e64[i], e64[i + 1 :].shape), e64[i + 1 :])
        for offset in np.nonzero(sims >= threshold)[0]:
            j = i + 1 + int(offset)
            if gating is not None:
                assert times is not None and centers is not None
                dt = abs(times[i] - times[j])
                dist = float(np.hypot(*(centers[i] - centers[j])))
                if np.isnan(dt):
                    continue
                near = dt < gating.near_window_s and dist < gating.max_center_dist_px
                if not (dt < gating.any_window_s or near):
                    continue
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    return [find(i) for i in range(n)]


def partition(ids: npt.ArrayLike) -> frozenset[frozenset[int]]:
    """The set of clusters, each a set of item indices."""
    groups: dict[int, set[int]] = {}
    for i, c in enumerate(np.asarray(ids).tolist()):
        groups.setdefault(c, set()).add(i)
    return frozenset(frozenset(g) for g in groups.values())
