"""The blocked exact all-pairs search and the cost model that picks it (issue 13)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import cosine_oracle

from crop_clusterd.linking import CosineLinker, HnswParams, LinkBatch
from crop_clusterd.linking.allpairs import earlier_pairs, head_of, principal_head
from crop_clusterd.linking.neighbours import exact_cheaper

F32 = npt.NDArray[np.float32]


def groups(rng: np.random.Generator, n: int, dim: int, size: int = 8, noise: float = 0.33) -> F32:
    """Issue 13's near-threshold shape: groups of ``size`` around random centres."""
    centres = rng.standard_normal((-(-n // size), dim))
    x = centres[rng.permutation(n) // size] + noise * rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def brute(emb: F32, start: int, stop: int, floor: float) -> set[tuple[int, int]]:
    """Every (i, j), start <= i < stop, j < i, with a float64 cosine >= floor."""
    e64 = emb.astype(np.float64)
    sims = e64[start:stop] @ e64[:stop].T
    i, j = np.nonzero(sims >= floor)
    i += start
    return {(a, b) for a, b in zip(i.tolist(), j.tolist(), strict=True) if b < a}


def found(emb: F32, start: int, stop: int, floor: float, **kw: object) -> set[tuple[int, int]]:
    out: set[tuple[int, int]] = set()
    for pairs in earlier_pairs(emb, start, stop, floor, **kw):  # type: ignore[arg-type]
        assert np.all(pairs.b < pairs.a)
        out |= set(zip(pairs.a.tolist(), pairs.b.tolist(), strict=True))
    return out


def random_basis(rng: np.random.Generator, dim: int, k: int) -> tuple[F32, F32]:
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    basis = q.astype(np.float32)
    return basis[:, :k], basis[:, k:]


def same_up_to_rounding(got: set[tuple[int, int]], emb: F32, start: int, stop: int) -> None:
    """``got`` holds every pair clearly above the floor and none clearly below."""
    floor = 0.9
    assert brute(emb, start, stop, floor + 1e-5) <= got
    assert got <= brute(emb, start, stop, floor - 1e-5)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("start", [0, 333])
def test_tiles_find_every_pair_once(start: int, workers: int) -> None:
    """Tiles smaller than the batch, a batch after earlier crops, one or two threads."""
    emb = groups(np.random.default_rng(1), 900, 48)
    got = found(emb, start, 900, 0.9, side=128, workers=workers)
    assert len(got) > 300, "the data must hold many pairs"
    same_up_to_rounding(got, emb, start, 900)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(1, 47), noise=st.sampled_from([0.1, 0.33, 0.6]))
def test_the_bound_drops_no_pair_whatever_the_basis(seed: int, k: int, noise: float) -> None:
    """Any orthonormal basis and head width: the bounded search is still exact."""
    rng = np.random.default_rng(seed)
    emb = groups(rng, 400, 48, noise=noise)
    head = head_of(emb, 400, *random_basis(rng, 48, k))
    got = found(emb, 0, 400, 0.9, head=head, side=96, workers=1)
    same_up_to_rounding(got, emb, 0, 400)


def test_the_bound_is_above_every_product() -> None:
    """[head, |t|^2/2, 1] . [head, 1, |t|^2/2] >= x . y for every pair (Cauchy-Schwarz, AM-GM)."""
    rng = np.random.default_rng(5)
    emb = groups(rng, 300, 64)
    head = head_of(emb, 300, *random_basis(rng, 64, 16))
    bound = head.left @ head.right.T
    assert np.all(bound >= emb @ emb.T - 1e-5)


def test_principal_head_is_narrow_on_large_near_threshold_data() -> None:
    """On data with no pair between groups the bound pays: a head much narrower
    than the vectors is chosen, and the search through it is exact."""
    emb = groups(np.random.default_rng(2), 12_000, 384)
    head = principal_head(emb, 12_000, 0.9)
    assert head is not None and head.left.shape[1] - 2 <= 192
    got = found(emb, 9_000, 12_000, 0.9, head=head, workers=2)
    same_up_to_rounding(got, emb, 9_000, 12_000)


def test_principal_head_declines_tiny_or_narrow_batches() -> None:
    emb = groups(np.random.default_rng(3), 500, 32)
    assert principal_head(emb, 500, 0.9) is None
    assert principal_head(emb, 1, 0.9) is None


def test_cost_model_picks_exact_for_small_batches_and_buckets_for_huge_ones() -> None:
    assert exact_cheaper(10_000, 0, 384)
    assert not exact_cheaper(10_000_000, 0, 384)
    # Monotone: once buckets win, they win for every larger batch.
    sizes = [2**p for p in range(10, 25)]
    picks = [exact_cheaper(n, 0, 384) for n in sizes]
    assert picks == sorted(picks, reverse=True)


def test_a_large_first_batch_is_searched_exactly_and_equals_the_oracle() -> None:
    """Past brute_force_below, a batch the model prices cheaper exact keeps no index;
    the next micro-batch builds it (in locality order) and still equals the oracle."""
    emb = groups(np.random.default_rng(4), 3040, 32)
    linker = CosineLinker(0.9, None, HnswParams(brute_force_below=1000, chunk=200))
    linker.add(LinkBatch.from_embeddings(emb[:3000]))
    assert linker._search.index is None
    assert linker.cluster_ids().tolist() == cosine_oracle(emb[:3000], 0.9)
    # A micro-batch afterwards builds the index: it serves every later batch.
    linker.add(LinkBatch.from_embeddings(emb[3000:].copy()))
    assert linker._search.index is not None
    assert linker._search.index.get_current_count() == 3040
    assert linker.cluster_ids().tolist() == cosine_oracle(emb, 0.9)


def test_brute_force_below_zero_still_forces_the_index() -> None:
    emb = groups(np.random.default_rng(6), 600, 32)
    linker = CosineLinker(0.9, None, HnswParams(brute_force_below=0))
    linker.add(LinkBatch.from_embeddings(emb))
    assert linker._search.index is not None
    assert linker.cluster_ids().tolist() == cosine_oracle(emb, 0.9)
