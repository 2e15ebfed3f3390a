"""Gallery thumbnails (issue 12): one per crop, made at commit, never made again."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fakes import ColourEmbedder, write_png
from PIL import Image
from test_session_daemon import NIGHTS, daemon_over_two_nights, night_rows

from crop_clusterd.embed import register, unregister
from crop_clusterd.records import CommittedCrop, Crop, Embedded
from crop_clusterd.supervisor import Daemon
from crop_clusterd.thumbs import (
    THUMB_PX,
    THUMBS_DIR,
    ThumbWriter,
    make_thumbnail,
    make_thumbnails,
    thumb_name,
)


@pytest.fixture(autouse=True)
def colour_embedder() -> Iterator[None]:
    register(ColourEmbedder)
    yield
    unregister(ColourEmbedder.name)


def rgba_crop(path: Path, size: tuple[int, int]) -> Path:
    """Left half opaque red, right half fully transparent (green under the alpha)."""
    pixels = np.zeros((size[1], size[0], 4), dtype=np.uint8)
    pixels[..., 1] = 255
    half = size[0] // 2
    pixels[:, :half] = (255, 0, 0, 255)
    Image.fromarray(pixels, "RGBA").save(path)
    return path


def test_thumbnail_is_small_and_transparency_is_the_background(tmp_path: Path) -> None:
    src = rgba_crop(tmp_path / "crop.png", (400, 200))
    dst = tmp_path / "t.jpg"
    assert make_thumbnail(src, dst, background=(0, 0, 255))
    with Image.open(dst) as thumb:
        assert thumb.format == "JPEG"
        assert thumb.size == (THUMB_PX, THUMB_PX // 2)
        rgb = np.asarray(thumb.convert("RGB")).astype(int)
    # JPEG is lossy: compare away from the edge between the halves.
    assert np.abs(rgb[:, 5] - (255, 0, 0)).max() < 40
    assert np.abs(rgb[:, -5] - (0, 0, 255)).max() < 40, "hidden green must not show"


def test_small_crops_are_not_enlarged(tmp_path: Path) -> None:
    src = write_png(tmp_path / "small.png", (10, 200, 30), size=(30, 20))
    dst = tmp_path / "t.jpg"
    make_thumbnail(src, dst)
    with Image.open(dst) as thumb:
        assert thumb.size == (30, 20)


def test_a_thumbnail_is_made_again_only_for_a_new_version_of_its_crop(tmp_path: Path) -> None:
    src = write_png(tmp_path / "a.png", (200, 10, 10), size=(50, 50))
    dst = tmp_path / "t.jpg"
    assert make_thumbnail(src, dst)
    old = dst.read_bytes()
    assert not make_thumbnail(src, dst), "the same crop: never made again"
    dst.write_bytes(b"")  # what a power cut may leave
    assert make_thumbnail(src, dst)
    assert dst.read_bytes() == old
    # Rewritten under the same name, even with an older time (rsync -a keeps the
    # sender's): a new picture, so a new thumbnail.
    before = src.stat().st_mtime_ns
    write_png(src, (10, 10, 200), size=(50, 50))
    os.utime(src, ns=(before - 10**9, before - 10**9))
    assert make_thumbnail(src, dst)
    assert thumb_colour(dst) == pytest.approx((10, 10, 200), abs=30)


def thumb_colour(path: Path) -> tuple[float, ...]:
    with Image.open(path) as thumb:
        return tuple(np.asarray(thumb.convert("RGB")).reshape(-1, 3).mean(axis=0).tolist())


def test_make_thumbnails_names_by_crop_name_and_counts_failures(tmp_path: Path) -> None:
    good = write_png(tmp_path / "good.png", (1, 2, 3))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    folder = tmp_path / "session"
    count = make_thumbnails(folder, [("x/good.png", good), ("bad.png", bad)])
    assert (count.written, count.failed) == (1, 1)
    assert sorted(p.name for p in (folder / THUMBS_DIR).iterdir()) == [thumb_name("x/good.png")]
    assert thumb_name("x/good.png") != thumb_name("good.png")


def committed(path: Path, name: str, local: int) -> CommittedCrop:
    item = Embedded(Crop(path=path, name=name), np.zeros(4, dtype=np.float32))
    return CommittedCrop(item, seq=local, cluster=0, local=local)


def test_writer_puts_thumbs_in_the_session_folder(tmp_path: Path) -> None:
    src = write_png(tmp_path / "a.png", (9, 9, 9))
    out = tmp_path / "out"
    writer = ThumbWriter(out)
    writer("2024-07-01", [committed(src, "a.png", 0)])
    writer("all", [committed(src, "b.png", 0)])
    assert (out / "2024-07-01" / THUMBS_DIR / thumb_name("a.png")).is_file()
    assert (out / THUMBS_DIR / thumb_name("b.png")).is_file(), "split none: out itself"


def test_writer_does_not_raise_when_the_disk_refuses(tmp_path: Path) -> None:
    src = write_png(tmp_path / "a.png", (9, 9, 9))
    out = tmp_path / "out"
    out.write_text("a file where the output folder should be")
    ThumbWriter(out)("s", [committed(src, "a.png", 0)])  # logged, not raised
    assert out.read_text().startswith("a file")


def test_the_daemon_makes_one_thumb_per_committed_crop_once(tmp_path: Path) -> None:
    config = daemon_over_two_nights(tmp_path)
    made: dict[Path, int] = {}
    for night in NIGHTS:
        thumbs = config.output.folder / night / THUMBS_DIR
        expected = {thumb_name(name) for name, _ in night_rows(config, night)}
        assert expected and {p.name for p in thumbs.iterdir()} == expected
        made |= {p: p.stat().st_mtime_ns for p in thumbs.iterdir()}
    # A restart that finds nothing new makes nothing again.
    Daemon(config, exit_when_idle_s=1.0).run()
    assert {p: p.stat().st_mtime_ns for p in made} == made


def test_a_crop_rewritten_between_runs_gets_a_new_thumbnail(tmp_path: Path) -> None:
    config = daemon_over_two_nights(tmp_path)
    night = NIGHTS[0]
    name = night_rows(config, night)[0][0]
    crop = Path(name) if Path(name).is_absolute() else config.watch.folder / name
    thumb = config.output.folder / night / THUMBS_DIR / thumb_name(name)
    assert thumb_colour(thumb) != pytest.approx((250, 250, 5), abs=30)
    # As a copy tool does: a new file renamed over the old one.
    with Image.open(crop) as old:
        size = old.size
    write_png(crop.parent / f"new-{crop.name}", (250, 250, 5), size=size).replace(crop)
    Daemon(config, exit_when_idle_s=1.0).run()
    assert thumb_colour(thumb) == pytest.approx((250, 250, 5), abs=30)
