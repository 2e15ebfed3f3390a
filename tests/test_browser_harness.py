"""The headless-Chromium harness (tests/browser.py) on a static page the test writes.

The page stands in for the gallery (issue 12): a table whose rows carry lazily loaded
PNG thumbnails, a sort button and a search box, opened from ``file://``. What is
checked is the harness: it sees the rows, waits for lazy images and reports broken
ones, catches uncaught exceptions and console errors, refuses the network, and saves
a screenshot. Skips where Playwright or the system Chromium is absent.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from browser import BrowserPage
from fakes import write_png
from PIL import Image

ROWS = 200
ROW_PX = 48  # 200 rows of 48 px: the last thumbnails are far below the fold

SCRIPT = """
const body = document.querySelector('#t tbody');
const rows = () => Array.from(body.rows);
document.getElementById('sort').onclick = () =>
  rows().sort((a, b) => b.dataset.size - a.dataset.size).forEach(r => body.appendChild(r));
document.getElementById('q').oninput = e => {
  const q = e.target.value.trim().toLowerCase();
  rows().forEach(r => { r.hidden = q !== '' && !r.dataset.name.includes(q); });
};
document.getElementById('boom').onclick = () => { throw new Error('index.json is corrupt'); };
"""


def write_page(folder: Path, sizes: list[int], extra: str = "") -> Path:
    """index.html with one row per entry of ``sizes`` and a PNG thumbnail for each."""
    rows = []
    for i, size in enumerate(sizes):
        name = f"crop_{i:04d}.png"
        write_png(folder / "thumbs" / name, ((i * 37) % 256, 90, 200 - i % 200), (40, 30))
        rows.append(
            f'<tr data-name="{name}" data-size="{size}" style="height:{ROW_PX}px">'
            f"<td>{name}</td><td>{size}</td>"
            f'<td><img loading="lazy" src="thumbs/{name}" alt="{name}"></td></tr>'
        )
    html = (
        "<!doctype html><html><head><meta charset='utf-8'><title>t</title></head><body>"
        "<button id='sort'>by size</button><input id='q' type='search'>"
        "<button id='boom'>break</button>"
        f"<table id='t'><tbody>{''.join(rows)}</tbody></table>{extra}"
        f"<script>{SCRIPT}</script></body></html>"
    )
    page = folder / "index.html"
    page.write_text(html, encoding="utf-8")
    return page


def cell_texts(page: BrowserPage, column: int) -> list[str]:
    """The text of ``column`` (0-based) in each row that is not hidden, top to bottom."""
    return page.pw.locator(f"#t tbody tr:visible td:nth-child({column + 1})").all_inner_texts()


def test_rows_lazy_images_sort_search_and_screenshot(page: BrowserPage, tmp_path: Path) -> None:
    sizes = [random.Random(12).randrange(1, 500) for _ in range(ROWS)]
    page.open(write_page(tmp_path / "site", sizes))

    assert page.pw.locator("#t tbody tr").count() == ROWS
    top = page.assert_visible_images_loaded()
    # The viewport (800 px) shows the first rows only, and their images are real PNGs.
    assert 5 <= len(top) < ROWS
    assert {i.natural_width for i in top} == {40}
    last = page.pw.locator("#t tbody tr img").last
    assert last.evaluate("img => img.naturalWidth") == 0  # lazy: not fetched yet

    page.pw.click("#sort")
    assert [int(s) for s in cell_texts(page, 1)] == sorted(sizes, reverse=True)

    page.pw.fill("#q", "crop_0042")
    assert cell_texts(page, 0) == ["crop_0042.png"]
    page.pw.fill("#q", "")
    assert len(cell_texts(page, 0)) == ROWS

    last.scroll_into_view_if_needed()
    below = page.assert_visible_images_loaded()
    assert last.evaluate("img => img.currentSrc") in {i.src for i in below}

    shot = page.screenshot()
    assert shot.parent == tmp_path
    with Image.open(shot) as img:
        assert img.format == "PNG" and img.size == (1280, 800)
    page.assert_clean()


def test_uncaught_exception_and_console_error_are_caught(page: BrowserPage, tmp_path: Path) -> None:
    page.open(write_page(tmp_path, [1, 2, 3], "<script>console.error('stale data')</script>"))
    with page.pw.expect_event("pageerror"):  # it arrives after the click has returned
        page.pw.click("#boom")

    assert page.page_errors == ["Error: index.json is corrupt"]
    assert page.console_errors == ["stale data"]
    with pytest.raises(AssertionError, match=r"uncaught: .*index\.json is corrupt"):
        page.assert_clean()


def test_missing_image_and_network_request_are_reported(page: BrowserPage, tmp_path: Path) -> None:
    extra = (
        '<img src="thumbs/gone.png" width="40" height="30">'
        '<img src="https://cdn.example.com/lib.png" width="40" height="30">'
    )
    page.open(write_page(tmp_path, [5], extra))

    with pytest.raises(AssertionError, match="2 of 3 visible images not loaded"):
        page.assert_visible_images_loaded()
    assert page.blocked == ["https://cdn.example.com/lib.png"]
    assert any("thumbs/gone.png" in r for r in page.failed_requests)
    with pytest.raises(
        AssertionError, match=re.escape("network refused: https://cdn.example.com/lib.png")
    ):
        page.assert_clean()
