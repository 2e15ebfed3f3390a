"""Tests for crop_clusterd.images: decoding every pixel mode, and every way to fail."""

from __future__ import annotations

import importlib.util
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crop_clusterd.images import DecodeError, load_rgb, parse_color

BG = (128, 128, 128)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def _png_bytes(
    width: int,
    height: int,
    *,
    color_type: int,
    bit_depth: int,
    raw: bytes | None = None,
    extra: bytes = b"",
) -> bytes:
    """A hand-made PNG, for modes Pillow cannot write (16-bit with alpha) or lying headers."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    body = _chunk(b"IHDR", header) + extra
    if raw is not None:
        body += _chunk(b"IDAT", zlib.compress(raw))
    return b"\x89PNG\r\n\x1a\n" + body + _chunk(b"IEND", b"")


def _rows(array: np.ndarray) -> bytes:
    """Big-endian scanlines, each prefixed with filter type 0."""
    data = array.astype(array.dtype.newbyteorder(">"))
    return b"".join(b"\x00" + row.tobytes() for row in data.reshape(array.shape[0], -1))


def _decode(path: Path, **kwargs: object) -> np.ndarray:
    image = load_rgb(path, **kwargs)  # type: ignore[arg-type]
    assert image.mode == "RGB"
    return np.asarray(image)


def _reason(path: Path, **kwargs: object) -> str:
    with pytest.raises(DecodeError) as info:
        load_rgb(path, **kwargs)  # type: ignore[arg-type]
    return info.value.reason


# --- modes --------------------------------------------------------------------------------


def test_rgb_png_round_trips_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    Image.fromarray(pixels, "RGB").save(path)
    np.testing.assert_array_equal(_decode(path), pixels)


def test_rgba_transparent_pixels_become_exactly_background(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    rgba = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    rgba[:4, :, 3] = 0  # top half fully transparent, random colour underneath
    rgba[4:, :, 3] = 255
    rgba[7, 7] = (200, 100, 0, 128)
    path = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(path)
    background = (10, 20, 30)
    out = _decode(path, background=background)
    assert (out[:4] == background).all()
    np.testing.assert_array_equal(out[4:7], rgba[4:7, :, :3])
    # Half alpha lands halfway between pixel and background.
    np.testing.assert_allclose(out[7, 7], [105, 60, 15], atol=1)


def test_la_transparency_composited(tmp_path: Path) -> None:
    la = np.zeros((4, 4, 2), dtype=np.uint8)
    la[..., 0] = 250
    la[:2, :, 1] = 0
    la[2:, :, 1] = 255
    path = tmp_path / "a.png"
    Image.fromarray(la, "LA").save(path)
    out = _decode(path, background=(1, 2, 3))
    assert (out[:2] == (1, 2, 3)).all()
    assert (out[2:] == 250).all()


def test_palette_with_transparent_index(tmp_path: Path) -> None:
    image = Image.new("P", (4, 2), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((0, 1), 1)
    image.info["transparency"] = 0  # red index is transparent
    path = tmp_path / "a.png"
    image.save(path, transparency=0)
    out = _decode(path, background=(7, 8, 9))
    assert tuple(out[0, 0]) == (7, 8, 9)
    assert tuple(out[1, 0]) == (0, 0, 255)


def test_rgb_colour_key_transparency(tmp_path: Path) -> None:
    pixels = np.full((3, 3, 3), (0, 255, 0), dtype=np.uint8)
    pixels[1, 1] = (5, 6, 7)
    path = tmp_path / "a.png"
    Image.fromarray(pixels, "RGB").save(path, transparency=(0, 255, 0))
    out = _decode(path, background=BG)
    assert tuple(out[0, 0]) == BG
    assert tuple(out[1, 1]) == (5, 6, 7)


def test_16bit_rgba_png_scaled_and_composited(tmp_path: Path) -> None:
    rgba = np.zeros((2, 3, 4), dtype=np.uint16)
    rgba[0] = (65535, 0, 12345, 0)  # transparent: colour must not leak
    rgba[1] = (65535, 0, 32896, 65535)
    path = tmp_path / "a.png"
    path.write_bytes(_png_bytes(3, 2, color_type=6, bit_depth=16, raw=_rows(rgba)))
    out = _decode(path, background=(40, 50, 60))
    assert (out[0] == (40, 50, 60)).all()
    np.testing.assert_allclose(out[1], np.tile([255, 0, 128], (3, 1)), atol=1)


def test_16bit_grey_alpha_png(tmp_path: Path) -> None:
    la = np.zeros((1, 2, 2), dtype=np.uint16)
    la[0, 0] = (65535, 0)
    la[0, 1] = (65535, 65535)
    path = tmp_path / "a.png"
    path.write_bytes(_png_bytes(2, 1, color_type=4, bit_depth=16, raw=_rows(la)))
    out = _decode(path, background=(9, 9, 9))
    assert tuple(out[0, 0]) == (9, 9, 9)
    assert tuple(out[0, 1]) == (255, 255, 255)


def test_16bit_grey_png_scaled_to_8bit(tmp_path: Path) -> None:
    grey = np.array([[0, 32896, 65535]], dtype=np.uint16)
    path = tmp_path / "a.png"
    path.write_bytes(_png_bytes(3, 1, color_type=0, bit_depth=16, raw=_rows(grey)))
    out = _decode(path)
    np.testing.assert_array_equal(out[0, :, 0], [0, 128, 255])
    assert (out[..., 0] == out[..., 2]).all()


def test_16bit_grey_png_colour_key(tmp_path: Path) -> None:
    grey = np.array([[1000, 65535]], dtype=np.uint16)
    path = tmp_path / "a.png"
    trns = _chunk(b"tRNS", struct.pack(">H", 1000))
    path.write_bytes(_png_bytes(2, 1, color_type=0, bit_depth=16, raw=_rows(grey), extra=trns))
    out = _decode(path, background=(3, 4, 5))
    assert tuple(out[0, 0]) == (3, 4, 5)
    assert tuple(out[0, 1]) == (255, 255, 255)


def test_32bit_int_tiff_uses_16bit_range(tmp_path: Path) -> None:
    image = Image.fromarray(np.array([[0, 65535, 70000]], dtype=np.int32), "I")
    path = tmp_path / "a.tif"
    image.save(path)
    assert Image.open(path).mode == "I"
    np.testing.assert_array_equal(_decode(path)[0, :, 1], [0, 255, 255])


def test_float_tiff_zero_to_one(tmp_path: Path) -> None:
    image = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    path = tmp_path / "a.tif"
    image.save(path)
    np.testing.assert_array_equal(_decode(path)[0, :, 0], [0, 128, 255])


def test_float_tiff_beyond_one_taken_as_8bit_range(tmp_path: Path) -> None:
    image = Image.fromarray(np.array([[0.0, 100.0, 300.0]], dtype=np.float32), "F")
    path = tmp_path / "a.tif"
    image.save(path)
    np.testing.assert_array_equal(_decode(path)[0, :, 0], [0, 100, 255])


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path, quality=95)  # pure red ink
    out = _decode(path)
    assert out[..., 0].min() > 200
    assert out[..., 1].max() < 60


def test_bilevel_and_grey(tmp_path: Path) -> None:
    one = Image.new("1", (4, 1), 0)
    one.putpixel((1, 0), 1)
    one.save(tmp_path / "one.png")
    grey = Image.new("L", (2, 1), 77)
    grey.save(tmp_path / "grey.png")
    np.testing.assert_array_equal(_decode(tmp_path / "one.png")[0, :, 2], [0, 255, 0, 0])
    assert (_decode(tmp_path / "grey.png") == 77).all()


def test_exif_orientation_applied(tmp_path: Path) -> None:
    pixels = np.zeros((10, 20, 3), dtype=np.uint8)
    pixels[:, :10] = (255, 0, 0)  # left half red
    pixels[:, 10:] = (0, 0, 255)  # right half blue
    image = Image.fromarray(pixels, "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    path = tmp_path / "a.jpg"
    image.save(path, exif=exif.tobytes(), quality=95)
    out = _decode(path)
    assert out.shape == (20, 10, 3)
    # Rotating clockwise brings the left (red) half to the top.
    assert out[2, 5, 0] > 200 and out[2, 5, 2] < 60
    assert out[17, 5, 2] > 200 and out[17, 5, 0] < 60


def test_seed_crop_decodes(seed_crops: list[Path]) -> None:
    with Image.open(seed_crops[0]) as original:
        assert original.mode == "RGBA"
        alpha = np.asarray(original)[..., 3]
        size = original.size
    out = _decode(seed_crops[0], background=(1, 2, 3))
    assert (out.shape[1], out.shape[0]) == size
    assert (out[alpha == 0] == (1, 2, 3)).all()


# --- failures -----------------------------------------------------------------------------


def _valid(fmt: str) -> bytes:
    rng = np.random.default_rng(3)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(("fmt", "suffix"), [("PNG", ".png"), ("JPEG", ".jpg")])
@pytest.mark.parametrize("keep", [0.9, 0.5, 0.05])
def test_truncated_image(tmp_path: Path, fmt: str, suffix: str, keep: float) -> None:
    data = _valid(fmt)
    path = tmp_path / f"half{suffix}"
    path.write_bytes(data[: int(len(data) * keep)])
    assert _reason(path) == "truncated image"


def test_png_cut_inside_header_is_truncated(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(_valid("PNG")[:20])
    assert _reason(path) == "truncated image"


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.touch()
    assert _reason(path) == "empty file"


def test_text_file_named_png(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_text("this is not a picture\n")
    assert _reason(path) == "not an image"


def test_directory(tmp_path: Path) -> None:
    folder = tmp_path / "looks_like.png"
    folder.mkdir()
    assert _reason(folder) == "is a directory"


def test_vanished_file(tmp_path: Path) -> None:
    assert _reason(tmp_path / "gone.png") == "vanished"


def test_bomb_refused_from_header_before_decoding(tmp_path: Path) -> None:
    # The header claims 50 megapixels; there is no pixel data at all, so only a check
    # made before decoding can give this reason.
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_bytes(10_000, 5_000, color_type=2, bit_depth=8))
    assert _reason(path) == "too many pixels (10000 x 5000 > 40000000)"


def test_bomb_beyond_pillow_hard_limit(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_bytes(30_000, 30_000, color_type=2, bit_depth=8))
    assert _reason(path) == "too many pixels (900000000 > 40000000)"


def test_max_pixels_is_configurable(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.new("RGB", (100, 60)).save(path)
    assert _reason(path, max_pixels=5_000) == "too many pixels (100 x 60 > 5000)"
    assert load_rgb(path, max_pixels=6_000).size == (100, 60)


def test_permission_denied(tmp_path: Path) -> None:
    path = tmp_path / "locked.png"
    Image.new("RGB", (4, 4)).save(path)
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as root: root ignores chmod, so the file stays readable")
        assert _reason(path) == "permission denied"
    finally:
        path.chmod(0o644)


def test_permission_error_mapped_even_as_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "locked.png"
    Image.new("RGB", (4, 4)).save(path)

    def refuse(self: Path, *args: object, **kwargs: object) -> object:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", refuse)
    assert _reason(path) == "permission denied"


@pytest.mark.skipif(importlib.util.find_spec("rawpy") is not None, reason="rawpy installed")
def test_dng_without_rawpy(tmp_path: Path) -> None:
    path = tmp_path / "frame.DNG"
    path.write_bytes(b"II*\x00" + b"\x00" * 64)
    assert _reason(path) == "raw .dng needs rawpy (pip install 'crop-clusterd[dng]')"


def test_decode_error_message_names_file(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.touch()
    with pytest.raises(DecodeError, match=r"a\.png: empty file"):
        load_rgb(path)


# --- colours ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("#808080", (128, 128, 128)),
        ("#0aFf10", (10, 255, 16)),
        ("128,128,128", (128, 128, 128)),
        (" 0, 64 ,255 ", (0, 64, 255)),
    ],
)
def test_parse_color(text: str, expected: tuple[int, int, int]) -> None:
    assert parse_color(text) == expected


@pytest.mark.parametrize("text", ["808080", "#80808", "1,2", "1,2,256", "red", "1,2,3,4", "-1,0,0"])
def test_parse_color_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a colour"):
        parse_color(text)
