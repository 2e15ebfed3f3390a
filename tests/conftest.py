"""Shared pytest fixtures: sample data from ../shared and tiny offline models."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import structlog
from browser import BrowserPage, open_tab, start_browser

from crop_clusterd import log as log_mod

if TYPE_CHECKING:
    from playwright.sync_api import Browser

# The real sample crops live next to the repository, never inside it.
SEED_EXAMPLE = Path(__file__).resolve().parents[2] / "shared" / "seed-example"


@pytest.fixture(scope="session")
def seed_example() -> Path:
    """The ``shared/seed-example`` folder (crops/ and metadata/); skips when absent."""
    if not (SEED_EXAMPLE / "crops").is_dir():
        pytest.skip(f"seed example not present at {SEED_EXAMPLE}")
    return SEED_EXAMPLE


@pytest.fixture(scope="session")
def seed_crops(seed_example: Path) -> list[Path]:
    """The seed example's crop files, sorted by name; skips when absent or empty."""
    crops = sorted(p for p in (seed_example / "crops").iterdir() if p.is_file())
    if not crops:
        pytest.skip(f"no crops in {seed_example / 'crops'}")
    return crops


@pytest.fixture(scope="session")
def tiny_dino_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer DINOv2 (32-d) and its processor, saved locally."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("tiny-dinov2")
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,  # a 64-wide MLP; Dinov2Config has no intermediate_size parameter
        image_size=56,
        patch_size=14,
    )
    torch.manual_seed(0)
    Dinov2Model(config).save_pretrained(folder)
    BitImageProcessor(
        size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}
    ).save_pretrained(folder)
    return folder


@pytest.fixture
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Undo whatever ``configure_logging`` set up during a test."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    monkeypatch.setattr(log_mod, "_warned_no_journal", False)
    yield
    if log_mod._handler is not None:
        root.removeHandler(log_mod._handler)
        log_mod._handler = None
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("crop_clusterd").setLevel(logging.NOTSET)
    logging.captureWarnings(False)
    structlog.reset_defaults()


@pytest.fixture(scope="session")
def chromium() -> Iterator[Browser]:
    """One headless system Chromium for the whole run (tests/browser.py); skips when absent."""
    yield from start_browser()


@pytest.fixture
def page(chromium: Browser, tmp_path: Path) -> Iterator[BrowserPage]:
    """A fresh offline tab that records console errors and failed requests.

    Screenshots go to ``tmp_path``; see tests/browser.py for what it offers.
    """
    yield from open_tab(chromium, tmp_path)
