"""End-to-end tests of ``crop-clusterd cluster``/``simulate`` and ``scripts/cluster.py``.

The real sample (``../shared/seed-example``) goes through the old tool's script in a
subprocess with the bundled model; everything else runs ``main`` in-process with a
test-only colour embedder, whose clusters are known by construction.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pickle
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fakes import BLUE, RED, YELLOW, ColourEmbedder, write_png
from fakes import GREEN as ALL_GREENS
from PIL import Image

from crop_clusterd import cli, embed
from crop_clusterd import defaults as engine_defaults
from crop_clusterd.clusterdirs import NOT_CLUSTERED
from crop_clusterd.config import Config, EmbedConfig, InputConfig, OutputConfig
from crop_clusterd.csvfiles import read_clusters_csv
from crop_clusterd.defaults import COSINE_THRESHOLD
from crop_clusterd.embed import register, unregister
from crop_clusterd.flatbug import parse_crop_name
from crop_clusterd.linktree import TREE_MARKER
from crop_clusterd.simulate import TIME_FORMAT, SimConfig, SimSummary, simulate

REPO = Path(__file__).resolve().parents[1]
FAKE = ColourEmbedder.name
GREEN = ALL_GREENS[:2]  # the label tests below count on two green crops
SEED_TIME_FORMAT = "%Y%m%d%H%M%S"


@pytest.fixture(scope="module", autouse=True)
def _colour_embedder() -> Iterator[None]:
    register(ColourEmbedder)
    yield
    unregister(FAKE)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> str:
    """The colour embedder's name, accepted by ``-e`` for this test."""
    # cli checks names against the defaults list so --from-embeddings never imports torch.
    monkeypatch.setattr(engine_defaults, "EMBEDDER_NAMES", (*engine_defaults.EMBEDDER_NAMES, FAKE))
    return FAKE


# main() and configure_logging() change global logging state; undo it after each test.
pytestmark = pytest.mark.usefixtures("restore_logging")


def cluster(*args: str | Path) -> int:
    """``crop-clusterd cluster ARGS`` in-process, logging only errors."""
    return cli.main(["cluster", *map(str, args), "--log-level", "error"])


def rows_of(out: Path) -> list[tuple[str, int]]:
    return read_clusters_csv(out / "clusters.csv")


def groups(rows: Sequence[tuple[str, int]]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for name, cluster_id in rows:
        out.setdefault(cluster_id, []).append(name)
    return out


def partition(rows: Sequence[tuple[str, int]]) -> set[frozenset[str]]:
    return {frozenset(members) for members in groups(rows).values()}


def tree_files(root: Path) -> dict[str, Path]:
    """Files under ``root`` by relative path, without the tree marker."""
    return {
        p.relative_to(root).as_posix(): p
        for p in root.rglob("*")
        if p.is_file() and p.name != TREE_MARKER
    }


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture
def hues(tmp_path: Path) -> dict[str, list[Path]]:
    """Crops in one folder per hue (the folder names are the labels)."""
    root = tmp_path / "crops"
    spec = {"red": RED, "green": GREEN, "blue": BLUE, "yellow": (YELLOW,)}
    return {
        hue: [write_png(root / hue / f"{hue}{i}.png", rgb) for i, rgb in enumerate(shades)]
        for hue, shades in spec.items()
    }


# --- the real sample through the old tool's script -------------------------------------


@dataclass(frozen=True)
class SeedRun:
    out: Path
    work: Path
    tmpdir: Path
    crops: list[Path]
    metadata: Path
    stdout: str


@pytest.fixture(scope="module")
def seed_run(
    seed_example: Path, seed_crops: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> SeedRun:
    """``scripts/cluster.py`` on the seed crops with -gs at 0.8, as a real subprocess."""
    work = tmp_path_factory.mktemp("seed-run")
    tmpdir = tmp_path_factory.mktemp("seed-tmpdir")
    before = snapshot(seed_example)
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "cluster.py"),
            "-i",
            str(seed_example / "crops"),
            "-o",
            "out",
            "-mf",
            str(seed_example / "metadata"),
            "--time_format",
            SEED_TIME_FORMAT,
            "-gs",
            "-th",
            "0.8",
            "-d",
            "cpu",
        ],
        cwd=work,
        env={**os.environ, "TMPDIR": str(tmpdir)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert snapshot(seed_example) == before, "the run changed the seed example"
    return SeedRun(work / "out", work, tmpdir, seed_crops, seed_example / "metadata", proc.stdout)


def test_seed_clusters_csv_lists_every_crop_once(seed_run: SeedRun) -> None:
    rows = rows_of(seed_run.out)
    names = [n for n, _ in rows]
    assert names == [str(p) for p in seed_run.crops]
    assert len(rows) == 41
    for cluster_id, members in groups(rows).items():
        assert cluster_id == min(names.index(m) for m in members)
    n_clusters = len(groups(rows))
    assert f"41 crops -> {n_clusters} clusters" in seed_run.stdout
    assert "threshold 0.8" in seed_run.stdout


def test_seed_embeddings_pickle_is_plain(seed_run: SeedRun) -> None:
    with open(seed_run.out / "embeddings.pkl", "rb") as fh:
        data = pickle.load(fh)
    assert set(data) == {"filename", "embedding"}
    assert data["filename"] == [n for n, _ in rows_of(seed_run.out)]
    vectors = data["embedding"]
    assert isinstance(vectors, np.ndarray)
    assert vectors.shape == (41, 1280) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_seed_errors_csv_is_header_only(seed_run: SeedRun) -> None:
    assert (seed_run.out / "errors.csv").read_text() == "filename,reason\n"


def test_seed_cluster_folders_are_hard_links(seed_run: SeedRun) -> None:
    rows = rows_of(seed_run.out)
    expected: dict[str, Path] = {}
    for cluster_id, members in groups(rows).items():
        folder = NOT_CLUSTERED if len(members) == 1 else str(cluster_id)
        for m in members:
            expected[f"{folder}/{Path(m).name}"] = Path(m)
    assert any(len(m) > 1 for m in groups(rows).values())
    assert any(len(m) == 1 for m in groups(rows).values())

    found = tree_files(seed_run.out / "clusters")
    assert set(found) == set(expected)
    for rel, path in found.items():
        assert path.stat().st_ino == expected[rel].stat().st_ino, rel


def test_seed_run_writes_only_its_output_folder(seed_run: SeedRun) -> None:
    assert [p.name for p in seed_run.work.iterdir()] == ["out"]
    assert sorted(p.name for p in seed_run.out.iterdir()) == [
        "clusters",
        "clusters.csv",
        "embeddings.pkl",
        "errors.csv",
    ]
    assert list(seed_run.tmpdir.iterdir()) == []


_NO_TORCH_SCRIPT = """
import sys
from crop_clusterd.cli import main
rc = main(["cluster", *sys.argv[1:]])
assert "torch" not in sys.modules, "--from-embeddings imported torch"
sys.exit(rc)
"""


def test_from_embeddings_needs_no_model_and_matches_a_full_run(
    seed_run: SeedRun, tmp_path: Path
) -> None:
    gating = ["-mf", str(seed_run.metadata), "--time_format", SEED_TIME_FORMAT]
    pkl = seed_run.out / "embeddings.pkl"
    reclustered = tmp_path / "reclustered"
    args = ["--from-embeddings", str(pkl), "-o", str(reclustered), "-th", "0.9", *gating]
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TORCH_SCRIPT, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr

    full = tmp_path / "full"
    inputs = ["-i", str(seed_run.metadata.parent / "crops")]
    assert cluster(*inputs, "-o", full, "-th", "0.9", "-d", "cpu", *gating) == 0
    assert (reclustered / "clusters.csv").read_bytes() == (full / "clusters.csv").read_bytes()
    # 0.8 and 0.9 must differ on this sample, or the threshold could be ignored unseen.
    assert partition(rows_of(full)) != partition(rows_of(seed_run.out))

    same = tmp_path / "same"
    assert cluster("--from-embeddings", pkl, "-o", same, "-th", "0.8", *gating) == 0
    assert (same / "clusters.csv").read_bytes() == (seed_run.out / "clusters.csv").read_bytes()


# --- bad files, errors, config ------------------------------------------------------------


def test_bad_files_are_listed_and_the_run_succeeds(
    fake: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "crops"
    good = [write_png(folder / f"good{i}.png", rgb) for i, rgb in enumerate((*RED, *GREEN))]
    (folder / "text.png").write_text("not a picture at all\n")
    full = folder / "full.png"
    Image.effect_noise((64, 64), 60).convert("RGB").save(full)
    (folder / "truncated.png").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    full.unlink()
    (folder / "zero.png").write_bytes(b"")
    out = tmp_path / "out"

    assert cluster("-i", folder, "-o", out, "-e", fake) == 0

    assert [n for n, _ in rows_of(out)] == sorted(str(p) for p in good)
    with open(out / "errors.csv", newline="") as fh:
        errors = list(csv.reader(fh))
    assert errors[0] == ["filename", "reason"]
    assert sorted(errors[1:]) == [
        [str(folder / "text.png"), "not an image"],
        [str(folder / "truncated.png"), "truncated image"],
        [str(folder / "zero.png"), "empty file"],
    ]
    assert "3 files skipped" in capsys.readouterr().out


def test_no_inputs_found_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("no crops here")

    assert cluster("-i", empty, "-o", tmp_path / "out") == 1

    err = capsys.readouterr().err
    assert "no image files found" in err and str(empty) in err


def test_missing_inputs_fail_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cluster("-o", tmp_path / "out") == 2
    assert "-i/--input or --from-embeddings" in capsys.readouterr().err


def test_inputs_and_from_embeddings_exclude_each_other(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cluster("-i", tmp_path, "--from-embeddings", tmp_path / "e.pkl", "-o", tmp_path)
    assert code == 2
    assert "exclude each other" in capsys.readouterr().err


def test_unknown_embedder_names_the_choices(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cluster("-i", tmp_path, "-e", "dinov3", "-o", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "'dinov3'" in err
    for name in engine_defaults.EMBEDDER_NAMES:
        assert name in err
    assert not (tmp_path / "out").exists()


def test_bad_config_key_names_section_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[link]\nthreshhold = 0.5\n")
    assert cluster("--config", bad, "-i", tmp_path) == 2
    assert "link.threshhold" in capsys.readouterr().err


def test_bad_flag_value_is_checked_like_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cluster("-th", "1.5", "-i", tmp_path) == 2
    assert "link.threshold" in capsys.readouterr().err


def test_check_config_prints_flags_over_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "crop-clusterd.toml"
    file.write_text('[link]\nthreshold = 0.5\nnear_window_s = 60.0\n[embed]\ndevice = "cpu"\n')
    out = tmp_path / "out"

    code = cluster("--config", file, "--check-config", "-th", "0.7", "-c", "track", "-o", out)

    assert code == 0
    printed = tomllib.loads(capsys.readouterr().out)
    assert printed["link"]["threshold"] == 0.7
    assert printed["link"]["method"] == "track"
    assert printed["link"]["near_window_s"] == 60.0
    assert printed["embed"]["device"] == "cpu"
    assert printed["output"]["folder"] == out.as_posix()
    assert not out.exists()


# --- labels and evaluation ----------------------------------------------------------------

EVAL_KEYS = {
    "n_items",
    "n_clusters",
    "n_labels",
    "purity",
    "ari",
    "ami",
    "bcubed_precision",
    "bcubed_recall",
    "bcubed_f1",
}


def test_labels_csv_writes_eval_and_label_column(
    fake: str, hues: dict[str, list[Path]], tmp_path: Path
) -> None:
    truth = {p.name: hue for hue, paths in hues.items() for p in paths}
    labels = tmp_path / "labels.csv"
    labels.write_text("filename,label\n" + "".join(f"{n},{h}\n" for n, h in truth.items()))
    out = tmp_path / "out"

    code = cluster("-i", tmp_path / "crops", "--recursive", "-o", out, "-e", fake,
                   "--labels", labels, "-sl", "-x", "4")  # fmt: skip

    assert code == 0
    scores = json.loads((out / "eval.json").read_text())
    assert set(scores) == EVAL_KEYS
    assert (scores["n_items"], scores["n_labels"], scores["n_clusters"]) == (8, 4, 4)
    assert scores["purity"] == scores["ari"] == scores["bcubed_f1"] == 1.0
    with open(out / "clusters.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert {Path(r["filename"]).name: r["label"] for r in table} == truth


def test_labels_from_folders(fake: str, hues: dict[str, list[Path]], tmp_path: Path) -> None:
    # Mislabel one crop by moving it: evaluation must see the folder, not the colour.
    moved = hues["red"][0].rename(hues["green"][0].parent / "red0.png")
    out = tmp_path / "out"

    code = cluster("-i", tmp_path / "crops", "--recursive", "-o", out, "-e", fake,
                   "--labels-from-folders")  # fmt: skip

    assert code == 0
    scores = json.loads((out / "eval.json").read_text())
    assert scores["n_items"] == 8 and scores["n_labels"] == 4
    assert scores["purity"] == pytest.approx(7 / 8)
    names = [n for n, _ in rows_of(out)]
    assert str(moved) in names
    assert "label" not in (out / "clusters.csv").read_text().splitlines()[0]


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SimSummary]:
    """A seeded 6-frame simulated session in flat-bug's per-frame layout."""
    root = tmp_path_factory.mktemp("sim") / "session"
    return root, simulate(SimConfig(seed=1, frames=6, mean_present=6, behaviour="classic"), root)


def frames_of(names: Sequence[str]) -> list[str]:
    parsed = [parse_crop_name(n) for n in names]
    assert all(p is not None for p in parsed)
    return [p.frame for p in parsed if p is not None]


def shares_a_frame(rows: Sequence[tuple[str, int]]) -> bool:
    return any(len(set(frames_of(members))) < len(members) for members in groups(rows).values())


def test_simulated_session_cosine_and_track(
    fake: str, sim: tuple[Path, SimSummary], tmp_path: Path
) -> None:
    root, summary = sim
    crops = sorted(str(p) for p in root.glob("*/crops/*.png"))
    assert len(crops) == summary.crops > 0
    common: list[str | Path] = [
        "-i", root, "--recursive", "-mf", root, "--time_format", TIME_FORMAT,
        "--labels", summary.labels_path, "-e", fake, "-th", "0.9",
    ]  # fmt: skip

    cos, track = tmp_path / "cosine", tmp_path / "track"
    assert cluster(*common, "-o", cos) == 0
    assert cluster(*common, "-o", track, "-c", "track") == 0

    for out in (cos, track):
        assert [n for n, _ in rows_of(out)] == crops
        scores = json.loads((out / "eval.json").read_text())
        assert scores["n_items"] == summary.crops
        assert scores["n_labels"] == summary.individuals
    # The crude colour embedder does join crops of one frame under cosine, so the
    # track check below is not vacuous.
    assert shares_a_frame(rows_of(cos))
    assert not shares_a_frame(rows_of(track))
    assert any(len(m) > 1 for m in groups(rows_of(track)).values())

    # Track re-clustering from embeddings reads frames and times back from the names.
    again = tmp_path / "again"
    code = cluster("--from-embeddings", cos / "embeddings.pkl", "-o", again, "-c", "track",
                   "-th", "0.9", "-mf", root, "--time_format", TIME_FORMAT)  # fmt: skip
    assert code == 0
    assert (again / "clusters.csv").read_bytes() == (track / "clusters.csv").read_bytes()


# --- cluster folders ------------------------------------------------------------------------


def test_dedup_holds_one_crop_per_cluster(
    fake: str, hues: dict[str, list[Path]], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert cluster("-i", tmp_path / "crops", "--recursive", "-o", out, "-e", fake, "-kp") == 0

    rows = rows_of(out)
    clusters = groups(rows)
    found = tree_files(out / "dedup")
    top = {rel: p for rel, p in found.items() if "/" not in rel}
    multi = {cid: members for cid, members in clusters.items() if len(members) > 1}
    assert len(multi) == 3 and len(top) == len(multi)
    for rel, path in top.items():
        cid_text, _, basename = rel.partition("_")
        members = multi[int(cid_text)]
        source = next(Path(m) for m in members if Path(m).name == basename)
        assert path.stat().st_ino == source.stat().st_ino
    singles = {f"{NOT_CLUSTERED}/{Path(m[0]).name}" for m in clusters.values() if len(m) == 1}
    assert set(found) - set(top) == singles == {f"{NOT_CLUSTERED}/yellow0.png"}
    assert not (out / "clusters").exists()


# --- simulate, embedder names, help ------------------------------------------------------


def test_simulate_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert cli.main(["simulate", "-o", str(out), "--frames", "3"]) == 0

    frames = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(frames) == 3
    with open(out / "labels.csv", newline="") as fh:
        labelled = [row["filename"] for row in csv.DictReader(fh)]
    crops = sorted(p.name for p in out.glob("*/crops/*.png"))
    assert sorted(labelled) == crops and crops
    assert set(frames_of(crops)) <= set(frames)
    for frame in frames:
        assert len(list((out / frame).glob("metadata_*.json"))) == 1
    assert "simulated 3 frames" in capsys.readouterr().out


def test_simulate_refuses_a_non_empty_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    assert cli.main(["simulate", "-o", str(tmp_path), "--frames", "1"]) == 2
    assert "empty" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_cli_embedder_names_match_the_registry() -> None:
    # Only the package's own embedders: tests may register fakes of their own.
    builtin = [
        name
        for name in embed.available_embedders()
        if embed.EMBEDDERS[name].__module__.startswith("crop_clusterd.")
    ]
    assert sorted(engine_defaults.EMBEDDER_NAMES) == builtin
    assert engine_defaults.EMBEDDER_NAMES[0] == embed.DEFAULT_EMBEDDER == EmbedConfig().model


def test_cluster_help_is_accurate(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Wide enough that argparse never wraps a line (it breaks at hyphens).
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["cluster", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())

    for flag in ("-i", "-o", "-mf", "--time_format", "-d", "-e", "-fp", "-kp", "-gs", "-c",
                 "-th", "-se", "-sl", "-x", "--from-embeddings", "--labels",
                 "--labels-from-folders", "--recursive", "--config", "--check-config"):  # fmt: skip
        assert f" {flag} " in f" {text} " or f" {flag}," in text, flag
    for name in engine_defaults.EMBEDDER_NAMES:
        assert name in text
    defaults = InputConfig(), EmbedConfig(), OutputConfig()
    assert f"default: {defaults[1].model}" in text
    assert f"'{defaults[0].time_format}', the default" in text
    assert f"default {defaults[1].batch_size})" in text
    assert f"default {defaults[0].workers})" in text
    assert f"default {defaults[0].background})" in text
    assert f"'{defaults[2].folder}'" in text
    assert f"{COSINE_THRESHOLD:g} for cosine" in text
    assert "singletons in dedup/not-clustered/" in text
    assert "singletons in clusters/not-clustered/" in text
    assert "embeddings.pkl (not when re-clustering --from-embeddings)" in text


# --- run and status -------------------------------------------------------------------


def test_run_check_config_prints_the_merged_daemon_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[watch]\nsettle_ms = 900\n[state]\nfolder = '/srv/state'\n")
    code = cli.main(
        ["run", "--config", str(config), "--watch", str(tmp_path / "w"), "--check-config"]
    )
    assert code == 0
    printed = tomllib.loads(capsys.readouterr().out)
    assert printed["watch"]["settle_ms"] == 900
    assert printed["watch"]["folder"] == str(tmp_path / "w")  # the flag wins
    assert printed["state"]["folder"] == "/srv/state"


def test_run_check_config_explains_a_typo(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[watch]\nsettle_msec = 900\n[snapshot]\ninterval_s = 0\n")
    assert cli.main(["run", "--config", str(config), "--check-config"]) == 2
    err = capsys.readouterr().err
    assert "watch.settle_msec" in err and "settle_ms" in err
    assert "snapshot.interval_s: must be > 0" in err


def test_status_without_state_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["status", "--state", str(tmp_path / "none")]) == 1
    assert "none" in capsys.readouterr().err


def test_run_then_status_reports_the_stopped_daemon(
    tmp_path: Path, colour_embedder_cli: None, capsys: pytest.CaptureFixture[str]
) -> None:
    watch = tmp_path / "watch"
    for i, rgb in enumerate((*RED, BLUE[0])):
        # flat-bug's layout: one folder per frame, named like the frame (one trap).
        frame = f"2024070122000{i}"
        write_png(watch / frame / f"crop_{frame}_CROPNUMBER_0_UUID_A.png", rgb)
    from crop_clusterd.supervisor import Daemon

    config = cli.config_from_args(
        cli.build_parser().parse_args(
            ["run", "--watch", str(watch), "--state", str(tmp_path / "state"),
             "-o", str(tmp_path / "out"), "-th", "0.99"]
        )
    )  # fmt: skip
    config = config.__class__(
        **{**config.__dict__, "embed": EmbedConfig(model="colour-test", max_wait_ms=20)}
    )
    summary = Daemon(config, exit_when_idle_s=0.5).run()
    assert (summary.crops, summary.clusters) == (4, 2)
    capsys.readouterr()  # the daemon's log lines (structlog prints when unconfigured)
    assert cli.main(["status", "--state", str(tmp_path / "state"), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["crops"] == 4 and status["clusters"] == 2
    assert status["phase"] == "stopped"


@pytest.fixture
def colour_embedder_cli() -> Iterator[None]:
    register(ColourEmbedder)
    yield
    unregister(ColourEmbedder.name)


def _catches_sigterm(pid: int) -> bool:
    """Whether the process has a SIGTERM handler installed (Linux /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & (1 << (15 - 1)))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_sigterm_while_starting_up_stops_cleanly(tmp_path: Path) -> None:
    import signal
    import time

    watch = tmp_path / "watch"
    write_png(watch / "f" / "crop_20240701220000_CROPNUMBER_0_UUID_A.png", RED[0])
    child = subprocess.Popen(
        [sys.executable, "-m", "crop_clusterd.cli", "run", "--watch", str(watch),
         "--state", str(tmp_path / "state"), "-o", str(tmp_path / "out"),
         "--log-format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not _catches_sigterm(child.pid):
        assert child.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    # Most likely still importing torch: long before the daemon's own handlers.
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err[-2000:]
    assert "SIGTERM during start-up" in err
    assert "crops ->" in out


# --- flags as data --------------------------------------------------------------------


def test_a_flag_overrides_the_file_and_keeps_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[embed]\nbatch_size = 16\ndevice = 'cpu'\n[link]\nthreshold = 0.8\n")
    argv = ["cluster", "--config", str(config), "--batch-size", "4", "-o", str(tmp_path / "o")]
    assert cli.main([*argv, "--check-config"]) == 0
    printed = tomllib.loads(capsys.readouterr().out)
    assert printed["embed"]["batch_size"] == 4  # the flag wins
    assert printed["embed"]["device"] == "cpu"  # the file's other keys stay
    assert printed["link"]["threshold"] == 0.8
    assert printed["output"]["folder"] == str(tmp_path / "o")


@pytest.mark.parametrize(
    ("argv", "expected", "flag"),
    [
        (["cluster", "--batch-size", "0"], "embed.batch_size: must be >= 1, got an integer (0)",
         "--batch-size"),
        (["cluster", "-th", "2"], "link.threshold: must be in [-1, 1], got a float (2.0)",
         "--threshold"),
        (["cluster", "--background", "grey"], "input.background: must be a colour",
         "--background"),
        (["run", "--time_format", "plain"], "input.time_format: must contain a % time",
         "--time_format"),
        (["run", "--batch-size", "-3"], "embed.batch_size: must be >= 1, got an integer (-3)",
         "--batch-size"),
    ],
)  # fmt: skip
def test_a_bad_flag_value_gets_the_files_error_and_names_the_flag(
    argv: list[str], expected: str, flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main([*argv, "--check-config"]) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert f"(from {flag})" in err


@pytest.mark.parametrize("command", ["cluster", "run"])
def test_every_flag_is_in_its_table_or_is_no_setting(command: str) -> None:
    not_settings = {
        "cluster": {"help", "input", "config", "check_config", "from_embeddings", "labels",
                    "labels_from_folders", "num_classes", "gallery"},
        "run": {"help", "config", "check_config", "exit_when_idle"},
    }[command]  # fmt: skip
    sub = cli.build_parser()._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr,index]
    dests = {a.dest for a in sub._actions if a.option_strings}
    table = cli.FLAG_TABLES[command]
    assert dests == set(table) | not_settings
    known = {f"{s}.{f.name}" for s in Config.__dataclass_fields__ for f in fields_of(s)}
    assert set(table.values()) <= known


def fields_of(section: str) -> tuple[dataclasses.Field[Any], ...]:
    return dataclasses.fields(getattr(Config(), section))
