"""A thin crop (issue 9, case 6): memory bounded whatever the aspect ratio.

A 6000 x 1 RGBA crop with ``-e dino`` took 4.4 GB instead of 0.6 GB: the DINOv2
processor scales the *short* side up to 256 pixels, so the long side became 1.5
million. Every embedder now turns any crop into the same bounded tensor; ``dino``
pads to a square of ``input.background`` before its processor, which also keeps an
elongated insect whole instead of centre-cropping its ends.
"""

from __future__ import annotations

import dataclasses
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_supervisor import make_config, run_daemon

from crop_clusterd.batch import BatchRequest, run_batch
from crop_clusterd.config import Config, EmbedConfig, InputConfig, OutputConfig
from crop_clusterd.csvfiles import read_clusters_csv, read_errors_csv
from crop_clusterd.embed import Embedder, EmbedderOptions, create_embedder, pad_square
from crop_clusterd.images import load_rgb

BACKGROUND = (128, 128, 128)
# Far below what the unbounded path allocates for 6000 x 1 even with the tiny
# 56-pixel processor (336,000 x 56 x 3 float32 = 226 MB), far above a square crop's.
PEAK_BOUND = 8 * 2**20
THIN = [(6000, 1), (1, 6000), (40000, 1), (3000, 7)]


def rgba_file(folder: Path, size: tuple[int, int], name: str) -> Path:
    """An RGBA PNG of ``size``, an opaque bar on a transparent ground."""
    rng = np.random.default_rng(size[0] * 7 + size[1])
    pixels = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    pixels[..., 3] = 255
    path = folder / name
    Image.fromarray(pixels, "RGBA").save(path)
    return path


def preprocess_peak(embedder: Embedder, image: Image.Image) -> tuple[torch.Tensor, int]:
    """The tensor and the peak of Python-tracked allocations (numpy, torch.from_numpy)."""
    tracemalloc.start()
    try:
        tensor = embedder.preprocess(image)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return tensor, peak


def embedders(tiny_dino_dir: Path) -> dict[str, Embedder]:
    return {
        "dino": create_embedder("dino", EmbedderOptions(model=str(tiny_dino_dir), device="cpu")),
        "efficientnet-lite0": create_embedder("efficientnet-lite0", EmbedderOptions(device="cpu")),
        "hierarchical": create_embedder("hierarchical", EmbedderOptions(device="cpu")),
    }


@pytest.mark.parametrize("name", ["dino", "efficientnet-lite0", "hierarchical"])
@pytest.mark.parametrize("size", THIN, ids=[f"{w}x{h}" for w, h in THIN])
def test_thin_crop_gives_the_square_crops_tensor_in_bounded_memory(
    tmp_path: Path, tiny_dino_dir: Path, name: str, size: tuple[int, int]
) -> None:
    embedder = embedders(tiny_dino_dir)[name]
    if name == "dino":
        embedder.load()  # loading the weights is not what is measured
    square = load_rgb(rgba_file(tmp_path, (64, 64), "square.png"), background=BACKGROUND)
    thin = load_rgb(rgba_file(tmp_path, size, "thin.png"), background=BACKGROUND)
    expected, square_peak = preprocess_peak(embedder, square)
    tensor, peak = preprocess_peak(embedder, thin)
    assert tensor.shape == expected.shape and tensor.dtype == torch.float32
    assert torch.isfinite(tensor).all()
    assert peak < PEAK_BOUND, f"{name} {size}: peak {peak} bytes"
    assert peak < 4 * square_peak + 2**20, (peak, square_peak)


def test_pad_square_bounds_the_side_and_keeps_the_aspect_ratio() -> None:
    bar = Image.new("RGB", (6000, 300), (255, 0, 0))
    square = pad_square(bar, BACKGROUND, 256)
    assert square.size == (256, 256)
    assert square.getpixel((128, 0)) == BACKGROUND and square.getpixel((128, 128)) == (255, 0, 0)
    small = pad_square(Image.new("RGB", (30, 10), (0, 0, 255)), BACKGROUND, 256)
    assert small.size == (30, 30)  # never scaled up: the processor does its own resize
    assert small.getpixel((15, 0)) == BACKGROUND and small.getpixel((15, 15)) == (0, 0, 255)


def test_dino_keeps_an_elongated_insect_whole(tiny_dino_dir: Path) -> None:
    dino = create_embedder(
        "dino", EmbedderOptions(model=str(tiny_dino_dir), device="cpu", background=(0, 0, 0))
    )
    # A white bar whose two ends are red: a centre crop of the short-side resize
    # (the processor alone) would keep only the white middle.
    bar = Image.new("RGB", (400, 40), (255, 255, 255))
    bar.paste((255, 0, 0), (0, 0, 40, 40))
    bar.paste((255, 0, 0), (360, 0, 400, 40))
    tensor = dino.preprocess(bar)
    black = dino.preprocess(Image.new("RGB", (10, 10), (0, 0, 0)))
    middle_row = tensor[:, tensor.shape[1] // 2, :]
    green = middle_row[1]
    # Both red ends survive (low green at the left and right edges) ...
    assert green[1] < green[tensor.shape[2] // 2] and green[-2] < green[tensor.shape[2] // 2]
    # ... and above the bar is the background colour, not more insect.
    torch.testing.assert_close(tensor[:, 1, :], black[:, 1, :])


def test_batch_with_thin_crops_and_dino_clusters_every_crop(
    tmp_path: Path, tiny_dino_dir: Path
) -> None:
    crops = tmp_path / "crops"
    crops.mkdir()
    names = [rgba_file(crops, (30 + i, 50), f"ordinary_{i}.png").name for i in range(4)]
    names += [rgba_file(crops, (w, h), f"thin_{w}x{h}.png").name for (w, h) in THIN[:2]]
    config = Config(
        input=InputConfig(workers=1),
        embed=EmbedConfig(
            model="dino", from_pretrained=str(tiny_dino_dir), device="cpu", batch_size=4
        ),
        output=OutputConfig(folder=tmp_path / "out"),
    )
    run_batch(BatchRequest(config, inputs=(str(crops),)))
    rows = read_clusters_csv(tmp_path / "out" / "clusters.csv")
    assert sorted(Path(n).name for n, _ in rows) == sorted(names)
    errors = tmp_path / "out" / "errors.csv"
    assert not errors.exists() or read_errors_csv(errors) == []


def test_daemon_with_thin_crops_and_dino_clusters_every_crop(
    tmp_path: Path, tiny_dino_dir: Path
) -> None:
    watch = tmp_path / "watch"
    frame = watch / "20240701220000"
    frame.mkdir(parents=True)
    sizes = [(30, 50), (50, 30), (40, 40), *THIN[:2]]
    names = [
        rgba_file(frame, size, f"crop_20240701220000_CROPNUMBER_{i}_UUID_T.png").name
        for i, size in enumerate(sizes)
    ]
    base = make_config(tmp_path, watch, "cosine")
    config = dataclasses.replace(
        base,
        embed=dataclasses.replace(
            base.embed, model="dino", from_pretrained=str(tiny_dino_dir), device="cpu"
        ),
    )
    summary = run_daemon(config)
    assert summary.crops == len(names) and summary.skipped == 0
    rows = read_clusters_csv(config.output.folder / "clusters.csv")
    assert sorted(Path(n).name for n, _ in rows) == sorted(names)
