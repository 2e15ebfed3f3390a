"""scripts/gpu_check.py in its ``--smoke`` mode (every step, tiny, on CPU), so the
GPU check does not rot between the rare runs on a GPU machine.

It checks that each step ran on what it says and that derived figures agree
with the figures they come from, not the speeds themselves.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import gpu_check_parts  # noqa: E402


def positive(value: Any) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_smoke_run_reports_every_step_with_sane_figures(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "gpu_check.py"),
            "--smoke",
            "--out",
            str(out),
            "--work",
            str(work),
            "--keep-work",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((out / "gpu_check.json").read_text())
    assert set(data) == {
        "environment",
        "seconds",
        "forward",
        "decode",
        "daemon",
        "live_batch",
        "precision",
        "oom",
    }
    assert data["environment"]["smoke"] is True and data["environment"]["device"] == "cpu"
    models = {"efficientnet-lite0", "dinov2-tiny"}

    forward = data["forward"]
    assert {(r["model"], r["precision"], r["batch_size"]) for r in forward} == {
        (m, p, b) for m in models for p in ("fp32", "bf16") for b in (2, 4)
    }
    assert all(positive(r["crops_per_s"]) for r in forward)

    decode = data["decode"]
    assert {(r["model"], r["workers"]) for r in decode} == {
        (m, w) for m in (*models, "decode-only") for w in (1, 2)
    }
    assert all(r["crops"] == 24 and positive(r["crops_per_s"]) for r in decode)

    daemon = data["daemon"]
    burst = len(list((work / "burst").rglob("*.png")))
    assert daemon["model"] == "dinov2-tiny" and daemon["crops"] == burst >= 200
    assert daemon["committed"] == burst, "the daemon must commit every crop of the burst"
    assert daemon["commits"] >= 2 and positive(daemon["end_to_end_crops_per_s"])
    assert math.isclose(
        daemon["ratio_to_forward"],
        daemon["end_to_end_crops_per_s"] / daemon["forward_same_batches_crops_per_s"],
    )
    assert daemon["memory"] == {"measured": False, "reason": "device cpu is not CUDA"}

    live = data["live_batch"]
    crops = len(list((work / "live").rglob("*.png")))
    assert [r["method"] for r in live] == ["cosine", "track"]
    for r in live:
        assert r["crops"] == crops and r["equal"] is True
        assert 1 < r["clusters_live"] < crops, "a trivial partition would prove nothing"

    precision = {r["model"]: r for r in data["precision"]}
    assert set(precision) == models
    for r in precision.values():
        assert r["crops"] == 16 and -1.0 <= r["cosine_min"] <= r["cosine_median"] <= 1.0 + 1e-5
        assert isinstance(r["cosine_same_partition"], bool) and r["cosine_pairs_flipped"] >= 0
    assert precision["efficientnet-lite0"]["cosine_median"] >= 0.99

    assert data["oom"] == {"ran": False, "reason": "device cpu is not CUDA"}
    assert set(data["seconds"]) == set(data) - {"environment", "seconds"} | {"total"}

    table = (out / "gpu_check.md").read_text()
    assert table == done.stdout
    assert "live equals batch (track" in table and "GPU memory | not measured" in table
    assert "FAILED" not in table
    assert (out / "gpu_check.log").stat().st_size > 0


def test_a_failed_step_gets_a_row_and_the_others_still_show() -> None:
    results: dict[str, Any] = {
        "forward": [{"model": "m", "precision": "bf16", "batch_size": 32, "crops_per_s": 1234.5}],
        "daemon": {"error": "RuntimeError: CUDA error: an illegal memory access", "traceback": ""},
        "oom": {"ran": True, "crops": 512, "ran_out_at": [512, 256], "embedded": 512,
                "skipped": 0, "batch_size": 128},
    }  # fmt: skip
    lines = gpu_check_parts.table(results).splitlines()
    assert "| forward m bf16 batch 32, crops/s | 1,234 |  |" in lines
    assert "| daemon FAILED | RuntimeError: CUDA error: an illegal memory access | |" in lines
    assert any(line.startswith("| real out-of-memory split of 512 crops") for line in lines)
    assert not any("live equals batch" in line for line in lines)  # a step not run: no row
