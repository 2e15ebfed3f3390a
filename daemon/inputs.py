"""Turn the command line's ``-i`` specs into a sorted list of image files.

A spec is an image path, a directory, a glob pattern, or a ``.txt`` file whose lines
are again specs. Explicit mistakes (a path that does not exist, a file that is not an
image) are errors; files met while scanning a directory or glob are filtered quietly.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from .textfiles import TextEncodingError, read_lines

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp"})
RAW_EXTENSIONS = frozenset({".dng"})
LIST_EXTENSION = ".txt"
DNG_FIX = "pip install 'crop-clusterd[dng]'"

# Names that writers use while a file is incomplete, or that users do not mean as data.
_TEMP_SUFFIXES = (".tmp", ".part", "~")
_GLOB_MAGIC = frozenset("*?[")


class InputError(Exception):
    """An input spec could not be resolved into image files."""


def _rawpy_available() -> bool:
    """Whether the optional raw decoder is importable (patched in tests)."""
    return importlib.util.find_spec("rawpy") is not None


def is_image_name(name: str) -> bool:
    """Whether a file name has a supported image or raw extension (any case)."""
    suffix = os.path.splitext(name)[1].lower()
    return suffix in IMAGE_EXTENSIONS or suffix in RAW_EXTENSIONS


def is_ignored_name(name: str) -> bool:
    """Whether a name is hidden or temporary and must be skipped while scanning."""
    lowered = name.lower()
    return name.startswith(".") or lowered.endswith(_TEMP_SUFFIXES)


def resolve_inputs(specs: Sequence[str], *, recursive: bool = False) -> list[Path]:
    """Expand paths, directories, globs and ``.txt`` lists into image files.

    Returns each file once (by resolved path), sorted by its string form, in the
    form it was given or expanded (symlinks not resolved). Raises ``InputError`` on
    a missing or unsupported explicit path, an unusable ``.dng``, a cyclic list, or
    when nothing is found at all.
    """
    resolver = _Resolver(recursive=recursive)
    for spec in specs:
        resolver.add_spec(spec, base=None)
    if not resolver.found:
        listed = ", ".join(repr(s) for s in specs) if specs else "(no specs given)"
        raise InputError(f"no image files found in inputs: {listed}")
    return sorted(resolver.found.values(), key=str)


class _Resolver:
    """Accumulates found files while walking specs; tracks open lists for cycles."""

    def __init__(self, *, recursive: bool) -> None:
        self.recursive = recursive
        self.found: dict[Path, Path] = {}  # resolved path -> path as given
        self._open_lists: list[Path] = []

    def add_spec(self, spec: str, *, base: Path | None) -> None:
        """Resolve one spec; ``base`` is the folder of the list file it came from."""
        text = os.path.expanduser(spec.strip() if base is not None else spec)
        if base is not None and not os.path.isabs(text):
            joined = os.path.join(base, text)
            glob_text = os.path.join(glob.escape(str(base)), text)
        else:
            joined = glob_text = text
        path = Path(joined)
        origin = f"{spec!r}" if base is None else f"{spec!r} (listed in {base})"
        # A literal path wins over glob syntax: a file may really be named "a[1].png".
        if os.path.lexists(path):
            self._add_existing(path, origin)
        elif _GLOB_MAGIC.intersection(text):
            self._add_glob(glob_text)
        else:
            raise InputError(f"input not found: {origin}")

    def _add_existing(self, path: Path, origin: str) -> None:
        if path.is_dir():
            for child in self._scan_dir(path):
                self._add_image(child)
            return
        if not path.exists():
            raise InputError(f"input is a broken symlink: {origin}")
        if path.suffix.lower() == LIST_EXTENSION:
            self._add_list(path)
        elif is_image_name(path.name):
            self._add_image(path)
        else:
            supported = ", ".join(sorted(IMAGE_EXTENSIONS | RAW_EXTENSIONS))
            raise InputError(
                f"input is not a supported image or .txt list: {origin} "
                f"(supported extensions: {supported})"
            )

    def _add_list(self, path: Path) -> None:
        key = path.resolve()
        if key in self._open_lists:
            chain = " -> ".join(str(p) for p in [*self._open_lists, key])
            raise InputError(f"input lists include each other in a cycle: {chain}")
        try:
            lines = read_lines(path)
        except (OSError, TextEncodingError) as exc:
            raise InputError(f"cannot read input list {path}: {exc}") from exc
        self._open_lists.append(key)
        try:
            for line in lines:
                stripped = line.strip()
                if stripped and not stripped.startswith("#"):
                    self.add_spec(stripped, base=path.parent)
        finally:
            self._open_lists.pop()

    def _add_glob(self, pattern: str) -> None:
        for match in sorted(glob.glob(pattern, recursive=True)):
            path = Path(match)
            if not is_ignored_name(path.name) and is_image_name(path.name) and path.is_file():
                self._add_image(path)

    def _scan_dir(self, folder: Path) -> Iterator[Path]:
        if not self.recursive:
            try:
                children = sorted(folder.iterdir())
            except OSError as exc:
                raise InputError(f"cannot list directory {folder}: {exc}") from exc
            for child in children:
                wanted = not is_ignored_name(child.name) and is_image_name(child.name)
                if wanted and child.is_file():
                    yield child
            return
        # os.walk does not descend into symlinked directories unless asked: no loops.
        for root, dirs, files in os.walk(folder, onerror=None, followlinks=False):
            dirs[:] = sorted(d for d in dirs if not is_ignored_name(d))
            for name in sorted(files):
                if not is_ignored_name(name) and is_image_name(name):
                    child = Path(root, name)
                    if child.is_file():
                        yield child

    def _add_image(self, path: Path) -> None:
        if path.suffix.lower() in RAW_EXTENSIONS and not _rawpy_available():
            raise InputError(
                f"{path} is a raw .dng file, but rawpy is not installed; install it with: {DNG_FIX}"
            )
        self.found.setdefault(path.resolve(), path)
