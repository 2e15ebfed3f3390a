"""Bit-identical crops through the ungated index path (hnswlib issue #263):
each group enters the index once and the partition stays the oracle's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from oracles import cosine_oracle, partition
from test_link import batch_of, clustered, feed, stored, sub

from crop_clusterd.linking import CosineLinker, HnswParams

PARAMS = HnswParams(brute_force_below=0, chunk=200)


def with_copies(seed: int, n: int, stuck: int) -> tuple[npt.NDArray[np.float32], np.ndarray]:
    """Ordinary crops plus ``stuck`` bit-identical copies of one of them and a
    few smaller groups of copies, shuffled; returns (embeddings, stuck rows)."""
    rng = np.random.default_rng(seed)
    ordinary = clustered(rng, n, 16, 60, 0.2)
    copies = np.vstack(
        [np.repeat(ordinary[:1], stuck, axis=0), np.repeat(ordinary[1:4], 20, axis=0)]
    )
    order = rng.permutation(n + len(copies))
    emb = np.ascontiguousarray(np.vstack([ordinary, copies])[order])
    stuck_rows = np.flatnonzero((order == 0) | ((order >= n) & (order < n + stuck)))
    return emb, stuck_rows


@pytest.mark.parametrize("cuts", [[], [300, 900, 901, 1500], list(range(50, 2000, 50))])
def test_bit_identical_group_equals_the_oracle_fed_whole_and_in_micro_batches(
    cuts: list[int],
) -> None:
    emb, stuck_rows = with_copies(3, 1000, 900)
    linker = CosineLinker(0.9, None, PARAMS)
    feed(linker, batch_of(emb), cuts)
    ids = linker.cluster_ids().tolist()
    assert ids == cosine_oracle(emb, 0.9)
    assert len({ids[i] for i in stuck_rows}) == 1
    # Each group of copies is indexed once.
    index = linker._search.index
    assert index is not None
    assert index.get_current_count() == len(np.unique(emb, axis=0))


def test_copies_are_not_merged_when_a_vector_does_not_reach_the_threshold_with_itself() -> None:
    """Zero rows have cosine 0 with themselves: copies of them stay apart."""
    emb, _ = with_copies(4, 200, 50)
    emb[10:20] = 0.0
    linker = CosineLinker(0.9, None, PARAMS)
    feed(linker, batch_of(emb), [15, 100])
    assert linker.cluster_ids().tolist() == cosine_oracle(emb, 0.9)


@pytest.mark.parametrize("retire_rep", [False, True])
def test_restored_linker_with_copies_goes_on_like_one_that_never_stopped(
    tmp_path: Path, retire_rep: bool
) -> None:
    emb, stuck_rows = with_copies(5, 1000, 600)
    whole = batch_of(emb)
    before = CosineLinker(0.9, None, PARAMS)
    for lo in range(0, 1000, 100):
        before.add(sub(whole, lo, lo + 100))
    retired = stuck_rows[:1] if retire_rep else stuck_rows[:0]
    before.retire(retired)
    index_file = tmp_path / "index.hnsw"
    covers = before.save(index_file)
    assert covers == 1000
    restored = CosineLinker(0.9, None, PARAMS)
    state = stored(sub(whole, 0, 1000), before.cluster_ids(), index_file, covers)
    assert restored.restore(state), "the saved index must be used"
    restored.retire(retired)
    for lo in range(1000, len(emb), 100):
        restored.add(sub(whole, lo, lo + 100))
        before.add(sub(whole, lo, lo + 100))
    assert np.array_equal(restored.cluster_ids(), before.cluster_ids())
    if not retire_rep:
        assert partition(restored.cluster_ids()) == partition(cosine_oracle(emb, 0.9))
    # A restart that rebuilds the index (no file) agrees as well.
    rebuilt = CosineLinker(0.9, None, PARAMS)
    assert not rebuilt.restore(stored(sub(whole, 0, 1000), before.cluster_ids()[:1000]))
    rebuilt.retire(retired)
    for lo in range(1000, len(emb), 100):
        rebuilt.add(sub(whole, lo, lo + 100))
    assert np.array_equal(rebuilt.cluster_ids(), before.cluster_ids())


def test_a_retired_representative_hands_over_to_a_live_copy() -> None:
    """New crops near a group of copies whose representative was retired still
    link to the live copies (nothing else is near them), and so does a new copy."""
    rng = np.random.default_rng(6)
    base = clustered(rng, 300, 16, 30, 0.2)
    v = rng.standard_normal(16).astype(np.float32)
    v /= np.linalg.norm(v)
    assert np.max(base.astype(np.float64) @ v) < 0.9
    emb = np.vstack([base, np.repeat(v[None], 5, axis=0)])
    linker = CosineLinker(0.95, None, PARAMS)
    linker.add(batch_of(emb))
    linker.retire(np.array([300]))
    near = v + 0.03 * rng.standard_normal(16).astype(np.float32)
    near /= np.linalg.norm(near)
    assert float(near.astype(np.float64) @ v) >= 0.96
    linker.add(batch_of(np.vstack([near[None], v[None]]).astype(np.float32), None, None))
    ids = linker.cluster_ids()
    n = len(emb)
    assert ids[n] == ids[n + 1] == ids[301] == 300
