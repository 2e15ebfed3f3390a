"""Tests for the batch command's driver, ``run_batch``, on small synthetic crops.

A colour embedder (a test-only registered ``Embedder``) stands in for a vision model:
solid-colour crops of one hue embed almost identically, so the expected clusters are
known by construction and each run takes milliseconds.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fakes import BLUE, GREEN, ORANGE, RED, YELLOW, ColourEmbedder, write_png
from PIL import Image

from crop_clusterd.batch import EVAL_JSON, BatchRequest, run_batch
from crop_clusterd.config import Config, EmbedConfig, InputConfig, LinkConfig, OutputConfig
from crop_clusterd.csvfiles import CLUSTERS_CSV, ERRORS_CSV, read_clusters_csv
from crop_clusterd.embed import register, unregister
from crop_clusterd.embfile import EMBEDDINGS_PKL
from crop_clusterd.inputs import InputError

FAKE = ColourEmbedder.name


@pytest.fixture(scope="module", autouse=True)
def _colour_embedder() -> Iterator[None]:
    register(ColourEmbedder)
    yield
    unregister(FAKE)


def config(out: Path, **link: object) -> Config:
    """A config using the colour embedder on CPU, writing to ``out``."""
    return Config(
        input=InputConfig(workers=1),
        embed=EmbedConfig(model=FAKE, device="cpu", batch_size=4),
        link=LinkConfig(**link),  # type: ignore[arg-type]
        output=OutputConfig(folder=out),
    )


def rows_of(out: Path) -> list[tuple[str, int]]:
    return read_clusters_csv(out / CLUSTERS_CSV)


def groups(rows: Sequence[tuple[str, int]]) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for name, cluster in rows:
        out.setdefault(cluster, set()).add(name)
    return out


def partition(rows: Sequence[tuple[str, int]]) -> set[frozenset[str]]:
    return {frozenset(members) for members in groups(rows).values()}


@pytest.fixture
def interleaved(tmp_path: Path) -> dict[str, list[Path]]:
    """Crops of four hues whose sorted names interleave the hues."""
    folder = tmp_path / "crops"
    spec = [
        ("a", "red", RED[0]),
        ("b", "green", GREEN[0]),
        ("c", "red", RED[1]),
        ("d", "blue", BLUE[0]),
        ("e", "green", GREEN[1]),
        ("f", "yellow", YELLOW),
        ("g", "red", RED[2]),
        ("h", "blue", BLUE[1]),
        ("i", "green", GREEN[2]),
    ]
    by_hue: dict[str, list[Path]] = {}
    for prefix, hue, rgb in spec:
        by_hue.setdefault(hue, []).append(write_png(folder / f"{prefix}_{hue}.png", rgb))
    return by_hue


def test_clusters_match_hues_and_ids_are_smallest_member_row(
    tmp_path: Path, interleaved: dict[str, list[Path]]
) -> None:
    files = [p for paths in interleaved.values() for p in paths]
    out = tmp_path / "out"
    # Given out of order: the run itself must sort them.
    request = BatchRequest(config(out), inputs=tuple(str(p) for p in reversed(files)))
    result = run_batch(request)

    rows = rows_of(out)
    names = [name for name, _ in rows]
    assert names == sorted(str(p) for p in files)
    assert partition(rows) == {frozenset(str(p) for p in ps) for ps in interleaved.values()}
    for cluster, members in groups(rows).items():
        assert cluster == min(names.index(m) for m in members)
    assert (result.n_crops, result.n_clusters, result.n_singletons) == (9, 4, 1)
    assert result.method == "cosine" and result.threshold == 0.9
    assert result.skipped == ()


def test_bad_files_are_skipped_with_reasons_and_ids_follow_kept_rows(tmp_path: Path) -> None:
    folder = tmp_path / "crops"
    good = {
        "a_red.png": RED[0],
        "c_green.png": GREEN[0],
        "e_red.png": RED[1],
        "g_green.png": GREEN[1],
        "i_blue.png": BLUE[0],
    }
    for name, rgb in good.items():
        write_png(folder / name, rgb)
    (folder / "b_text.png").write_text("hello, I am not a picture\n")
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")
    (folder / "d_truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "f_empty.png").write_bytes(b"")
    out = tmp_path / "out"

    result = run_batch(BatchRequest(config(out), inputs=(str(folder),)))

    reasons = {Path(s.name).name: s.reason for s in result.skipped}
    assert reasons == {
        "b_text.png": "not an image",
        "d_truncated.png": "truncated image",
        "f_empty.png": "empty file",
    }
    with open(out / ERRORS_CSV, newline="") as fh:
        errors = list(csv.reader(fh))
    assert errors[0] == ["filename", "reason"]
    assert {Path(n).name: r for n, r in errors[1:]} == reasons
    rows = rows_of(out)
    assert [Path(n).name for n, _ in rows] == sorted(good)
    # Ids index the rows of clusters.csv, not the input list with its bad files.
    names = [n for n, _ in rows]
    for cluster, members in groups(rows).items():
        assert cluster == min(names.index(m) for m in members)
    assert result.n_crops == 5 and result.n_clusters == 3


def test_names_with_comma_quote_and_space_round_trip(tmp_path: Path) -> None:
    folder = tmp_path / 'odd, "quoted" dir'
    nasty = write_png(folder / 'crop, "one" 1.png', RED[0])
    plain = write_png(folder / "crop2.png", RED[1])
    other = write_png(folder / "it's green.png", GREEN[0])
    out = tmp_path / "out"
    cfg = config(out)
    cfg = replace(cfg, output=replace(cfg.output, gen_cluster_dirs=True))

    run_batch(BatchRequest(cfg, inputs=(str(folder),)))

    rows = rows_of(out)
    assert [n for n, _ in rows] == sorted(str(p) for p in (nasty, plain, other))
    assert partition(rows) == {frozenset({str(nasty), str(plain)}), frozenset({str(other)})}
    cluster = dict(rows)[str(nasty)]
    linked = out / "clusters" / str(cluster) / nasty.name
    assert linked.stat().st_ino == nasty.stat().st_ino


def test_from_embeddings_reclusters_without_a_model(tmp_path: Path) -> None:
    folder = tmp_path / "crops"
    for i, rgb in enumerate((*RED, ORANGE, *GREEN)):
        write_png(folder / f"crop{i}.png", rgb)
    loose, strict = tmp_path / "loose", tmp_path / "strict"
    run_batch(BatchRequest(config(loose, threshold=0.9), inputs=(str(folder),)))
    run_batch(BatchRequest(config(strict, threshold=0.99), inputs=(str(folder),)))
    # The thresholds must give different answers, or this test could not tell them apart.
    assert partition(rows_of(loose)) != partition(rows_of(strict))

    loads = ColourEmbedder.loads
    again = tmp_path / "again"
    result = run_batch(
        BatchRequest(config(again, threshold=0.99), from_embeddings=loose / EMBEDDINGS_PKL)
    )

    assert ColourEmbedder.loads == loads
    assert (again / CLUSTERS_CSV).read_bytes() == (strict / CLUSTERS_CSV).read_bytes()
    assert result.threshold == 0.99 and result.n_crops == 7
    # Re-clustering never rewrites the embeddings it read.
    assert not (again / EMBEDDINGS_PKL).exists()


def test_labels_from_folders_also_work_from_embeddings(tmp_path: Path) -> None:
    root = tmp_path / "labelled"
    for hue, shades in (("red", RED), ("green", GREEN), ("blue", BLUE)):
        for i, rgb in enumerate(shades):
            write_png(root / hue / f"{hue}{i}.png", rgb)
    first = tmp_path / "first"
    cfg = config(first)
    cfg = replace(cfg, input=replace(cfg.input, recursive=True))
    direct = run_batch(BatchRequest(cfg, inputs=(str(root),), labels_from_folders=True))
    assert direct.evaluation is not None
    assert (direct.evaluation.n_items, direct.evaluation.n_labels) == (8, 3)
    assert direct.evaluation.ari == pytest.approx(1.0)

    second = tmp_path / "second"
    again = run_batch(
        BatchRequest(
            config(second), from_embeddings=first / EMBEDDINGS_PKL, labels_from_folders=True
        )
    )
    assert again.evaluation == direct.evaluation
    assert json.loads((second / EVAL_JSON).read_text()) == direct.evaluation.to_dict()


def test_nothing_to_cluster_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image files found"):
        run_batch(BatchRequest(config(tmp_path / "out"), inputs=(str(tmp_path / "empty"),)))


def test_all_files_bad_gives_empty_outputs(tmp_path: Path) -> None:
    folder = tmp_path / "crops"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    (folder / "b.png").write_text("text")
    out = tmp_path / "out"

    result = run_batch(BatchRequest(config(out), inputs=(str(folder),)))

    assert (result.n_crops, result.n_clusters, len(result.skipped)) == (0, 0, 2)
    assert rows_of(out) == []
    assert len((out / ERRORS_CSV).read_text().splitlines()) == 3
