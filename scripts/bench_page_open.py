#!/usr/bin/env python3
"""How long a local page takes to open in headless Chromium (issue 12's 2 s check).

    python scripts/bench_page_open.py PAGE [--runs 7] [--rows 20] [--row-selector SEL]
                                           [--json FILE]

Opens PAGE (an HTML file, e.g. a session's gallery ``index.html``) ``--runs`` times,
each in a fresh browser context (empty cache, as a first open), through the system
Chromium (scripts/headless.py; network refused, as offline beside the trap). Per run
it reads, in ms from the start of navigation:

* ``load``: the Performance API's ``loadEventEnd`` (lazy images below the fold are
  not part of it, eager ones are);
* ``rows``: the first animation frame in which at least ``--rows`` elements match
  ``--row-selector`` and the last of them has a layout box (is rendered), i.e. when
  the first screen of rows can be seen. A page with fewer rows times out.

Prints each run and the medians (min, max); ``--json`` writes them too. Exit 1 when
the page logs errors or a run times out; 2 when no browser can run here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import headless

if TYPE_CHECKING:
    from playwright.sync_api import Browser

# Sets window.__rowsVisibleMs once the wanted rows are rendered; checked each frame
# from the document's start, so slow scripts and slow layout both count.
PROBE_JS = """(() => {
  const selector = %s, want = %d;
  const check = () => {
    const rows = document.querySelectorAll(selector);
    const last = rows.length >= want ? rows[want - 1] : null;
    if (last && last.getBoundingClientRect().height > 0 && last.checkVisibility()) {
      window.__rowsVisibleMs = performance.now();
    } else {
      requestAnimationFrame(check);
    }
  };
  requestAnimationFrame(check);
})();"""


@dataclass(frozen=True)
class Run:
    """One open of the page: times in ms from navigation start; ``errors`` as logged."""

    load_ms: float
    dom_content_loaded_ms: float
    rows_ms: float
    errors: list[str] = field(default_factory=list)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("page", type=Path, help="the HTML file to open")
    parser.add_argument("--runs", type=int, default=7, help="opens to time (default 7)")
    parser.add_argument(
        "--rows", type=int, default=20, help="rows that make a first screen (default 20)"
    )
    parser.add_argument(
        "--row-selector",
        default="tbody tr",
        help="CSS selector of one row (default 'tbody tr')",
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds one open may take (default 60)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.rows < 1:
        parser.error("--runs and --rows must be at least 1")
    if not args.page.is_file():
        parser.error(f"no such page: {args.page}")
    return args


def open_once(browser: Browser, args: argparse.Namespace) -> Run:
    """Open the page in a fresh context and time it; raises Playwright's TimeoutError."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    errors: list[str] = []
    blocked: list[str] = []
    context = headless.offline_context(browser, blocked)
    context.set_default_timeout(args.timeout * 1000)
    try:
        page = context.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(f"uncaught: {exc.name}: {exc.message}"))
        page.add_init_script(PROBE_JS % (json.dumps(args.row_selector), args.rows))
        page.goto(headless.file_url(args.page), wait_until="load")
        try:
            page.wait_for_function("window.__rowsVisibleMs !== undefined")
        except PlaywrightTimeoutError as exc:
            found = page.locator(args.row_selector).count()
            raise PlaywrightTimeoutError(
                f"{args.rows} rows matching {args.row_selector!r} not rendered within "
                f"{args.timeout:g} s ({found} match)"
            ) from exc
        nav = page.evaluate(
            "(() => { const n = performance.getEntriesByType('navigation')[0];"
            " return [n.loadEventEnd, n.domContentLoadedEventEnd, window.__rowsVisibleMs]; })()"
        )
        errors += [f"network refused: {url}" for url in blocked]
        return Run(float(nav[0]), float(nav[1]), float(nav[2]), errors)
    finally:
        context.close()


def summary(runs: list[Run]) -> dict[str, dict[str, float]]:
    """Median, min and max in ms of each time over the runs."""
    out: dict[str, dict[str, float]] = {}
    for key in ("load_ms", "dom_content_loaded_ms", "rows_ms"):
        values = [getattr(r, key) for r in runs]
        out[key] = {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = headless.browser_missing()
    if missing is not None:
        print(f"bench_page_open: {missing}", file=sys.stderr)
        return 2
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    runs: list[Run] = []
    with sync_playwright() as pw:
        browser = headless.launch(pw)
        try:
            for i in range(args.runs):
                run = open_once(browser, args)
                runs.append(run)
                print(
                    f"run {i + 1}: load {run.load_ms:.0f} ms, "
                    f"{args.rows} rows {run.rows_ms:.0f} ms, errors {len(run.errors)}"
                )
        except PlaywrightError as exc:
            print(f"bench_page_open: {exc}", file=sys.stderr)
            return 1
        finally:
            version = browser.version
            browser.close()
    return report(args, runs, version)


def report(args: argparse.Namespace, runs: list[Run], version: str) -> int:
    """Print the medians, write ``--json``; 1 when any run logged errors, else 0."""
    figures = summary(runs)
    for key, label in (("load_ms", "loadEventEnd"), ("rows_ms", f"first {args.rows} rows")):
        f = figures[key]
        print(
            f"{label}: median {f['median']:.0f} ms "
            f"(min {f['min']:.0f}, max {f['max']:.0f}, {len(runs)} runs)"
        )
    errors = sorted({e for r in runs for e in r.errors})
    for e in errors:
        print(f"page error: {e}", file=sys.stderr)
    if args.json is not None:
        data = {
            "page": str(args.page.resolve()),
            "chromium": version,
            "rows": args.rows,
            "row_selector": args.row_selector,
            "summary": figures,
            "runs": [asdict(r) for r in runs],
        }
        args.json.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
