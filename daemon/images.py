"""Decode one crop file into an 8-bit RGB image, or say precisely why not.

Every failure becomes a :class:`DecodeError` whose ``reason`` is the short text written
to ``errors.csv``; a bad file never takes the pipeline down. Transparency is flattened
onto a fixed background colour so the (arbitrary) RGB under alpha 0 can never reach the
embedding: flat-bug's masked crops are RGBA with the surroundings fully transparent.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

RGB = tuple[int, int, int]

DEFAULT_BACKGROUND: RGB = (128, 128, 128)
DEFAULT_MAX_PIXELS = 40_000_000

_RAW_SUFFIXES = frozenset({".dng"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


class DecodeError(Exception):
    """A file that could not be turned into an image; ``reason`` goes to ``errors.csv``."""

    def __init__(self, reason: str, path: Path | None = None) -> None:
        self.reason = reason
        self.path = path
        super().__init__(f"{path}: {reason}" if path is not None else reason)


def parse_color(text: str) -> RGB:
    """Parse ``"#808080"`` or ``"128,128,128"`` into an RGB triple of 0-255 ints."""
    value = text.strip()
    if re.fullmatch(r"#[0-9a-fA-F]{6}", value):
        return (int(value[1:3], 16), int(value[3:5], 16), int(value[5:7], 16))
    parts = [p.strip() for p in value.split(",")]
    if len(parts) == 3 and all(re.fullmatch(r"\d{1,3}", p) for p in parts):
        r, g, b = (int(p) for p in parts)
        if max(r, g, b) <= 255:
            return (r, g, b)
    raise ValueError(f"not a colour: {text!r}; use '#RRGGBB' or 'R,G,B' with values 0-255")


def load_rgb(
    path: Path,
    *,
    background: RGB = DEFAULT_BACKGROUND,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Fully decode ``path`` into an 8-bit RGB image.

    EXIF orientation is applied and any transparency is composited onto ``background``
    (pixels with alpha 0 come out exactly ``background``). Raises :class:`DecodeError`
    for anything that is not a decodable image, with a specific reason.
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise DecodeError("is a directory", path)
        if path.stat().st_size == 0:
            raise DecodeError("empty file", path)
        if path.suffix.lower() in _RAW_SUFFIXES:
            return _load_raw(path, background=background, max_pixels=max_pixels)
        with path.open("rb") as fh:
            image = _open_checked(fh, path, max_pixels)
            try:
                image.load()
            except (OSError, SyntaxError, ValueError, EOFError) as exc:
                # Pillow reports a cut-off stream in several ways depending on the codec.
                raise DecodeError(_load_failure_reason(exc), path) from exc
    except FileNotFoundError as exc:
        raise DecodeError("vanished", path) from exc
    except PermissionError as exc:
        raise DecodeError("permission denied", path) from exc
    except IsADirectoryError as exc:
        raise DecodeError("is a directory", path) from exc
    image = _apply_orientation(image)
    try:
        return _flatten(image, background)
    except (ValueError, OSError) as exc:
        raise DecodeError(f"unsupported image mode {image.mode}", path) from exc


def _open_checked(fh: BinaryIO, path: Path, max_pixels: int) -> Image.Image:
    """Open (header only) and refuse images over ``max_pixels`` before any decoding."""
    try:
        image = Image.open(fh)
    except UnidentifiedImageError as exc:
        # A known signature that Pillow still cannot identify is a half-written file.
        reason = "truncated image" if _has_image_signature(fh) else "not an image"
        raise DecodeError(reason, path) from exc
    except Image.DecompressionBombError as exc:
        # Pillow's own hard limit (2 x MAX_IMAGE_PIXELS) fires inside open(), before we
        # can read the size; its message carries the pixel count.
        match = re.search(r"\((\d+) pixels\)", str(exc))
        count = match.group(1) if match else "?"
        raise DecodeError(f"too many pixels ({count} > {max_pixels})", path) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DecodeError(_load_failure_reason(exc), path) from exc
    width, height = image.size
    if width * height > max_pixels:
        raise DecodeError(f"too many pixels ({width} x {height} > {max_pixels})", path)
    return image


_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF8", b"II*\x00", b"MM\x00*")


def _has_image_signature(fh: BinaryIO) -> bool:
    try:
        fh.seek(0)
        head = fh.read(8)
    except OSError:
        return False
    return any(
        head.startswith(sig) or (len(head) < len(sig) and sig.startswith(head))
        for sig in _SIGNATURES
        if head
    )


def _load_failure_reason(exc: BaseException) -> str:
    text = str(exc).lower()
    if any(word in text for word in ("truncated", "premature", "end of file", "eof")):
        return "truncated image"
    if isinstance(exc, EOFError):
        return "truncated image"
    if "broken" in text or "corrupt" in text or "crc" in text:
        return f"corrupt image ({exc})"
    return f"cannot decode image ({exc})"


def _apply_orientation(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        # A malformed EXIF block must not cost us an otherwise good crop.
        return image


def _load_raw(path: Path, *, background: RGB, max_pixels: int) -> Image.Image:
    try:
        import rawpy
    except ImportError as exc:
        raise DecodeError("raw .dng needs rawpy (pip install 'crop-clusterd[dng]')", path) from exc
    try:
        with rawpy.imread(str(path)) as raw:
            width, height = int(raw.sizes.width), int(raw.sizes.height)
            if width * height > max_pixels:
                raise DecodeError(f"too many pixels ({width} x {height} > {max_pixels})", path)
            array = raw.postprocess(use_camera_wb=True, output_bps=8)
    except DecodeError:
        raise
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as exc:  # rawpy's LibRaw errors share no importable base we can rely on
        raise DecodeError(f"cannot decode raw image ({exc})", path) from exc
    return _flatten(Image.fromarray(np.ascontiguousarray(array[..., :3])), background)


def _flatten(image: Image.Image, background: RGB) -> Image.Image:
    """Return an 8-bit RGB copy of ``image`` with transparency composited onto ``background``."""
    colour, alpha = _colour_and_alpha(image)
    if alpha is None:
        return Image.fromarray(colour, "RGB")
    a = alpha.astype(np.uint32)[..., None]
    bg = np.asarray(background, dtype=np.uint32)
    # Integer blend rounds so alpha 0 gives exactly ``background`` and alpha 255 exactly
    # the pixel: no float noise can leak the hidden RGB into the embedding.
    mixed = (colour.astype(np.uint32) * a + bg * (255 - a) + 127) // 255
    return Image.fromarray(mixed.astype(np.uint8), "RGB")


def _colour_and_alpha(
    image: Image.Image,
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8] | None]:
    """Split into an HxWx3 uint8 colour array and an optional HxW uint8 alpha."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "F":
        return _high_depth(image)
    if mode in ("RGBa", "La"):
        image = image.convert("RGBA")  # un-premultiply
    elif mode in ("P", "PA") or (mode in ("1", "L", "RGB") and "transparency" in image.info):
        # Palette and colour-key transparency become a real alpha channel here.
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        rgba = np.asarray(image.convert("RGBA"))
        return np.ascontiguousarray(rgba[..., :3]), np.ascontiguousarray(rgba[..., 3])
    return np.asarray(image.convert("RGB")), None


def _high_depth(
    image: Image.Image,
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8] | None]:
    """Scale 16/32-bit integer or float greyscale down to 8 bits."""
    values = np.asarray(image)
    alpha: npt.NDArray[np.uint8] | None = None
    key = image.info.get("transparency")
    if isinstance(key, int) and image.mode != "F":
        alpha = np.where(values == key, 0, 255).astype(np.uint8)
    if image.mode == "F":
        floats = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        # Float images are conventionally 0..1; anything brighter is taken as 0..255.
        scale = 255.0 if floats.size and floats.max() <= 1.0 else 1.0
        grey = np.clip(np.rint(floats * scale), 0, 255).astype(np.uint8)
    else:
        # Pillow decodes 16-bit PNG/TIFF greyscale into these modes, so 0..65535 is the range.
        wide = np.clip(values.astype(np.int64), 0, 65535)
        grey = ((wide * 255 + 32767) // 65535).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2), alpha
