"""scripts/bench_page_open.py on a small page, so the open-time figure does not rot.

It runs the real script against the system Chromium; what is checked is that its
figures are consistent and that it fails on a broken page, not any speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import headless
import pytest
from test_browser_harness import write_page

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_page_open.py"

pytestmark = pytest.mark.skipif(
    headless.browser_missing() is not None, reason=str(headless.browser_missing())
)


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120
    )


def test_reports_medians_of_consistent_runs(tmp_path: Path) -> None:
    page = write_page(tmp_path / "site", list(range(30)))
    out = tmp_path / "open.json"
    done = bench(str(page), "--runs", "3", "--rows", "25", "--json", str(out))
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert len(data["runs"]) == 3 and data["rows"] == 25
    for key in ("load_ms", "rows_ms", "dom_content_loaded_ms"):
        values = sorted(run[key] for run in data["runs"])
        assert all(v > 0 for v in values)
        assert data["summary"][key] == {"median": values[1], "min": values[0], "max": values[2]}
    for run in data["runs"]:
        assert run["dom_content_loaded_ms"] <= run["load_ms"] and run["errors"] == []
    assert f"median {data['summary']['load_ms']['median']:.0f} ms" in done.stdout


def test_fails_on_page_errors_and_on_too_few_rows(tmp_path: Path) -> None:
    page = write_page(tmp_path, [1, 2], "<script>undefinedFunction()</script>")
    done = bench(str(page), "--runs", "1", "--rows", "2")
    assert done.returncode == 1
    assert "uncaught: ReferenceError: undefinedFunction is not defined" in done.stderr

    short = bench(str(page), "--runs", "1", "--rows", "3", "--timeout", "1")
    assert short.returncode == 1
    assert "3 rows matching 'tbody tr' not rendered within 1 s (2 match)" in short.stderr
