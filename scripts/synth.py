"""Synthetic embeddings shaped like a trap's: species, individuals, crops.

Shared by the scale and oracle scripts. Real embedding spaces are structured
(look-alike species sit close together), and so is this: each crop is a noisy
copy of its individual, each individual a variation of its species.
"""

from __future__ import annotations

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
