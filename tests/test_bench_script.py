"""scripts/bench.py in its seconds-long ``--quick`` mode, so the benchmark does not rot.

It runs the real daemon and the bundled model, so it checks behaviour the
figures rest on (every crop committed, nothing committed before it settled,
ratios computed from the figures beside them), not the speeds themselves.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_benchmark_runs_and_reports_consistent_figures(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "bench.py"),
            "--quick",
            "--json",
            str(out),
            "--work",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert "pipeline / forward #2" in done.stdout

    throughput = data["throughput"]
    sim_crops = len(list((tmp_path / "work" / "throughput-session").rglob("*.png")))
    assert throughput["crops"] == sim_crops > 0
    assert len(throughput["runs"]) == 2  # A B A B
    for run in throughput["runs"]:
        assert run["pipeline_commits"] >= 2, "one commit gives no rate"
        assert math.isclose(
            run["pipeline_over_forward"],
            run["pipeline_crops_per_s"] / run["forward_crops_per_s"],
        )

    assign = data["assign"]
    assert set(assign["sizes"]) == {"2000", "5000"}
    for size in assign["sizes"].values():
        assert size["micro_batches"] == 5
        assert 0 < size["median_ms_per_crop"] <= size["p95_ms_per_crop"] <= size["max_ms_per_crop"]

    latency = data["latency"]
    landed = list((tmp_path / "work" / "latency-watch").rglob("*.png"))
    assert latency["crops"] == len(landed) >= latency["rate_crops_per_s"] * latency["seconds"]
    # A file is only taken once it has been quiet for settle_ms.
    assert latency["min_s"] >= latency["settle_ms"] / 1000
    assert latency["p50_s"] <= latency["p95_s"] <= latency["max_s"]

    gallery = data["gallery"]
    work = tmp_path / "work"
    assert len(gallery["runs"]) == 2  # A B A B
    for rep, run in enumerate(gallery["runs"]):
        assert math.isclose(
            run["cpu_ratio"], run["cpu_ms_per_crop_on"] / run["cpu_ms_per_crop_off"]
        )
        thumbs = list((work / f"gallery-on-{rep}" / "out").rglob("thumbs/*.jpg"))
        assert len(thumbs) == gallery["crops"], "on: a thumbnail per crop"
        off = work / f"gallery-off-{rep}" / "out"
        assert not list(off.rglob("thumbs")) and not list(off.rglob("index.html"))

    figures = {row["figure"] for row in data["table"]}
    assert {"latency p50", "assign at 5,000: median", "pipeline / forward #1"} <= figures
