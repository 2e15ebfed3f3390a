"""Headless Chromium through Playwright, pointed at the system browser (issue 12).

Shared by the browser tests (``tests/browser.py``) and ``scripts/bench_page_open.py``.
Playwright's own browser download (``playwright install``) is never used: CI and the
project machines have Debian's ``chromium`` package (``.ci/run`` installs it), and the
pages under test are opened from ``file://`` with every network request refused, since
the gallery must work offline.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Playwright, Route

# An explicit browser for machines where it is not on PATH as one of CANDIDATES.
CHROMIUM_ENV = "CROP_CLUSTERD_CHROMIUM"
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Anything but file:, data: and blob: would be the network; the route aborts it.
NETWORK_URL = re.compile(r"^(https?|wss?|ftp)://", re.IGNORECASE)
# Containers often give /dev/shm 64 MiB, which crashes Chromium's renderers.
LAUNCH_ARGS = ("--disable-dev-shm-usage",)


def find_chromium() -> Path | None:
    """The system Chromium executable: ``$CROP_CLUSTERD_CHROMIUM`` or the first on PATH.

    Returns None when there is none (the variable, when set, must name an executable).
    """
    explicit = os.environ.get(CHROMIUM_ENV)
    if explicit:
        path = Path(explicit)
        return path if path.is_file() and os.access(path, os.X_OK) else None
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return Path(found)
    return None


def playwright_missing() -> str | None:
    """Why Playwright cannot drive a browser here, or None when it can be imported."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        return f"playwright is not installed ({exc}); pip install -e '.[dev]'"
    return None


def browser_missing() -> str | None:
    """Why no headless browser can run here (for a skip reason), or None when one can."""
    reason = playwright_missing()
    if reason is not None:
        return reason
    if find_chromium() is None:
        explicit = os.environ.get(CHROMIUM_ENV)
        if explicit:
            return f"{CHROMIUM_ENV}={explicit} is not an executable file"
        return f"no {'/'.join(CANDIDATES)} on PATH; apt-get install chromium (.ci/run does)"
    return None


def launch(pw: Playwright, executable: Path | None = None) -> Browser:
    """Launch headless Chromium from ``executable`` (default: :func:`find_chromium`).

    Root cannot use Chromium's sandbox (it refuses to start), so the sandbox is on only
    for other users. Raises FileNotFoundError when no Chromium is found, and
    Playwright's Error when the browser does not start.
    """
    exe = executable or find_chromium()
    if exe is None:
        raise FileNotFoundError(browser_missing() or "no Chromium found")
    return pw.chromium.launch(
        executable_path=str(exe),
        headless=True,
        chromium_sandbox=os.geteuid() != 0,
        args=list(LAUNCH_ARGS),
    )


def offline_context(
    browser: Browser, blocked: list[str], viewport: tuple[int, int] = (1280, 800)
) -> BrowserContext:
    """A fresh context (own cache and storage) whose network requests are aborted.

    Each refused URL is appended to ``blocked``, so a page that reaches for a CDN
    fails its test instead of passing on a machine that happens to be online.
    ``viewport`` is width, height in CSS pixels.
    """
    context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})

    def refuse(route: Route) -> None:
        blocked.append(route.request.url)
        route.abort("internetdisconnected")

    context.route(NETWORK_URL, refuse)
    return context


def file_url(path: Path) -> str:
    """The ``file://`` URL of a local file (made absolute first)."""
    return path.resolve().as_uri()
