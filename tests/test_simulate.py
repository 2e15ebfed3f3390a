"""Tests for the seeded camera-trap simulator."""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import re
import subprocess
import sys
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from crop_clusterd.simspecies import make_species
from crop_clusterd.simulate import (
    TIME_FORMAT,
    SimConfig,
    SimSummary,
    add_simulate_arguments,
    config_from_args,
    main,
    simulate,
)

REPO = Path(__file__).resolve().parents[1]
CROP_RE = re.compile(r"^crop_(?P<frame>.+)_CROPNUMBER_(?P<index>\d+)_(?:UUID_(?P<id>[^.]*))?\.png$")
META_RE = re.compile(r"^metadata_(?P<frame>.+)_UUID_(?P<id>.+)\.json$")
SMALL = SimConfig(seed=3, frames=12, mean_present=6.0, mean_stay_frames=8.0)
# A trap session small enough to render in seconds, with behaviour compressed in time
# (visits of 30 s, returns after 40 s, still periods of 30 s) so that every feature
# shows up often; misses are likelier so that there are enough runs to count.
TRAP = SimConfig(
    seed=5, frames=80, mean_present=8.0, mean_stay_frames=15.0, return_after_s=40.0,
    return_min_s=10.0, still_s=30.0, walk_s=8.0, hop_every_s=60.0, miss_prob=0.06,
)  # fmt: skip


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def read_labels(root: Path) -> list[tuple[str, str]]:
    with (root / "labels.csv").open(newline="") as handle:
        reader = csv.reader(handle)
        assert next(reader) == ["filename", "label"]
        return [(row[0], row[1]) for row in reader]


def frame_crops(root: Path, layout: str) -> dict[str, tuple[dict[str, object], list[Path]]]:
    """frame -> (metadata, crop paths), read back the way a consumer would."""
    if layout == "per-frame":
        metas = sorted(root.glob("*/metadata_*.json"))
    else:
        metas = sorted((root / "metadata").glob("metadata_*.json"))
    out: dict[str, tuple[dict[str, object], list[Path]]] = {}
    for meta in metas:
        match = META_RE.match(meta.name)
        assert match, meta.name
        frame = match["frame"]
        crop_dir = meta.parent / "crops" if layout == "per-frame" else root / "crops"
        crops = sorted(crop_dir.glob(f"crop_{frame}_CROPNUMBER_*"))
        out[frame] = (json.loads(meta.read_text()), crops)
    return out


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SimSummary]:
    out = tmp_path_factory.mktemp("sim") / "night"
    return out, simulate(SMALL, out)


def test_same_seed_gives_identical_bytes_other_seed_differs(tmp_path: Path) -> None:
    config = SimConfig(seed=11, frames=4, mean_present=4.0)
    simulate(config, tmp_path / "a")
    simulate(config, tmp_path / "b")
    simulate(SimConfig(seed=12, frames=4, mean_present=4.0), tmp_path / "c")
    a, b, c = (tree_hashes(tmp_path / n) for n in "abc")
    assert any(name.endswith(".png") for name in a)
    assert a == b
    assert a != c


def test_shorter_run_is_a_prefix_of_a_longer_one(tmp_path: Path) -> None:
    simulate(SimConfig(seed=4, frames=2, mean_present=4.0), tmp_path / "short")
    simulate(SimConfig(seed=4, frames=4, mean_present=4.0), tmp_path / "long")
    short, long = tree_hashes(tmp_path / "short"), tree_hashes(tmp_path / "long")
    frames = {k: v for k, v in short.items() if not k.endswith((".csv", ".json")) or "/" in k}
    assert len(frames) > 2
    assert frames.items() <= long.items()


def test_names_and_metadata_follow_flatbug(small_run: tuple[Path, SimSummary]) -> None:
    root, summary = small_run
    frames = frame_crops(root, "per-frame")
    assert len(frames) == SMALL.frames == summary.frames
    times = [datetime.strptime(f.removesuffix("-00-06"), TIME_FORMAT) for f in sorted(frames)]
    assert times[0] == SMALL.start
    assert {(b - a).total_seconds() for a, b in itertools.pairwise(times)} == {2.0}
    total = 0
    for frame, (meta, crops) in frames.items():
        boxes = meta["boxes"]
        assert isinstance(boxes, list)
        for key in ("contours", "confs", "classes", "scales", "areas"):
            assert len(meta[key]) == len(boxes), key  # type: ignore[arg-type]
        assert meta["identifier"] == "SIM"
        assert (meta["image_width"], meta["image_height"]) == (4000, 3000)
        indices = []
        for crop in crops:
            match = CROP_RE.match(crop.name)
            assert match and match["frame"] == frame and match["id"] == "SIM", crop.name
            index = int(match["index"])
            assert index < len(boxes)
            x1, y1, x2, y2 = boxes[index]
            assert 0 <= x1 < x2 <= 4000 and 0 <= y1 < y2 <= 3000
            with Image.open(crop) as im:
                assert im.size == (x2 - x1, y2 - y1)
            indices.append(index)
        assert sorted(indices) == list(range(len(boxes)))  # one crop per box
        total += len(crops)
    assert total == summary.crops > 0
    assert not [p for p in root.rglob(".*")], "temp files left behind"


def test_labels_cover_every_crop_exactly_once(small_run: tuple[Path, SimSummary]) -> None:
    root, summary = small_run
    labels = read_labels(root)
    crops = [p.name for p in root.glob("*/crops/*.png")]
    names = [name for name, _ in labels]
    assert len(names) == len(set(names)) == summary.crops
    assert set(names) == set(crops)
    assert all(re.fullmatch(r"sp\d\d-ind\d{4,}", label) for _, label in labels)
    assert len({label for _, label in labels}) <= summary.individuals


def test_crops_are_rgba_animal_opaque_background_transparent(
    small_run: tuple[Path, SimSummary],
) -> None:
    root, _ = small_run
    sides = []
    for path in sorted(root.glob("*/crops/*.png"))[:60]:
        with Image.open(path) as im:
            assert im.mode == "RGBA"
            arr = np.asarray(im)
        alpha = arr[..., 3]
        assert set(np.unique(alpha)) <= {0, 255}  # a mask, not a soft matte
        opaque = float((alpha == 255).mean())
        assert 0.2 < opaque < 0.97, path.name
        h, w = alpha.shape
        assert alpha[h // 2 - 2 : h // 2 + 3, w // 2 - 2 : w // 2 + 3].max() == 255
        assert (arr[alpha == 0, :3] == 0).all()
        # Tight crop: the mask touches all four edges.
        assert alpha[0].any() and alpha[-1].any() and alpha[:, 0].any() and alpha[:, -1].any()
        sides.append(max(h, w))
    assert 40 <= float(np.median(sides)) <= 260


def test_individuals_persist_and_appear_once_per_frame(
    small_run: tuple[Path, SimSummary],
) -> None:
    root, _ = small_run
    label_of = dict(read_labels(root))
    seen: dict[str, list[tuple[str, tuple[float, float]]]] = defaultdict(list)
    for frame, (meta, crops) in frame_crops(root, "per-frame").items():
        per_frame = Counter(label_of[c.name] for c in crops)
        assert max(per_frame.values()) == 1, frame
        for crop in crops:
            x1, y1, x2, y2 = meta["boxes"][int(CROP_RE.match(crop.name)["index"])]  # type: ignore[index]
            seen[label_of[crop.name]].append((frame, ((x1 + x2) / 2, (y1 + y2) / 2)))
    frames_per_individual = [len(v) for v in seen.values()]
    assert float(np.mean(frames_per_individual)) >= 3.0
    # Between consecutive sightings an individual mostly stays put.
    steps = []
    for sightings in seen.values():
        sightings.sort()
        for (_, a), (_, b) in itertools.pairwise(sightings):
            steps.append(float(np.hypot(a[0] - b[0], a[1] - b[1])))
    assert steps and float(np.median(steps)) < 30.0


def test_look_alike_pairs_are_much_closer_in_colour_than_unrelated(tmp_path: Path) -> None:
    config = SimConfig(seed=0, frames=2, mean_present=60.0, layout="flat")
    simulate(config, tmp_path)
    species = make_species(config.species_count, config.seed)
    pairs = [(sp.look_alike_of, sp.index) for sp in species if sp.look_alike_of is not None]
    assert len(pairs) >= 2
    for a, b in pairs:
        assert species[a].plan == species[b].plan
        assert species[a].marking == species[b].marking
    screen = np.array([226.0, 224.0, 230.0])
    colours: dict[int, list[npt.NDArray[np.float64]]] = defaultdict(list)
    for name, label in read_labels(tmp_path):
        arr = np.asarray(Image.open(tmp_path / "crops" / name), dtype=np.float64)
        px = arr[arr[..., 3] > 0][:, :3]
        px = px[np.linalg.norm(px - screen, axis=1) > 60]  # the animal, not the halo
        colours[int(label[2:4])].append(px.mean(axis=0))
    mean = {sp: np.mean(v, axis=0) for sp, v in colours.items()}
    paired = {frozenset(p) for p in pairs}
    within: list[float] = []
    between: list[float] = []
    for i in mean:
        for j in mean:
            if i < j:
                dist = float(np.linalg.norm(mean[i] - mean[j]))
                (within if frozenset((i, j)) in paired else between).append(dist)
    assert within and between
    assert float(np.mean(within)) < 0.5 * float(np.mean(between))


def test_rate_paces_with_injected_sleep_and_reports_frames(tmp_path: Path) -> None:
    sleeps: list[float] = []
    written: list[str] = []

    def on_frame(frame: str) -> None:
        # By the time we hear of a frame its metadata is complete on disk.
        meta = tmp_path / frame / f"metadata_{frame}_UUID_SIM.json"
        assert len(json.loads(meta.read_text())["boxes"]) == len(
            list((tmp_path / frame / "crops").iterdir())
        )
        written.append(frame)

    ticks = iter(0.15 * k for k in range(100))  # each reading 0.15 s after the last
    config = SimConfig(frames=4, mean_present=3.0, rate_fps=2.0)
    simulate(config, tmp_path, sleep=sleeps.append, clock=lambda: next(ticks), on_frame=on_frame)
    assert written == sorted(written) and len(written) == 4
    # Between frames, not after the last: 1/rate less the 0.15 s a frame took.
    assert sleeps == pytest.approx([0.35, 0.35, 0.35])

    sleeps.clear()
    simulate(SimConfig(frames=3, mean_present=3.0), tmp_path / "fast", sleep=sleeps.append)
    assert sleeps == []


def test_flat_layout_holds_the_same_crops(tmp_path: Path) -> None:
    base = SimConfig(seed=5, frames=3, mean_present=5.0)
    flat = SimConfig(seed=5, frames=3, mean_present=5.0, layout="flat")
    simulate(base, tmp_path / "p")
    simulate(flat, tmp_path / "f")
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == [
        "crops",
        "labels.csv",
        "metadata",
        "simulation.json",
        "truth.csv",
    ]
    flat_crops = {p.name: p.read_bytes() for p in (tmp_path / "f" / "crops").iterdir()}
    per_frame = {p.name: p.read_bytes() for p in (tmp_path / "p").glob("*/crops/*")}
    assert flat_crops == per_frame
    assert len(list((tmp_path / "f" / "metadata").iterdir())) == 3
    for frame, (meta, crops) in frame_crops(tmp_path / "f", "flat").items():
        assert len(crops) == len(meta["boxes"]), frame  # type: ignore[arg-type]


def test_without_identifier_names_follow_flatbug(tmp_path: Path) -> None:
    simulate(SimConfig(frames=2, mean_present=4.0, identifier=None), tmp_path)
    crops = list(tmp_path.glob("*/crops/*.png"))
    assert crops
    assert all(re.fullmatch(r"crop_\d{14}-00-06_CROPNUMBER_\d+_\.png", p.name) for p in crops)
    metas = list(tmp_path.glob("*/metadata_*_UUID_None.json"))
    assert len(metas) == 2
    assert json.loads(metas[0].read_text())["identifier"] is None


def test_crop_count_tracks_mean_present(tmp_path: Path) -> None:
    config = SimConfig(seed=2, frames=30, mean_present=6.0, mean_stay_frames=5.0)
    summary = simulate(config, tmp_path)
    expected = config.frames * config.mean_present
    assert 0.6 * expected < summary.crops < 1.4 * expected
    assert summary.individuals > config.mean_present  # turnover brought new arrivals
    report = json.loads((tmp_path / "simulation.json").read_text())
    assert report["summary"]["crops"] == summary.crops
    assert report["config"]["seed"] == 2


@pytest.mark.parametrize(
    "kwargs",
    [{"interval_s": 0.5}, {"identifier": "a_b"}, {"frames": 0}, {"rate_fps": 0.0}],
)
def test_bad_config_is_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="invalid simulation config"):
        SimConfig(**kwargs)  # type: ignore[arg-type]


def test_refuses_non_empty_output(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        simulate(SimConfig(frames=1), tmp_path)


def test_arguments_map_to_config() -> None:
    parser = argparse.ArgumentParser()
    add_simulate_arguments(parser)
    ns = parser.parse_args(
        ["-o", "x", "--seed", "7", "--frames", "9", "--interval", "3", "--species", "4",
         "--present", "2.5", "--stay", "30", "--layout", "flat", "--rate", "5",
         "--no-identifier"]
    )  # fmt: skip
    config = config_from_args(ns)
    assert ns.out == Path("x")
    assert (config.seed, config.frames, config.interval_s, config.species) == (7, 9, 3.0, 4)
    assert (config.mean_present, config.mean_stay_frames) == (2.5, 30.0)
    assert (config.layout, config.rate_fps, config.identifier) == ("flat", 5.0, None)
    defaults = config_from_args(parser.parse_args(["-o", "x"]))
    assert defaults == SimConfig()


def test_main_prints_summary_and_reports_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["-o", str(tmp_path / "o"), "--frames", "2", "--present", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "2 frames" in out
    assert main(["-o", str(tmp_path / "bad"), "--interval", "0.2"]) == 2
    assert "interval_s" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_script_runs_from_repo_root(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "scripts/simulate_trap.py", "-o", str(tmp_path / "o"), "--frames", "1",
         "--present", "2", "--layout", "flat"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "o" / "labels.csv").is_file()


# --- the trap behaviour and truth.csv ----------------------------------------------------

# sha256 of the classic session SimConfig(seed=3, frames=40, mean_present=6.0,
# mean_stay_frames=8.0, behaviour="classic"), computed with the code before the trap
# behaviour existed (commit 5e1bbd1): every file but simulation.json (by path and
# content), and simulation.json with only the config keys that code knew.
CLASSIC_FILES_SHA = "5d571f9ab4e869cdec470e6e741b6a37ef5140c0f8251761eb79520bf435534d"
CLASSIC_REPORT_SHA = "3d24ccc15858e8703a6abb3110cf7c932f238b240b025214656ca33e34d61240"
OLD_CONFIG_KEYS = ("seed", "frames", "interval_s", "start", "species", "mean_present",
                   "mean_stay_frames", "frame_width", "frame_height", "layout", "identifier",
                   "rate_fps", "crop_format", "atomic", "miss_prob")  # fmt: skip

Truth = list[dict[str, str]]


def read_truth(root: Path) -> Truth:
    with (root / "truth.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def visits(truth: Truth) -> dict[tuple[str, int], list[dict[str, str]]]:
    """(individual, visit) -> its rows in frame order."""
    out: dict[tuple[str, int], list[dict[str, str]]] = defaultdict(list)
    for row in truth:
        out[(row["individual"], int(row["visit"]))].append(row)
    for rows in out.values():
        rows.sort(key=lambda r: int(r["frame"]))
    return out


def centre_step(a: dict[str, str], b: dict[str, str]) -> float:
    return float(np.hypot(float(a["cx"]) - float(b["cx"]), float(a["cy"]) - float(b["cy"])))


@pytest.fixture(scope="module")
def trap_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Truth]:
    out = tmp_path_factory.mktemp("trap") / "night"
    simulate(TRAP, out)
    return out, read_truth(out)


def test_classic_reproduces_the_old_files_byte_for_byte(tmp_path: Path) -> None:
    config = SimConfig(
        seed=3, frames=40, mean_present=6.0, mean_stay_frames=8.0, behaviour="classic"
    )
    simulate(config, tmp_path)
    files = hashlib.sha256()
    for path in sorted(tmp_path.rglob("*")):
        if path.is_file() and path.name not in ("simulation.json", "truth.csv"):
            digest = hashlib.sha256(path.read_bytes()).digest()
            files.update(str(path.relative_to(tmp_path)).encode() + b"\0" + digest)
    assert files.hexdigest() == CLASSIC_FILES_SHA
    report = json.loads((tmp_path / "simulation.json").read_text())
    assert report["config"]["behaviour"] == "classic"
    report["config"] = {key: report["config"][key] for key in OLD_CONFIG_KEYS}
    old = hashlib.sha256(json.dumps(report, indent=1).encode()).hexdigest()
    assert old == CLASSIC_REPORT_SHA


def test_defaults_follow_the_behaviour() -> None:
    trap, classic = SimConfig(), SimConfig(behaviour="classic")
    assert trap.behaviour == "trap"
    assert (trap.species_count, trap.stay_frames) == (20, 150.0)
    assert (classic.species_count, classic.stay_frames) == (8, 60.0)
    assert SimConfig(species=5, behaviour="classic").species_count == 5
    with pytest.raises(ValueError, match="miss_after_miss"):
        SimConfig(miss_after_miss=1.0)
    with pytest.raises(ValueError, match="return_min_s"):
        SimConfig(return_min_s=500.0)


@pytest.mark.parametrize("behaviour", ["trap", "classic"])
def test_truth_rows_match_labels_one_to_one(tmp_path: Path, behaviour: str) -> None:
    config = SimConfig(seed=8, frames=6, mean_present=5.0, behaviour=behaviour)  # type: ignore[arg-type]
    summary = simulate(config, tmp_path)
    assert summary.truth_path == tmp_path / "truth.csv"
    truth = read_truth(tmp_path)
    labels = read_labels(tmp_path)
    assert [(r["filename"], r["individual"]) for r in truth] == labels
    assert len(truth) == summary.crops > 0
    frames = frame_crops(tmp_path, "per-frame")
    order = sorted(frames)
    for row in truth:
        match = CROP_RE.match(row["filename"])
        assert match
        meta, _ = frames[match["frame"]]
        frame = int(row["frame"])
        assert order[frame] == match["frame"]
        assert float(row["time_s"]) == frame * config.interval_s
        x1, y1, x2, y2 = meta["boxes"][int(match["index"])]  # type: ignore[index]
        assert (float(row["cx"]), float(row["cy"])) == ((x1 + x2) / 2, (y1 + y2) / 2)
        assert {row["jump"], row["blur"], row["still"]} <= {"0", "1"}
        if behaviour == "classic":
            assert (row["visit"], row["still"]) == ("0", "0")


def test_trap_individuals_return_with_the_same_label_and_a_new_visit(
    trap_run: tuple[Path, Truth],
) -> None:
    _, truth = trap_run
    by_visit = visits(truth)
    returned = {ind for ind, visit in by_visit if visit > 0}
    assert len(returned) >= 3
    moved_back = []
    for ind in returned:
        numbers = sorted({visit for i, visit in by_visit if i == ind})
        spans = [by_visit[(ind, v)] for v in numbers]
        for before, after in itertools.pairwise(spans):
            # A new visit starts after the last one ended, at least return_min_s later.
            gap_s = float(after[0]["time_s"]) - float(before[-1]["time_s"])
            assert gap_s >= TRAP.return_min_s
            moved_back.append(centre_step(before[-1], after[0]))
            assert after[0]["jump"] == "0"  # nothing to jump from within the new visit
    # It comes back at another place of the screen, not where it left.
    assert float(np.median(moved_back)) > 300.0


def test_trap_blur_only_while_moving_and_still_means_not_a_pixel(
    trap_run: tuple[Path, Truth],
) -> None:
    _, truth = trap_run
    blurred = [r for r in truth if r["blur"] == "1"]
    still = [r for r in truth if r["still"] == "1"]
    assert blurred and len(still) > len(truth) / 2
    assert all(r["still"] == "0" for r in blurred)
    for rows in visits(truth).values():
        for a, b in itertools.pairwise(rows):
            if a["still"] == b["still"] == "1" and b["jump"] == "0":
                # Only the box's rounding around a slightly squashed crop moves.
                assert centre_step(a, b) <= 1.5
            if centre_step(a, b) > 15.0:
                assert b["jump"] == "1"


def gap_runs(truth: Truth) -> tuple[list[int], int]:
    """Runs of missed frames between detections of one visit, and the frames seen."""
    runs: list[int] = []
    for rows in visits(truth).values():
        frames = [int(r["frame"]) for r in rows]
        runs += [b - a - 1 for a, b in itertools.pairwise(frames) if b - a > 1]
    return runs, len(truth)


def test_trap_misses_come_in_runs(trap_run: tuple[Path, Truth]) -> None:
    _, truth = trap_run
    runs, seen = gap_runs(truth)
    assert len(runs) >= 10
    miss_rate = sum(runs) / (sum(runs) + seen)
    # Independent misses at this rate would give runs of 1 / (1 - rate) frames.
    independent = 1.0 / (1.0 - miss_rate)
    assert float(np.mean(runs)) > 1.8 * independent
    assert max(runs) >= 4


def test_classic_misses_are_independent(tmp_path: Path) -> None:
    config = SimConfig(seed=2, frames=30, mean_present=6.0, miss_prob=0.15, behaviour="classic")
    simulate(config, tmp_path)
    runs, seen = gap_runs(read_truth(tmp_path))
    assert len(runs) >= 10
    miss_rate = sum(runs) / (sum(runs) + seen)
    assert float(np.mean(runs)) < 1.5 / (1.0 - miss_rate)


def test_behaviour_flags_map_to_config() -> None:
    parser = argparse.ArgumentParser()
    add_simulate_arguments(parser)
    ns = parser.parse_args(
        ["-o", "x", "--behaviour", "classic", "--miss", "0.1", "--return-prob", "0.5",
         "--return-after", "90", "--still", "60", "--walk", "5", "--hop-every", "200",
         "--miss-run", "0.6"]
    )  # fmt: skip
    config = config_from_args(ns)
    assert (config.behaviour, config.species_count, config.stay_frames) == ("classic", 8, 60.0)
    assert (config.miss_prob, config.return_prob, config.return_after_s) == (0.1, 0.5, 90.0)
    assert (config.still_s, config.walk_s, config.hop_every_s) == (60.0, 5.0, 200.0)
    assert config.miss_after_miss == 0.6
