"""Reliability report: crash soak, hostile inputs and a burst, in one table.

    python scripts/reliability_report.py --json reliability.json

Scenarios:

- ``soak``: `soak.run_soak` (SIGKILLs aimed at commits, snapshots, model load and
  random moments; every crop once, partition equal to the batch command's).
- ``hostile``: the hostile-input corpus, ``tests/test_hostile.py``, run through
  pytest; trials are its test cases. (HOOK: if that file is absent the row says so.)
- ``identity``: a crop's identity across moves, renames and rewrites (issue 9,
  cases 1-3), ``tests/test_identity.py`` through pytest, counted as ``hostile``.
- ``frames``: frame and trap identity (two traps with the same frame names),
  ``tests/test_frames.py``, run through pytest; trials are its test cases.
- ``field cases``: issue 9's other field faults, one test file per kind
  (``FIELD_CASE_TESTS``: thin crops, text saved on Windows, one daemon per state
  folder, the stuck insect), run through pytest; trials are their test cases.
- ``burst``: ``--burst`` crops (20,000 by default) hard-linked under new names into
  new frame folders within seconds while a daemon child watches; every one must be
  processed (the observer's dropped events are made good by rescans). Reports the
  child's peak RSS (``os.wait4``'s ``ru_maxrss``) and how many files a rescan found
  first.

Prints ``scenario, trials, crops in, crops in CSV, duplicates, lost, outcome`` and
writes the details as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import soak

REPO = soak.REPO


@dataclass(frozen=True)
class Row:
    """One line of the report table."""

    scenario: str
    trials: int
    crops_in: int | None
    crops_in_csv: int | None
    duplicates: int | None
    lost: int | None
    outcome: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BurstResult:
    """What a burst did."""

    crops_in: int
    crops_in_csv: int
    duplicates: int
    lost: int
    link_seconds: float  # how long dropping the files took
    drain_seconds: float  # from the first file to the last commit
    peak_rss_mib: float
    rescans_with_new_files: int
    files_first_found_by_rescan: int
    exit_code: int

    @property
    def ok(self) -> bool:
        """Every crop in the CSV exactly once and a clean exit."""
        return self.duplicates == 0 and self.lost == 0 and self.exit_code == 0


def _base_session(work: Path, crops: int, seed: int) -> list[Path]:
    """A small simulated session whose frames are cloned to make up a burst."""
    return soak._frames_for(min(crops, 400), seed, work / "base")


def run_burst(
    work: Path,
    crops: int = 20_000,
    *,
    seed: int = 4,
    rescan_s: float = 2.0,
    timeout_s: float = 900.0,
    say: Callable[[str], None] = print,
) -> BurstResult:
    """Drop ``crops`` crops into a watched folder within seconds; check all get processed.

    Crops are hard links to a small simulated session's files under new frame names
    (one new frame folder per cloned frame, timestamps moved on), so a burst costs
    no disk and no rendering time.
    """
    from crop_clusterd.csvfiles import read_clusters_csv
    from crop_clusterd.simulate import frame_name

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    frames = _base_session(work, crops, seed)
    watch = work / "watch"
    watch.mkdir()
    spec = soak.ChildSpec(tmp=str(work), watch=str(watch), log_level="debug", rescan_s=rescan_s)
    child = soak.spawn(spec)
    try:
        deadline = time.monotonic() + 120
        while child.started_at is None:
            if time.monotonic() > deadline or child.proc.poll() is not None:
                raise RuntimeError(f"burst daemon did not start: {child.names()[-5:]}")
            time.sleep(0.05)
        t0 = time.monotonic()
        when = datetime(2030, 1, 1)
        made = 0
        while made < crops:
            for frame in frames:
                if made >= crops:
                    break
                when += timedelta(seconds=2)
                name = frame_name(when)
                dest = watch / name / "crops"
                dest.mkdir(parents=True)
                for i, crop in enumerate(sorted((frame / "crops").glob("*.png"))):
                    if made >= crops:
                        break
                    os.link(crop, dest / f"crop_{name}_CROPNUMBER_{i}_UUID_SIM.png")
                    made += 1
        link_s = time.monotonic() - t0
        say(f"burst: {made} crops landed in {link_s:.1f} s")
        deadline = time.monotonic() + timeout_s
        while soak.committed_count(work / "state") < made:
            if time.monotonic() > deadline or child.proc.poll() is not None:
                raise RuntimeError(f"burst not processed in time: {child.names()[-5:]}")
            time.sleep(0.2)
        drain_s = time.monotonic() - t0
        child.proc.send_signal(signal.SIGTERM)
        # wait4 rather than Popen.wait: it also gives the child's peak RSS.
        _, status, usage = os.wait4(child.proc.pid, 0)
        child.proc.returncode = os.waitstatus_to_exitcode(status)
        if child.reader is not None:
            child.reader.join(60)
    finally:
        if child.proc.poll() is None:
            child.proc.kill()
            child.proc.wait()
    rows = read_clusters_csv(work / "out" / "clusters.csv")
    names = [n for n, _ in rows]
    expected = {str(p) for p in watch.rglob("*.png")}
    rescans = [
        e
        for t, e in child.events
        if e.get("event") == "rescanned" and t >= t0 and int(e.get("new_files", 0)) > 0
    ]
    return BurstResult(
        crops_in=len(expected),
        crops_in_csv=len(names),
        duplicates=len(names) - len(set(names)),
        lost=len(expected - set(names)),
        link_seconds=round(link_s, 2),
        drain_seconds=round(drain_s, 2),
        peak_rss_mib=round(usage.ru_maxrss / 1024.0, 1),  # kilobytes on Linux
        rescans_with_new_files=len(rescans),
        files_first_found_by_rescan=sum(int(e.get("new_files", 0)) for e in rescans),
        exit_code=int(child.proc.returncode),
    )


# Issue 9's field faults, one test file per kind; each test is a trial.
FIELD_CASE_TESTS = (
    "tests/test_thin_crops.py",  # case 6: any aspect ratio, bounded memory
    "tests/test_textfiles.py",  # case 7: BOM, CRLF, UTF-16 in every text input
    "tests/test_statelock.py",  # case 8: one daemon per state folder
    "tests/test_stuck.py",  # case 5: a stuck insect is one cluster, equal to the oracle
    "tests/test_index_saved.py",  # case 9: no index_saved line when no index was written
)


def run_hostile(pytest_args: Sequence[str] = ()) -> Row:
    """HOOK: the hostile-input corpus is ``tests/test_hostile.py``; run it and count."""
    return run_test_file("hostile", "test_hostile.py", pytest_args)


def run_test_file(scenario: str, name: str, pytest_args: Sequence[str] = ()) -> Row:
    """Run ``tests/<name>`` through pytest; one row, trials = its test cases."""
    return run_pytest_row(scenario, (f"tests/{name}",), pytest_args)


def run_field_cases(pytest_args: Sequence[str] = ()) -> Row:
    """The field-fault cases of issue 9 (:data:`FIELD_CASE_TESTS`), run and counted."""
    return run_pytest_row("field cases", FIELD_CASE_TESTS, pytest_args)


def run_pytest_row(scenario: str, files: Sequence[str], pytest_args: Sequence[str] = ()) -> Row:
    """Run the test ``files`` (relative to the repository) with pytest; one row of counts."""
    missing = [f for f in files if not (REPO / f).exists()]
    if missing:
        return Row(scenario, 0, None, None, None, None, f"MISSING ({', '.join(missing)})")
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                *(str(REPO / f) for f in files),
                "-q",
                f"--junitxml={report}",
                *pytest_args,
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        if not report.exists():
            tail = (done.stdout + done.stderr)[-500:]
            return Row(scenario, 0, None, None, None, None, f"ERROR: {tail}")
        suites = ET.parse(report).getroot()
        counts = {k: 0 for k in ("tests", "failures", "errors", "skipped")}
        for suite in suites.iter("testsuite"):
            for k in counts:
                counts[k] += int(suite.get(k, "0"))
    bad = counts["failures"] + counts["errors"]
    outcome = "PASS" if bad == 0 and done.returncode == 0 else f"FAIL ({bad} failed)"
    return Row(scenario, counts["tests"], None, None, None, None, outcome, counts)


def soak_row(result: soak.SoakResult) -> Row:
    """The soak as a table row."""
    return Row(
        "soak",
        len(result.kills),
        result.crops_in,
        result.crops_in_csv,
        result.duplicates,
        result.lost,
        "PASS" if result.ok else "FAIL",
        soak.result_json(result),
    )


def burst_row(result: BurstResult) -> Row:
    """The burst as a table row."""
    details = dataclasses.asdict(result)
    return Row(
        "burst",
        1,
        result.crops_in,
        result.crops_in_csv,
        result.duplicates,
        result.lost,
        "PASS" if result.ok else "FAIL",
        details,
    )


def render(rows: Sequence[Row]) -> str:
    """The report table."""
    head = ("scenario", "trials", "crops in", "crops in CSV", "duplicates", "lost", "outcome")
    cells = [head] + [
        tuple(
            "-" if v is None else str(v)
            for v in (
                r.scenario,
                r.trials,
                r.crops_in,
                r.crops_in_csv,
                r.duplicates,
                r.lost,
                r.outcome,
            )
        )
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(head))) for c in cells)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the scenarios, print the table, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/crop-clusterd-reliability"))
    parser.add_argument("--soak-crops", type=int, default=500)
    parser.add_argument("--soak-kills", type=int, default=8)
    parser.add_argument("--soak-seconds", type=float, default=30.0)
    parser.add_argument("--burst", type=int, default=20_000, help="crops in the burst")
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=("soak", "hostile", "identity", "frames", "field", "burst"),
    )
    parser.add_argument("--json", type=Path, help="also write the details here")
    args = parser.parse_args(argv)
    soak.register_fakes()
    signal.signal(signal.SIGTERM, soak._interrupt)
    rows: list[Row] = []
    if "soak" not in args.skip:
        result = soak.run_soak(
            soak.SoakOptions(
                work=args.work / "soak",
                crops=args.soak_crops,
                kills=args.soak_kills,
                seconds=args.soak_seconds,
            )
        )
        rows.append(soak_row(result))
    if "hostile" not in args.skip:
        rows.append(run_hostile())
    if "identity" not in args.skip:
        rows.append(run_test_file("identity", "test_identity.py"))
    if "frames" not in args.skip:
        # Two traps with the same frame names: own boxes, no mixed cluster, independence.
        rows.append(run_test_file("frames", "test_frames.py"))
    if "field" not in args.skip:
        rows.append(run_field_cases())
    if "burst" not in args.skip:
        rows.append(burst_row(run_burst(args.work / "burst", args.burst)))
    print(render(rows))
    for r in rows:
        if r.scenario == "burst":
            d = r.details
            print(
                f"burst: peak RSS {d['peak_rss_mib']} MiB, landed in {d['link_seconds']} s, "
                f"drained in {d['drain_seconds']} s, {d['files_first_found_by_rescan']} files "
                f"first found by {d['rescans_with_new_files']} rescans"
            )
    if args.json:
        args.json.write_text(
            json.dumps([dataclasses.asdict(r) for r in rows], indent=2, default=str) + "\n"
        )
    return 0 if all(r.outcome == "PASS" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
