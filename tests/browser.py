"""A real headless Chromium for page tests (issue 12): what the ``page`` fixture gives.

The fixtures themselves are in ``conftest.py`` (``chromium``: one browser per test
session; ``page``: a fresh offline context and tab per test). They skip, with the
reason, where Playwright or the system Chromium is absent. Pages are opened from
``file://`` only and every network request is refused and recorded: the gallery must
work offline. The launch itself is ``scripts/headless.py``, shared with
``scripts/bench_page_open.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1] / "scripts"))
import headless  # scripts/headless.py, through the sys.path line above

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Page, Request

# Playwright waits this long (ms) before failing a wait; its own default is 30 s.
DEFAULT_TIMEOUT_MS = 10_000

# Images whose box meets the viewport and that are not hidden; a lazy image that has
# not loaded yet may have no size, so its position counts, not its area.
_VISIBLE_IMAGES_JS = """() => Array.from(document.images).filter(img => {
    const r = img.getBoundingClientRect();
    return img.checkVisibility({visibilityProperty: true, opacityProperty: false})
        && r.bottom >= 0 && r.right >= 0 && r.top <= innerHeight && r.left <= innerWidth;
})"""


@dataclass(frozen=True)
class ImageState:
    """One ``<img>`` in the viewport: its URL, natural width in pixels (0: not decoded)."""

    src: str
    natural_width: int


@dataclass
class BrowserPage:
    """A Playwright tab plus everything that went wrong in it.

    ``console_errors``: console messages of type error (including Chromium's own
    "Failed to load resource"); ``page_errors``: uncaught exceptions; ``failed_requests``:
    "URL (reason)" for each request that failed; ``blocked``: network URLs refused.
    """

    pw: Page
    shots: Path
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pw.on("console", self._on_console)
        self.pw.on("pageerror", lambda exc: self.page_errors.append(f"{exc.name}: {exc.message}"))
        self.pw.on("requestfailed", self._on_request_failed)

    def _on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.console_errors.append(message.text)

    def _on_request_failed(self, request: Request) -> None:
        self.failed_requests.append(f"{request.url} ({request.failure})")

    def open(self, path: Path) -> None:
        """Open a local file as ``file://`` and wait for its load event."""
        self.pw.goto(headless.file_url(path), wait_until="load")

    def problems(self) -> list[str]:
        """Every error seen so far, one line each, prefixed by its kind."""
        return (
            [f"console: {m}" for m in self.console_errors]
            + [f"uncaught: {m}" for m in self.page_errors]
            + [f"request failed: {m}" for m in self.failed_requests]
            + [f"network refused: {u}" for u in self.blocked]
        )

    def assert_clean(self) -> None:
        """Fail the test, listing them, when any console error or failed request occurred."""
        problems = self.problems()
        assert not problems, "page problems:\n" + "\n".join(problems)

    def visible_images(self) -> list[ImageState]:
        """The images now in the viewport, once each has finished loading or failed.

        Raises Playwright's TimeoutError when some are still loading after
        ``DEFAULT_TIMEOUT_MS``.
        """
        self.pw.wait_for_function(f"({_VISIBLE_IMAGES_JS})().every(img => img.complete)")
        found: list[dict[str, Any]] = self.pw.evaluate(
            f"({_VISIBLE_IMAGES_JS})().map(img => "
            "({src: img.currentSrc || img.src, width: img.naturalWidth}))"
        )
        return [ImageState(str(i["src"]), int(i["width"])) for i in found]

    def assert_visible_images_loaded(self) -> list[ImageState]:
        """Fail unless every image in the viewport decoded (natural width > 0); returns them."""
        images = self.visible_images()
        broken = [i.src for i in images if i.natural_width <= 0]
        assert not broken, f"{len(broken)} of {len(images)} visible images not loaded: {broken}"
        return images

    def screenshot(self, name: str = "page.png", full_page: bool = False) -> Path:
        """Save a PNG screenshot under the test's temporary folder and return its path."""
        path = self.shots / name
        self.pw.screenshot(path=str(path), full_page=full_page)
        return path


def start_browser() -> Iterator[Browser]:
    """Yield a launched headless Chromium and close it after; skips when there is none."""
    reason = headless.browser_missing()
    if reason is not None:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = headless.launch(pw)
        try:
            yield browser
        finally:
            browser.close()


def open_tab(browser: Browser, shots: Path) -> Iterator[BrowserPage]:
    """Yield a :class:`BrowserPage` in a fresh offline context; closes the context after."""
    blocked: list[str] = []
    context = headless.offline_context(browser, blocked)
    context.set_default_timeout(DEFAULT_TIMEOUT_MS)
    try:
        yield BrowserPage(context.new_page(), shots, blocked=blocked)
    finally:
        context.close()
