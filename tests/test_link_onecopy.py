"""One copy of each vector within a session (issue 10): the mapped columns.

An ungated cosine linker told to map its vectors keeps them in a file mapping,
so the HNSW index holds the only in-memory copy; the partition must not change.
"""

from __future__ import annotations

import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from oracles import cosine_oracle, partition
from test_link import SEARCHES, clustered, feed, scenes, stored, sub

from crop_clusterd.linking import (
    CosineLinker,
    Gating,
    HnswParams,
    LinkBatch,
    TrackLinker,
)


def _held_bytes(linker: CosineLinker, batches: list[LinkBatch]) -> int:
    """Bytes of vectors and columns the linker holds after taking ``batches``:
    numpy's traced allocations (the columns) plus the index's float32 copies
    (hnswlib allocates outside tracemalloc's sight)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for batch in batches:
            linker.add(batch)
        traced = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    index = linker._search.index
    assert index is not None, "the test needs the index path"
    return traced + int(index.get_current_count()) * int(index.dim) * 4


def test_a_mapped_cosine_linker_holds_each_vector_once(tmp_path: Path) -> None:
    n, dim, step = 6000, 384, 200
    rng = np.random.default_rng(11)
    emb = clustered(rng, n, dim, 300, 0.5)
    # Micro-batches as the daemon sends them (each a fresh array the caller drops).
    parts = [LinkBatch.from_embeddings(emb[lo : lo + step].copy()) for lo in range(0, n, step)]
    raw = n * dim * 4
    params = HnswParams(brute_force_below=1000)

    mapped = CosineLinker(0.9, None, params)
    assert mapped.map_vectors(tmp_path)
    held = _held_bytes(mapped, parts)
    plain = CosineLinker(0.9, None, params)
    in_memory = _held_bytes(plain, parts)

    # One copy (the index's) plus the small columns (times, centres, traps,
    # union-find, duplicate map: about 15% of a 384-d vector).
    assert held < 1.3 * raw
    # The bound means something: columns in memory are a second copy.
    assert in_memory > 2 * raw
    assert np.array_equal(mapped.embeddings, emb)
    assert np.array_equal(mapped.cluster_ids(), plain.cluster_ids())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scene=scenes())
def test_mapped_incremental_equals_batch_and_the_oracle(
    scene: tuple[LinkBatch, float, list[int]],
) -> None:
    batch, threshold, cuts = scene
    expected = cosine_oracle(batch.embeddings, threshold, batch.times, batch.centers, None)
    for search in sorted(SEARCHES):
        with tempfile.TemporaryDirectory() as folder:
            whole = CosineLinker(threshold, None, SEARCHES[search])
            assert whole.map_vectors(Path(folder))
            whole.add(batch)
            pieces = CosineLinker(threshold, None, SEARCHES[search])
            assert pieces.map_vectors(Path(folder))
            feed(pieces, batch, cuts)
            assert whole.cluster_ids().tolist() == expected
            assert pieces.cluster_ids().tolist() == expected
            assert np.array_equal(pieces.embeddings, batch.embeddings)


def test_growth_remaps_without_breaking_views_held_before(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    emb = clustered(rng, 5000, 8, 50, 0.1)
    linker = CosineLinker(0.95, None, HnswParams(brute_force_below=0))
    linker.add(LinkBatch.from_embeddings(emb[:10].copy()))
    # Rows held before mapping move into the map.
    assert linker.map_vectors(tmp_path)
    early = linker.embeddings
    for lo in range(10, 5000, 700):
        linker.add(LinkBatch.from_embeddings(emb[lo : lo + 700].copy()))
    assert np.array_equal(early, emb[:10])
    assert np.array_equal(linker.embeddings, emb)
    # The file is unnamed: nothing is left in the folder, even after a crash.
    assert list(tmp_path.iterdir()) == []
    expected = cosine_oracle(emb, 0.95)
    assert partition(linker.cluster_ids()) == partition(expected)


def test_a_mapped_linker_restores_saves_and_retires_like_one_in_memory(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    emb = clustered(rng, 600, 16, 40, 0.15)
    whole = LinkBatch.from_embeddings(emb)
    params = HnswParams(brute_force_below=0, k_start=4)
    live = CosineLinker(0.95, None, params)
    assert live.map_vectors(tmp_path)
    for lo in range(0, 400, 50):
        live.add(sub(whole, lo, lo + 50))
    index_file = tmp_path / "index.hnsw"
    covers = live.save(index_file)
    assert covers == 400

    restored = CosineLinker(0.95, None, params)
    assert restored.map_vectors(tmp_path)
    assert restored.restore(stored(sub(whole, 0, 400), live.cluster_ids(), index_file, covers))
    plain = CosineLinker(0.95, None, params)
    assert plain.restore(stored(sub(whole, 0, 400), live.cluster_ids(), index_file, covers))
    for linker in (live, restored, plain):
        linker.retire(np.array([3, 250]))
        for lo in range(400, 600, 50):
            linker.add(sub(whole, lo, lo + 50))
    assert np.array_equal(restored.cluster_ids(), plain.cluster_ids())
    assert np.array_equal(restored.cluster_ids(), live.cluster_ids())
    assert not restored.embeddings[[3, 250]].any()
    assert np.array_equal(restored.embeddings[4:250], emb[4:250])


@pytest.mark.parametrize(
    "linker",
    [CosineLinker(0.9, Gating()), TrackLinker(0.9)],
    ids=["gated", "track"],
)
def test_linkers_without_an_index_keep_their_columns(
    tmp_path: Path, linker: CosineLinker | TrackLinker
) -> None:
    assert not linker.map_vectors(tmp_path)
    assert list(tmp_path.iterdir()) == []
