"""Read text that people or the detector wrote, whatever editor or OS saved it.

Windows tools save text with a byte-order mark and CRLF line ends (Notepad, Excel's
"CSV UTF-8"), and PowerShell's ``>`` writes UTF-16 with a BOM. Every text file the
project reads from outside (``.txt`` input lists, labels CSV, config TOML, metadata
JSON, the CSVs it wrote and a person may have re-saved) goes through this module, so
all of them accept the same things:

- a UTF-8 BOM is dropped; UTF-16 and UTF-32 files with their BOM are decoded;
- CRLF and lone CR line ends read as LF;
- anything else that is not UTF-8 is a :class:`TextEncodingError` naming the file.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import TextIO

# Longest first: the UTF-32 LE mark begins with the UTF-16 LE one.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


class TextEncodingError(ValueError):
    """A text file that is neither UTF-8 nor UTF-16/32 with a byte-order mark."""


def encoding_of(head: bytes) -> str:
    """The codec for a file starting with ``head`` (its first 4 bytes suffice).

    The codecs named consume their own BOM; without a BOM the text is UTF-8
    (``utf-8-sig`` reads plain UTF-8 unchanged).
    """
    for bom, name in _BOMS:
        if head.startswith(bom):
            return name
    return "utf-8-sig"


def _not_text(path: Path, exc: UnicodeDecodeError) -> TextEncodingError:
    # exc.encoding is the codec that failed: say which text the file claimed to be.
    kind = "UTF-8" if exc.encoding.replace("_", "-").startswith("utf-8") else exc.encoding
    return TextEncodingError(
        f"{path}: not {kind} text (byte {exc.start}: {exc.reason}); save it as UTF-8"
    )


def decode_text(raw: bytes, path: Path | str = "<text>") -> str:
    """``raw`` as a str with the BOM dropped and every CRLF or CR turned into LF.

    Raises :class:`TextEncodingError` (naming ``path``) when it cannot be decoded.
    """
    try:
        text = raw.decode(encoding_of(raw[:4]))
    except UnicodeDecodeError as exc:
        raise _not_text(Path(path), exc) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_text(path: Path) -> str:
    """The file at ``path`` as by :func:`decode_text`.

    Raises ``OSError`` when it cannot be read, :class:`TextEncodingError` when it is
    not text this module reads.
    """
    return decode_text(Path(path).read_bytes(), path)


def read_lines(path: Path) -> list[str]:
    """The lines of the file at ``path``, without their line ends (LF, CRLF or CR).

    Only line ends split: a form feed or U+2028 in a line stays in it (unlike
    ``str.splitlines``), since those can be part of a file name. Raises as
    :func:`read_text`.
    """
    text = read_text(path)
    if text.endswith("\n"):
        text = text[:-1]
    return text.split("\n") if text else []


def open_text(path: Path, *, newline: str | None = None, errors: str = "strict") -> TextIO:
    """Open ``path`` for reading text with the encoding its BOM names (UTF-8 without one).

    For streaming readers such as ``csv`` (pass ``newline=""``; the csv module itself
    accepts CRLF and CR). Raises ``OSError``; decoding errors surface while reading as
    ``UnicodeDecodeError``, see :func:`reraise_decode`.
    """
    path = Path(path)
    with path.open("rb") as handle:
        head = handle.read(4)
    return path.open(encoding=encoding_of(head), newline=newline, errors=errors)


def reraise_decode(path: Path, exc: UnicodeDecodeError) -> TextEncodingError:
    """The :class:`TextEncodingError` to raise for a decoding error met while streaming."""
    return _not_text(Path(path), exc)
