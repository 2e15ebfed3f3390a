"""scripts/bench_methods.py on two tiny simulated sessions with a tiny local model.

The figures themselves mean nothing with a random 32-d model; what is checked
is that every figure is computed from the clustering it reports on (the
clusters.csv each run leaves behind) and that the truth's provenance is said.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench_methods.py"
sys.path.insert(0, str(SCRIPT.parent))

import bench_methods  # noqa: E402


@pytest.mark.slow
def test_bench_methods_reports_errors_computed_from_each_run(
    tmp_path: Path, tiny_dino_dir: Path
) -> None:
    work, out = tmp_path / "work", tmp_path / "errors.json"
    argv = [sys.executable, str(SCRIPT), "--work", str(work), "--frames", "3",
            "--seeds", "0", "1", "--settings", "track", "cosine:0.9", "--no-real",
            "-e", "dino", "-fp", str(tiny_dino_dir), "-d", "cpu", "--json", str(out)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    sessions = {r["session"] for r in data["results"]}
    assert len(data["results"]) == 2 * len(sessions) >= 4
    assert [r["setting"] for r in data["results"][:2]] == ["track", "cosine:0.9"]
    assert data["results"][1]["threshold"] == 0.9

    for r in data["results"]:
        folder = work / r["session"]
        with open(folder / "sim" / "labels.csv", newline="") as fh:
            n_labelled = sum(1 for _ in csv.DictReader(fh))
        (run,) = folder.glob(f"embed-dino-*/runs/{r['setting'].replace(':', '-')}")
        with open(run / "clusters.csv", newline="") as fh:
            sizes = Counter(row["cluster"] for row in csv.DictReader(fh))
        errors, evaluation = r["errors"], r["evaluation"]
        assert errors["crops"] == evaluation["n_items"] == n_labelled == sum(sizes.values())
        assert errors["clusters"] == evaluation["n_clusters"] == len(sizes)
        assert errors["singletons"] == sum(1 for n in sizes.values() if n == 1)
        assert errors["clusters_per_individual"] == pytest.approx(
            len(sizes) / evaluation["n_labels"]
        )
        truth = data["truth"][r["session"]]
        has_truth_csv = (folder / "sim" / "truth.csv").exists()
        assert (truth == ["truth.csv"]) == has_truth_csv
        if not has_truth_csv:  # the simulator writes boxes, so jumps are derived from them
            assert any("60 px" in note for note in truth)

    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("session "))
    assert sum(1 for line in lines[header:] if line.startswith("mean ")) == 2 * (len(sessions) // 2)


def test_grid_mode_is_the_old_threshold_grid(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        bench_methods.main(["--grid", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "--track-thresholds" in out and "bench_methods --grid" in out


def test_a_bad_setting_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        bench_methods.main(["--settings", "track:high", "--seeds", "--no-real"])
    assert stop.value.code == 2
    assert "'track:high': threshold is not a number" in capsys.readouterr().err
