"""The gallery page in a real headless Chromium (issue 12).

Needs Debian's ``chromium`` and the ``playwright`` package (only its driver: the
browser is the system's); skipped with the reason when either is missing.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes import ColourEmbedder

from crop_clusterd import cli
from crop_clusterd import defaults as engine_defaults
from crop_clusterd.csvfiles import read_clusters_csv
from crop_clusterd.embed import register, unregister
from crop_clusterd.gallery import INDEX_HTML
from crop_clusterd.simulate import SimConfig, simulate

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
sync_api: Any = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
)
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)"),
    pytest.mark.usefixtures("restore_logging"),
]


@pytest.fixture
def out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A batch output folder with its gallery: a simulated session, colour embedder."""
    register(ColourEmbedder)
    monkeypatch.setattr(
        engine_defaults, "EMBEDDER_NAMES", (*engine_defaults.EMBEDDER_NAMES, ColourEmbedder.name)
    )
    root = tmp_path / "session"
    simulate(SimConfig(seed=5, frames=8, mean_present=6, behaviour="classic"), root)
    folder = tmp_path / "out"
    args = ["-i", str(root), "--recursive", "-o", str(folder), "-e", ColourEmbedder.name]
    args += ["-mf", str(root)]  # flat-bug's metadata: the box tracks
    assert cli.main(["cluster", *args, "-th", "0.95", "--gallery", "--log-level", "error"]) == 0
    yield folder
    unregister(ColourEmbedder.name)


def visible_images_loaded(page: Any) -> tuple[int, int]:
    """(images in the viewport, of which loaded with a natural width > 0)."""
    result: list[int] = page.evaluate(
        """() => {
          const seen = Array.from(document.images).filter(i => {
            const r = i.getBoundingClientRect();
            return r.bottom > 0 && r.top < innerHeight && r.width > 0;
          });
          return [seen.length, seen.filter(i => i.complete && i.naturalWidth > 0).length];
        }"""
    )
    return result[0], result[1]


def test_the_page_in_chromium(out: Path, tmp_path: Path, chromium: Any) -> None:
    rows = read_clusters_csv(out / "clusters.csv")
    sizes = Counter(c for _, c in rows)
    errors: list[str] = []
    # The run's one Chromium (conftest): a second sync Playwright would clash with it.
    page = chromium.new_page(viewport={"width": 1200, "height": 900})
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((out / INDEX_HTML).as_uri())
    page.wait_for_selector("body[data-ready='1']", timeout=10_000)
    page.wait_for_load_state("networkidle")
    page.evaluate("() => window.galleryShowAll()")
    assert page.locator("section.row").count() == len(sizes)
    # Each cluster's box track: one point per crop, in a frame-sized view box.
    points = page.eval_on_selector_all(
        "section.row",
        "rs => rs.map(r => r.querySelector('svg.track polyline')"
        " ?.getAttribute('points').split(' ').length ?? 0)",
    )
    assert points == page.eval_on_selector_all("section.row", "rs => rs.map(r => +r.dataset.size)")
    page.evaluate("() => window.scrollTo(0, 0)")
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(300)
    seen, loaded = visible_images_loaded(page)
    assert seen > 1 and loaded == seen, "every visible thumbnail (and the plot) loaded"
    page.screenshot(path=str(tmp_path / "gallery.png"))

    shown = page.eval_on_selector_all("section.row", "rs => rs.map(r => +r.dataset.size)")
    assert shown == sorted(shown, key=lambda n: (n == 1, -n)), "by size, singletons last"
    page.select_option("#sort", "first")
    firsts = page.eval_on_selector_all(
        "section.row:not(.singleton)", "rs => rs.map(r => r.dataset.first)"
    )
    assert firsts == sorted(firsts)
    page.fill("#minsize", "2")
    page.dispatch_event("#minsize", "input")
    assert page.locator("section.row").count() == sum(n >= 2 for n in sizes.values())

    name, cluster = next((n, c) for n, c in rows if sizes[c] == 1)
    page.fill("#search", Path(name).name)
    page.press("#search", "Enter")
    assert page.get_attribute("body", "data-found") == str(cluster)
    assert page.locator(f"#c{cluster}.hit").count() == 1
    page.close()
    assert errors == []
