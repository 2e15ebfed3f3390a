"""The k-means bucket search of a large batch (issue 13's million-crop engine)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import cosine_oracle
from test_allpairs import brute, groups

from crop_clusterd import defaults
from crop_clusterd.linking import CosineLinker, HnswParams, LinkBatch
from crop_clusterd.linking.buckets import bucket_count, bucket_pairs, plan_buckets, top_k
from crop_clusterd.linking.exact import Pairs
from crop_clusterd.linking.neighbours import bulk_costs, exact_cheaper

F32 = npt.NDArray[np.float32]
BUCKETS = HnswParams(brute_force_below=500, force_buckets=True, bucket_crops=40, bucket_probes=8)


def proposed(pairs: list[Pairs]) -> set[tuple[int, int]]:
    out: set[tuple[int, int]] = set()
    for p in pairs:
        assert np.all(p.a != p.b)
        out |= {(max(a, b), min(a, b)) for a, b in zip(p.a.tolist(), p.b.tolist(), strict=True)}
    return out


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 400),
    k=st.integers(1, 20),
    group=st.sampled_from([2, 8, 16]),
    seed=st.integers(0, 2**32 - 1),
)
def test_top_k_is_each_rows_k_largest_in_order(
    rows: int, cols: int, k: int, group: int, seed: int
) -> None:
    k = min(k, cols)
    sims = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    got = top_k(sims, k, group)
    assert got.shape == (rows, k)
    expected = -np.sort(-sims, axis=1)[:, :k]
    assert np.array_equal(np.take_along_axis(sims, got, axis=1), expected)
    assert all(len(set(row)) == k for row in got.tolist())


def test_buckets_cover_every_row_once_and_probe_other_buckets() -> None:
    emb = groups(np.random.default_rng(1), 2000, 32)
    plan = plan_buckets(emb, 2000, crops_per_bucket=50, probes=6, workers=2)
    assert plan.count == bucket_count(2000, 50) == 40
    assert sorted(plan.members.tolist()) == list(range(2000))
    for bucket in range(plan.count):
        assert np.all(plan.home[plan.rows_of(bucket)] == bucket)
    assert plan.probed.shape == (2000, 5)
    assert not np.any(plan.probed == plan.home[:, None])


class FinishingBackwards(ThreadPoolExecutor):
    """A pool whose blocks finish last first, as threads may; results still
    come back in order, as ``map`` promises."""

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], **_: Any) -> Iterator[Any]:
        calls = list(zip(*iterables, strict=True))
        done = [fn(*args) for args in reversed(calls)]
        return iter(done[::-1])


def test_the_centres_do_not_depend_on_the_order_blocks_finish_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The k-means sums are added in block order, not as workers finish: the
    same input gives the same centres bit for bit, so the same clusters, on
    any machine and with any number of workers."""
    import crop_clusterd.linking.buckets as buckets

    monkeypatch.setattr(buckets, "_ROWS", 64)
    emb = groups(np.random.default_rng(8), 3000, 32)
    with ThreadPoolExecutor(1) as pool:
        in_order = buckets.train_centres(emb, 3000, 60, 0, pool)
    with FinishingBackwards(1) as pool:
        backwards = buckets.train_centres(emb, 3000, 60, 0, pool)
    assert np.array_equal(in_order, backwards)


def test_bucket_pairs_find_every_pair_above_the_floor_on_near_threshold_groups() -> None:
    """Groups of 8 at cosine ~0.9 of each other and ~0 of the rest: no structure
    to navigate by, the case an index finds hardest."""
    emb = groups(np.random.default_rng(2), 3000, 48)
    plan = plan_buckets(emb, 3000, crops_per_bucket=40, probes=8, workers=2)
    found = proposed(list(bucket_pairs(emb, plan, 0, 0.9, workers=2)))
    expected = brute(emb, 0, 3000, 0.9)
    assert len(expected) > 3000
    assert expected <= found


def test_with_earlier_crops_only_pairs_with_a_new_crop_come() -> None:
    emb = groups(np.random.default_rng(3), 2400, 48)
    plan = plan_buckets(emb, 2400, crops_per_bucket=40, probes=8)
    found = proposed(list(bucket_pairs(emb, plan, 1600, 0.9)))
    assert all(a >= 1600 for a, _ in found)
    assert brute(emb, 1600, 2400, 0.9) <= found


def test_skipped_buckets_take_no_part() -> None:
    emb = groups(np.random.default_rng(4), 1200, 32)
    plan = plan_buckets(emb, 1200, crops_per_bucket=40, probes=6)
    skip = np.array([0, 3], dtype=np.int64)
    gone = set(np.concatenate([plan.rows_of(0), plan.rows_of(3)]).tolist())
    found = proposed(list(bucket_pairs(emb, plan, 0, 0.9, skip=skip)))
    assert not {row for pair in found for row in pair} & gone
    kept = {p for p in brute(emb, 0, 1200, 0.9) if not set(p) & gone}
    assert kept <= found


def test_a_linker_forced_to_buckets_equals_the_oracle_and_keeps_no_index() -> None:
    emb = groups(np.random.default_rng(5), 3000, 32)
    linker = CosineLinker(0.9, None, BUCKETS)
    linker.add(LinkBatch.from_embeddings(emb))
    assert linker._search.index is None
    assert linker.cluster_ids().tolist() == cosine_oracle(emb, 0.9)


@pytest.mark.parametrize("jitter", [0.0, 0.02], ids=["bit-identical", "near-duplicates"])
def test_a_stuck_insect_costs_its_size_not_its_size_squared(
    monkeypatch: pytest.MonkeyPatch, jitter: float
) -> None:
    """3,000 crops of a stuck insect: bit-identical ones fall in one bucket past
    the size limit, near-duplicates are spread by k-means over many buckets
    that are all links. Either way a leader cover settles them, so far fewer
    pairs than the 4.5 million among them are proposed, and the partition is
    the oracle's."""
    import crop_clusterd.linking.neighbours as neighbours

    monkeypatch.setattr(neighbours, "DENSE_BUCKET", 1000)
    rng = np.random.default_rng(6)
    stuck = rng.standard_normal(32) + jitter * rng.standard_normal((3000, 32))
    emb = np.vstack([groups(rng, 1000, 32), stuck / np.linalg.norm(stuck, axis=1)[:, None]])
    emb = emb[rng.permutation(len(emb))].astype(np.float32)
    linker = CosineLinker(0.9, None, BUCKETS)
    seen: list[int] = []
    confirm = linker._search.confirm

    def counting(pairs: Pairs) -> None:
        seen.append(len(pairs.a))
        confirm(pairs)

    linker._search.confirm = counting
    linker.add(LinkBatch.from_embeddings(emb))
    assert linker.cluster_ids().tolist() == cosine_oracle(emb, 0.9)
    assert sum(seen) < 20 * len(emb)


def test_exact_products_are_kept_while_they_cost_at_most_the_premium() -> None:
    exact_s, buckets_s = bulk_costs(200_000, 0, 384, 200, 16)
    assert buckets_s < exact_s <= defaults.EXACT_PREMIUM * buckets_s
    assert exact_cheaper(200_000, 0, 384)
    exact_s, buckets_s = bulk_costs(1_000_000, 0, 384, 200, 16)
    assert exact_s > defaults.EXACT_PREMIUM * buckets_s
    assert not exact_cheaper(1_000_000, 0, 384)


def test_past_the_crossover_the_first_batch_goes_to_buckets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no premium for exactness the crossover falls below 3,000 crops: the
    batch is bucketed (no index), and a micro-batch afterwards builds the index."""
    monkeypatch.setattr(defaults, "EXACT_PREMIUM", 0.0)
    emb = groups(np.random.default_rng(7), 3040, 32)
    linker = CosineLinker(0.9, None, HnswParams(brute_force_below=1000, bucket_crops=40))
    bucketed: list[range] = []
    search = linker._search
    real = search.bucket_batch

    def spy(seqs: range) -> None:
        bucketed.append(seqs)
        real(seqs)

    monkeypatch.setattr(search, "bucket_batch", spy)
    linker.add(LinkBatch.from_embeddings(emb[:3000]))
    assert bucketed == [range(0, 3000)]
    assert search.index is None
    assert linker.cluster_ids().tolist() == cosine_oracle(emb[:3000], 0.9)
    linker.add(LinkBatch.from_embeddings(emb[3000:].copy()))
    assert search.index is not None
    assert linker.cluster_ids().tolist() == cosine_oracle(emb, 0.9)
