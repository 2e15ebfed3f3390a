"""The cluster gallery's data files (issue 12): content, blocks rewritten only when changed."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fakes import ColourEmbedder
from test_session_daemon import NIGHTS, daemon_over_two_nights, night_rows

from crop_clusterd.embed import register, unregister
from crop_clusterd.gallery import (
    BLOCK,
    GALLERY_DIR,
    INDEX_HTML,
    GalleryCrops,
    GalleryWriter,
    cluster_rows,
)
from crop_clusterd.summary import summarize
from crop_clusterd.thumbs import thumb_name

T0 = 1_719_871_200.0  # 2024-07-01 22:00 local capture time


@pytest.fixture(autouse=True)
def colour_embedder() -> Iterator[None]:
    register(ColourEmbedder)
    yield
    unregister(ColourEmbedder.name)


def crops_of(clusters: list[int], times: list[float], frames: list[str | None]) -> GalleryCrops:
    names = [f"night/f{f}/crop_{i}.png" for i, f in enumerate(frames)]
    return GalleryCrops(
        names, np.array(clusters, dtype=np.int64), np.array(times, dtype=np.float64), frames
    )


def read_script(path: Path, call: str) -> Any:
    text = path.read_text(encoding="ascii")
    assert text.startswith(f"{call}(") and text.endswith(");\n")
    return json.loads(text[len(call) + 1 : -3])


def page_clusters(folder: Path) -> dict[int, list[Any]]:
    """Every cluster row the page would load: the index's blocks, in order."""
    index = read_script(folder / GALLERY_DIR / "index.js", "galleryIndex")
    assert isinstance(index, dict)
    out: dict[int, list[Any]] = {}
    for k, _ in index["blocks"]:
        block = read_script(folder / GALLERY_DIR / f"block-{k}.js", "galleryBlock")
        assert isinstance(block, list) and block[0] == k
        for row in block[1]:
            assert row[0] // BLOCK == k
            out[row[0]] = row
    return out


def test_rows_count_crops_frames_and_order_members_by_time() -> None:
    crops = crops_of([5, 5, 5, 9], [T0 + 60, T0, math.nan, T0 + 5], ["a", "b", "b", None])
    rows = cluster_rows(crops)
    assert set(rows) == {5, 9}
    cid, n, frames, first, last, members, track = rows[5]
    assert track is None, "no boxes, no track"
    assert (cid, n, frames) == (5, 3, 2)
    assert (first, last) == ("2024-07-01T22:00:00", "2024-07-01T22:01:00")
    assert isinstance(members, list)
    assert [m[0] for m in members] == [crops.names[1], crops.names[0], crops.names[2]]
    assert members[0][1] == thumb_name(crops.names[1]) and members[2][2] is None
    assert rows[9][1:3] == [1, 1], "a crop without a frame is a frame of its own"


def test_the_track_follows_capture_order_in_the_most_common_frame_size() -> None:
    nan = math.nan
    boxes = np.array(
        [
            [100.4, 50.0, 4000, 3000],
            [10.0, 20.0, 4000, 3000],
            [nan, nan, 4000, 3000],  # no box: not in the track
            [30.0, 40.6, 2000, 1500],
            [7.0, 8.0, nan, nan],
        ]
    )
    times = [T0 + 2, T0, T0 + 1, T0 + 3, T0 + 4]
    base = crops_of([1, 1, 1, 1, 2], times, ["a", "b", "c", "d", "e"])
    rows = cluster_rows(GalleryCrops(base.names, base.clusters, base.times, base.frames, boxes))
    assert rows[1][6] == [4000, 3000, [10, 20, 100, 50, 30, 41]]
    assert rows[2][6] == [None, None, [7, 8]], "frame size unknown: the page uses the extent"


def write(writer: GalleryWriter, folder: Path, crops: GalleryCrops) -> int:
    summary = summarize("s", crops.clusters, crops.times)
    return writer.write(folder, crops, summary, title="s")


def test_only_changed_blocks_are_rewritten(tmp_path: Path) -> None:
    clusters = [0, 0, BLOCK + 3, 2 * BLOCK]
    frames: list[str | None] = ["a", "b", "c", "d"]
    crops = crops_of(clusters, [T0, T0 + 1, T0 + 2, T0 + 3], frames)
    writer = GalleryWriter()
    assert write(writer, tmp_path, crops) == 3
    assert (tmp_path / INDEX_HTML).is_file() and (tmp_path / GALLERY_DIR / "gallery.js").is_file()
    assert {c: r[1] for c, r in page_clusters(tmp_path).items()} == {
        0: 2,
        BLOCK + 3: 1,
        2 * BLOCK: 1,
    }
    data = tmp_path / GALLERY_DIR
    inodes = {p.name: p.stat().st_ino for p in data.iterdir()}
    assert write(writer, tmp_path, crops) == 0
    assert {p.name: p.stat().st_ino for p in data.iterdir()} == inodes, "nothing changed"
    # Cluster BLOCK+3 grows; the cluster of block 2 merges into cluster 0.
    grown = crops_of(
        [*clusters[:3], 0, BLOCK + 3], [T0, T0 + 1, T0 + 2, T0 + 3, T0 + 4], [*frames, "e"]
    )
    assert write(writer, tmp_path, grown) == 2
    after = {p.name: p.stat().st_ino for p in data.iterdir()}
    assert "block-2.js" not in after, "a block whose clusters all merged away goes"
    assert after["gallery.js"] == inodes["gallery.js"]
    assert {c: r[1] for c, r in page_clusters(tmp_path).items()} == {0: 3, BLOCK + 3: 2}
    # A restart (a new writer) rewrites no block that is still the same.
    assert write(GalleryWriter(), tmp_path, grown) == 0


def test_a_crop_name_cannot_close_the_script(tmp_path: Path) -> None:
    crops = GalleryCrops(["a</script><b>é.png"], np.array([0]), np.array([T0]), [None])
    write(GalleryWriter(), tmp_path, crops)
    block = (tmp_path / GALLERY_DIR / "block-0.js").read_bytes()
    assert b"</" not in block
    assert page_clusters(tmp_path)[0][5] == [
        ["a</script><b>é.png", thumb_name(crops.names[0]), "2024-07-01T22:00:00"]
    ]


def test_the_daemon_writes_each_nights_gallery(tmp_path: Path) -> None:
    config = daemon_over_two_nights(tmp_path)
    for night in NIGHTS:
        folder = config.output.folder / night
        live = night_rows(config, night)
        rows = page_clusters(folder)
        assert set(rows) == {c for _, c in live}
        members = {m[0]: c for c, r in rows.items() for m in r[5]}
        assert members == dict(live)
        assert all((folder / "thumbs" / m[1]).is_file() for r in rows.values() for m in r[5])
        # The simulator writes flat-bug metadata: every crop has a box on its track.
        assert all(r[6] is not None and len(r[6][2]) == 2 * r[1] for r in rows.values())


def test_a_snapshot_rebuilds_only_the_rows_of_clusters_that_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from crop_clusterd import gallery

    built: list[set[int]] = []
    real = gallery.cluster_rows

    def spy(crops: GalleryCrops) -> dict[int, list[object]]:
        rows = real(crops)
        built.append(set(rows))
        return rows

    monkeypatch.setattr(gallery, "cluster_rows", spy)
    clusters = [0, 0, 1, 2, 3]
    times = [T0, T0 + 1, T0 + 2, T0 + 3, T0 + 4]
    frames: list[str | None] = ["a", "b", "c", "d", "e"]
    writer = GalleryWriter()
    write(writer, tmp_path, crops_of(clusters, times, frames))
    assert built == [{0, 1, 2, 3}]
    write(writer, tmp_path, crops_of([*clusters, 2], [*times, T0 + 5], [*frames, "f"]))
    assert built[1:] == [{2}], "only the cluster that grew"
    # Same members by count, but one renamed (a move) and one with a new time.
    moved = crops_of([*clusters, 2], [*times, T0 + 5], [*frames, "f"])
    names = list(moved.names)
    names[0] = "elsewhere/" + names[0]
    moved_times = moved.times.copy()
    moved_times[3] += 1.0
    write(writer, tmp_path, GalleryCrops(names, moved.clusters, moved_times, moved.frames))
    assert built[2:] == [{0, 2}]
    assert (
        page_clusters(tmp_path)[0][5][0][0]
        == "elsewhere/" + crops_of(clusters, times, frames).names[0]
    )
