"""Synthetic embeddings shaped like a trap's: species, individuals, crops.

Shared by the scale and oracle scripts. Real embedding spaces are structured
(look-alike species sit close together), and so is this: each crop is a noisy
copy of its individual, each individual a variation of its species.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt


def _unit(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def clustered_embeddings(
    n: int,
    dim: int = 384,
    *,
    seed: int = 0,
    mean_cluster: float = 8.0,
    species: int = 200,
    individual_spread: float = 0.9,
    crop_spread: float = 0.34,
    block: int = 100_000,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """``n`` unit float32 vectors and the individual each belongs to.

    ``crop_spread`` sets how far crops of one individual scatter: at 0.34 two
    crops of an individual have a cosine around 0.9, so many pairs sit right at
    the default threshold. Built block by block so the only large array is the
    result itself.
    """
    rng = np.random.default_rng(seed)
    n_ind = max(1, int(n / mean_cluster))
    sp = _unit(rng.standard_normal((species, dim)).astype(np.float32))
    owner = rng.integers(0, species, n_ind)
    ind = sp[owner] + individual_spread * rng.standard_normal((n_ind, dim)).astype(
        np.float32
    ) / np.sqrt(dim)
    ind = _unit(ind)
    labels = np.sort(rng.integers(0, n_ind, n)).astype(np.int64)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, block):
        stop = min(n, start + block)
        noise = rng.standard_normal((stop - start, dim)).astype(np.float32)
        out[start:stop] = ind[labels[start:stop]] + crop_spread / np.sqrt(dim) * noise
    _unit(out)
    order = rng.permutation(n)
    return out[order], labels[order]


def near_threshold_embeddings(
    n: int,
    dim: int = 384,
    *,
    seed: int = 0,
    cluster_size: int = 8,
    noise: float = 0.33,
    block: int = 100_000,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """``n`` unit float32 vectors in groups of ``cluster_size`` around random
    centres, and the group each belongs to (issue 13's held-out shape).

    Centres are N(0, 1) per dimension, unrelated to each other; each member is
    its centre plus N(0, ``noise``^2) per dimension, then L2-normalised. At
    0.33 two members of a group have a cosine of about 1 / (1 + 0.33^2) = 0.90,
    so at the default threshold 0.9 most pairs inside a group sit right at it
    and pairs of two groups near 0. Unlike :func:`clustered_embeddings` there
    is no species structure for an index to navigate by.
    """
    rng = np.random.default_rng(seed)
    n_groups = max(1, -(-n // cluster_size))
    labels = rng.permutation(np.arange(n, dtype=np.int64) // cluster_size)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n_groups, block):
        stop = min(n_groups, start + block)
        centres = rng.standard_normal((stop - start, dim)).astype(np.float32)
        rows = np.flatnonzero((labels >= start) & (labels < stop))
        out[rows] = centres[labels[rows] - start]
        out[rows] += noise * rng.standard_normal((len(rows), dim)).astype(np.float32)
    return _unit(out), labels


Generator = Callable[..., tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]]
GENERATORS: dict[str, Generator] = {"easy": clustered_embeddings, "near": near_threshold_embeddings}


def main() -> int:
    """Write a synthetic embeddings pickle for ``crop-clusterd cluster --from-embeddings``."""
    import argparse
    from pathlib import Path

    from crop_clusterd.embfile import write_embeddings_pickle

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("kind", choices=sorted(GENERATORS), help="easy: species/individuals; "
                        "near: issue 13's near-threshold groups of 8")  # fmt: skip
    parser.add_argument("out", type=Path, help="pickle to write")
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    emb, _ = GENERATORS[args.kind](args.n, args.dim, seed=args.seed)
    write_embeddings_pickle(args.out, [f"crop_{i:07d}.png" for i in range(args.n)], emb)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
