"""scripts/check_oracle.py at a tiny size, so the million-crop proof does not rot.

The script is how the engine's paths are checked against the all-pairs oracle
(README, Benchmarks); here each forced path must give the oracle's partition
and the sampled check must report its pairs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_oracle.py"


# The debug event each search path logs once per batch (none for exact products).
EVENTS = {"--force-buckets": "buckets_linked", "--force-index": "hnsw_linked", "--force-exact": ""}


def run(*flags: str) -> tuple[dict[str, object], str]:
    """The script's JSON result and its whole output."""
    argv = [sys.executable, str(SCRIPT), "--n", "3000", "--dim", "32", *flags]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    result: dict[str, object] = json.loads(done.stdout[done.stdout.index("{") :])
    return result, output


@pytest.mark.parametrize("path", list(EVENTS))
@pytest.mark.parametrize("data", [[], ["--near"]], ids=["easy", "near"])
def test_each_forced_path_gives_the_oracles_partition(path: str, data: list[str]) -> None:
    result, output = run(path, *data)
    assert [event for event in EVENTS.values() if event and event in output] == (
        [EVENTS[path]] if EVENTS[path] else []
    )
    assert result["equal"] is True
    assert result["search"] == path.removeprefix("--").replace("-", " ")
    assert result["engine_clusters"] == result["oracle_clusters"]


def test_the_sampled_check_counts_the_pairs_of_its_rows() -> None:
    result, _ = run("--near", "--force-buckets", "--sample-rows", "300")
    assert result["pairs_split_by_engine"] == 0
    assert isinstance(result["pairs_above_threshold"], int)
    assert result["pairs_above_threshold"] > 300  # groups of 8 at ~0.9: a few pairs per row
