"""Tests for crop_clusterd.intake: parallel decode, ordered batches, bounded memory."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from crop_clusterd.decode import embed_crops, prepare
from crop_clusterd.embed import Embedder, EmbedderOptions, create_embedder
from crop_clusterd.images import load_rgb
from crop_clusterd.records import Crop, EmbedBatch, Prepared, Skipped


class FakeEmbedder(Embedder):
    """Embeds an image as its mean colour; records concurrency and can stall one crop.

    ``hold`` maps a colour's red value to an event the preprocess call waits for, so a
    test can force workers to finish out of order without sleeping.
    """

    name: ClassVar[str] = "fake"

    def __init__(self, options: EmbedderOptions | None = None) -> None:
        super().__init__(options or EmbedderOptions(device="cpu"))
        self.lock = threading.Lock()
        self.preprocessed = 0
        self.active = 0
        self.max_active = 0
        self.embed_calls: list[int] = []
        self.hold: dict[int, threading.Event] = {}
        self.done: dict[int, threading.Event] = {}
        self.fail_on_red: int | None = None

    def _load(self) -> None:
        self._dim = 3

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        red = -1
        try:
            pixels = np.asarray(image.resize((4, 4)), dtype=np.float32)
            red = int(pixels[0, 0, 0])
            if red == self.fail_on_red:
                raise RuntimeError("model-side bug")
            if red in self.hold:
                assert self.hold[red].wait(timeout=10), "held crop never released"
            return torch.from_numpy(pixels).permute(2, 0, 1)
        finally:
            with self.lock:
                self.active -= 1
                self.preprocessed += 1
            if red in self.done:
                self.done[red].set()

    def _features(self, batch: torch.Tensor) -> torch.Tensor:
        self.embed_calls.append(batch.shape[0])
        return batch.mean(dim=(2, 3))


def _colour(i: int) -> tuple[int, int, int]:
    return (i % 256, 255 - i % 256, 40)


def _expected(i: int) -> np.ndarray:
    v = np.asarray(_colour(i), dtype=np.float32)
    return v / np.linalg.norm(v)


def _crops(folder: Path, n: int) -> list[Crop]:
    crops = []
    for i in range(n):
        path = folder / f"crop_{i:03d}.png"
        Image.new("RGB", (6, 5), _colour(i)).save(path)
        crops.append(Crop(path=path, name=path.name))
    return crops


def _flatten(batches: list[EmbedBatch]) -> tuple[list[str], list[Skipped]]:
    names = [e.crop.name for b in batches for e in b.embedded]
    skipped = [s for b in batches for s in b.skipped]
    return names, skipped


def test_order_kept_when_workers_finish_out_of_order(tmp_path: Path) -> None:
    crops = _crops(tmp_path, 30)
    fake = FakeEmbedder()
    # Crop 0 may only finish after crop 1 has: completion order differs from input order.
    fake.hold[0] = threading.Event()
    fake.done[1] = fake.hold[0]
    batches = list(embed_crops(crops, fake, batch_size=8, workers=3))
    names, skipped = _flatten(batches)
    assert names == [c.name for c in crops]
    assert skipped == []
    assert [len(b.embedded) for b in batches] == [8, 8, 8, 6]
    assert fake.embed_calls == [8, 8, 8, 6]
    vectors = np.stack([e.vector for b in batches for e in b.embedded])
    np.testing.assert_allclose(vectors, np.stack([_expected(i) for i in range(30)]), atol=1e-6)
    assert all(e.vector.dtype == np.float32 for b in batches for e in b.embedded)


def test_bad_files_skipped_with_reasons(tmp_path: Path) -> None:
    good = _crops(tmp_path, 4)
    empty = tmp_path / "empty.png"
    empty.touch()
    text = tmp_path / "notes.png"
    text.write_text("hello")
    half = tmp_path / "half.png"
    half.write_bytes(good[0].path.read_bytes()[:-30])
    crops = [
        good[0],
        Crop(empty, "empty.png"),
        good[1],
        Crop(tmp_path / "gone.png", "gone.png"),
        Crop(text, "notes.png"),
        good[2],
        Crop(half, "half.png"),
        good[3],
    ]
    names, skipped = _flatten(list(embed_crops(crops, FakeEmbedder(), batch_size=3)))
    assert names == [c.name for c in good]
    assert skipped == [
        Skipped("empty.png", "empty file"),
        Skipped("gone.png", "vanished"),
        Skipped("notes.png", "not an image"),
        Skipped("half.png", "truncated image"),
    ]


def test_run_of_bad_files_is_flushed_in_bounded_batches(tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.touch()
    crops = [Crop(empty, f"e{i}.png") for i in range(10)]
    fake = FakeEmbedder()
    batches = list(embed_crops(crops, fake, batch_size=4))
    assert [len(b.skipped) for b in batches] == [4, 4, 2]
    assert [s.name for b in batches for s in b.skipped] == [c.name for c in crops]
    assert fake.embed_calls == []


def test_in_flight_is_bounded(tmp_path: Path) -> None:
    (crop,) = _crops(tmp_path, 1)
    pulled = 0

    def endless() -> Iterator[Crop]:
        nonlocal pulled
        for i in range(1000):
            pulled += 1
            yield Crop(crop.path, f"c{i}")

    fake = FakeEmbedder()
    batch_size, workers = 5, 2
    handed_out = 0
    for batch in embed_crops(endless(), fake, batch_size=batch_size, workers=workers):
        # Everything pulled but not yet handed out is held in memory by the intake.
        assert pulled - handed_out <= 3 * batch_size
        handed_out += len(batch.embedded)
    assert handed_out == 1000
    assert fake.max_active <= workers


def test_abandoned_run_stops_pulling_and_cancels(tmp_path: Path) -> None:
    (crop,) = _crops(tmp_path, 1)
    pulled = 0

    def endless() -> Iterator[Crop]:
        nonlocal pulled
        while True:
            pulled += 1
            yield Crop(crop.path, f"c{pulled}")

    fake = FakeEmbedder()
    run = embed_crops(endless(), fake, batch_size=4, workers=2)
    first = next(run)
    assert len(first.embedded) == 4
    run.close()
    assert pulled <= 12
    assert fake.preprocessed <= pulled
    assert fake.active == 0  # close() waited for running work and dropped the queue


def test_other_errors_propagate(tmp_path: Path) -> None:
    crops = _crops(tmp_path, 10)
    fake = FakeEmbedder()
    fake.fail_on_red = 6
    with pytest.raises(RuntimeError, match="model-side bug"):
        list(embed_crops(crops, fake, batch_size=4))


def test_empty_input_yields_nothing() -> None:
    assert list(embed_crops([], FakeEmbedder())) == []


@pytest.mark.parametrize(("batch_size", "workers"), [(0, 1), (4, 0)])
def test_rejects_nonsense_sizes(batch_size: int, workers: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        next(embed_crops([], FakeEmbedder(), batch_size=batch_size, workers=workers))


def test_prepare_uses_embedder_background_unless_given(tmp_path: Path) -> None:
    path = tmp_path / "clear.png"
    Image.new("RGBA", (4, 4), (255, 255, 255, 0)).save(path)
    crop = Crop(path, "clear.png")
    fake = FakeEmbedder(EmbedderOptions(device="cpu", background=(0, 0, 200)))
    own = prepare(crop, fake)
    assert isinstance(own, Prepared) and own.crop is crop
    assert own.tensor[:, 0, 0].tolist() == [0.0, 0.0, 200.0]
    given = prepare(crop, fake, background=(9, 8, 7))
    assert isinstance(given, Prepared)
    assert given.tensor[:, 0, 0].tolist() == [9.0, 8.0, 7.0]


def test_prepare_skips_oversized(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (50, 50)).save(path)
    result = prepare(Crop(path, "big.png"), FakeEmbedder(), max_pixels=100)
    assert result == Skipped("big.png", "too many pixels (50 x 50 > 100)")


def test_real_embedder_through_intake_matches_direct(seed_crops: list[Path]) -> None:
    lite = create_embedder("efficientnet-lite0", EmbedderOptions(device="cpu"))
    crops = [Crop(p, p.name) for p in seed_crops[:6]]
    batches = list(embed_crops(crops, lite, batch_size=4, workers=2))
    got = np.stack([e.vector for b in batches for e in b.embedded])
    direct = lite.embed(torch.stack([lite.preprocess(load_rgb(c.path)) for c in crops]))
    assert got.shape == (6, 1280)
    np.testing.assert_allclose(got, direct, atol=1e-4)
