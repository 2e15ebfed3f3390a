"""Test doubles shared by several test modules: real subclasses, not mocks."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from crop_clusterd.embed import Embedder

# Shades of one hue have cosine > 0.99 under ColourEmbedder; different hues < 0.5.
RED = ((230, 20, 20), (215, 35, 25), (240, 10, 40))
GREEN = ((20, 200, 30), (35, 220, 20), (10, 190, 45))
BLUE = ((20, 30, 220), (40, 20, 200))
YELLOW = (200, 200, 20)
# Cosine ~0.93 to the reds: linked at 0.9, not at 0.99.
ORANGE = (230, 90, 20)


class ColourEmbedder(Embedder):
    """Embeds a crop as its centred 4x4 RGB thumbnail; counts how often weights load."""

    name: ClassVar[str] = "colour-test"
    loads: ClassVar[int] = 0

    def _load(self) -> None:
        type(self).loads += 1
        self._dim = 48

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """4x4 thumbnail, 0..1 shifted to -0.5..0.5 so hue, not brightness, decides cosine."""
        pixels = np.asarray(image.convert("RGB").resize((4, 4)), dtype=np.float32) / 255.0
        return torch.from_numpy(pixels - 0.5).permute(2, 0, 1).contiguous()

    def _features(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.flatten(1)


def write_png(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (12, 10)) -> Path:
    """A solid-colour PNG crop."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)
    return path


class ProjectionEmbedder(Embedder):
    """A deterministic stand-in of any width: an 8x8 RGB thumbnail times a fixed
    random matrix (seeded by the width), ``dim`` floats per crop.

    Near-identical crops get near-identical vectors (a random projection keeps
    cosines to within a few per cent at these widths), so clusters form as they
    would with a model, at a fraction of a millisecond per crop. For benchmarks
    where what is measured is the daemon around the model, not the model. Use
    :func:`projection_embedder` for a registered class of a given width.
    """

    name: ClassVar[str] = "projection-1280"
    DIM: ClassVar[int] = 1280
    SIDE: ClassVar[int] = 8

    def _load(self) -> None:
        rng = np.random.default_rng(self.DIM)
        inputs = 3 * self.SIDE * self.SIDE
        matrix = rng.standard_normal((inputs, self.DIM)) / np.sqrt(self.DIM)
        self._matrix = torch.from_numpy(matrix.astype(np.float32)).to(self.device)
        self._dim = self.DIM

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """8x8 thumbnail, 0..1 shifted to -0.5..0.5 (as :class:`ColourEmbedder`)."""
        side = self.SIDE
        pixels = np.asarray(image.convert("RGB").resize((side, side)), dtype=np.float32) / 255.0
        return torch.from_numpy(pixels - 0.5).permute(2, 0, 1).contiguous()

    def _features(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.flatten(1) @ self._matrix


@functools.cache
def projection_embedder(dim: int) -> type[ProjectionEmbedder]:
    """The :class:`ProjectionEmbedder` of width ``dim``, named ``projection-<dim>``.

    Not registered: pass it to :func:`crop_clusterd.embed.register`. One class per
    width (cached), so registering it twice is harmless. The name
    carries the width, so a state folder made with one width refuses another.
    """
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if dim == ProjectionEmbedder.DIM:
        return ProjectionEmbedder
    attrs = {"name": f"projection-{dim}", "DIM": dim}
    return type(f"ProjectionEmbedder{dim}", (ProjectionEmbedder,), attrs)
