"""``cluster --gallery`` and ``crop-clusterd gallery OUT`` (issue 12)."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes import ColourEmbedder
from test_gallery import page_clusters

from crop_clusterd import cli
from crop_clusterd import defaults as engine_defaults
from crop_clusterd.activity import ACTIVITY_CSV, ACTIVITY_PNG
from crop_clusterd.csvfiles import read_clusters_csv
from crop_clusterd.embed import register, unregister
from crop_clusterd.gallery import INDEX_HTML
from crop_clusterd.simulate import SimConfig, simulate
from crop_clusterd.thumbs import THUMBS_DIR, thumb_name

pytestmark = pytest.mark.usefixtures("restore_logging")


@pytest.fixture(autouse=True)
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    register(ColourEmbedder)
    monkeypatch.setattr(
        engine_defaults, "EMBEDDER_NAMES", (*engine_defaults.EMBEDDER_NAMES, ColourEmbedder.name)
    )
    yield ColourEmbedder.name
    unregister(ColourEmbedder.name)


def test_cluster_gallery_then_gallery_again_makes_no_thumbnail_twice(
    tmp_path: Path, fake: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "session"
    simulate(SimConfig(seed=3, frames=4, mean_present=5, behaviour="classic"), root)
    out = tmp_path / "out"
    args = ["cluster", "-i", str(root), "--recursive", "-o", str(out), "-e", fake]
    assert cli.main([*args, "--gallery", "--log-level", "error"]) == 0
    rows = read_clusters_csv(out / "clusters.csv")
    page = out / INDEX_HTML
    assert str(page) in capsys.readouterr().out, "the command says where the page is"
    clusters = page_clusters(out)
    assert set(clusters) == {c for _, c in rows}
    assert {m[0]: c for c, r in clusters.items() for m in r[5]} == dict(rows)
    assert all(r[3] is not None for r in clusters.values()), "times read from the names"
    thumbs = out / THUMBS_DIR
    assert {p.name for p in thumbs.iterdir()} == {thumb_name(n) for n, _ in rows}
    activity = list(csv.DictReader((out / ACTIVITY_CSV).open()))
    assert sum(int(r["crops"]) for r in activity) == len(rows)
    assert (out / ACTIVITY_PNG).stat().st_size > 0
    made = {p: p.stat().st_mtime_ns for p in thumbs.iterdir()}

    assert cli.main(["gallery", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in thumbs.iterdir()} == made


def test_gallery_of_a_folder_without_clusters_fails_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["gallery", str(tmp_path)]) == 1
    assert "no clusters.csv" in capsys.readouterr().err
