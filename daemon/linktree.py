"""Folders of hard links kept in sync with a plan (:func:`sync_link_tree`).

The tree is owned by this module: it is marked with :data:`TREE_MARKER`, every
entry is placed atomically (link to a hidden name, then rename), and anything
not in the plan is removed, so a reader never sees a half-copied file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Final

from . import atomic

__all__ = ["TREE_MARKER", "LinkFn", "SyncStats", "sync_link_tree"]

TREE_MARKER: Final = ".crop-clusterd-tree"
"""File that marks a folder as owned by :func:`sync_link_tree`."""


@dataclass(frozen=True, slots=True)
class SyncStats:
    """What one :func:`sync_link_tree` call changed."""

    linked: int = 0
    copied: int = 0
    replaced: int = 0
    unchanged: int = 0
    removed: int = 0
    dirs_removed: int = 0
    missing: tuple[PurePosixPath, ...] = ()


LinkFn = Callable[[Path, Path], None]

_COPY_FALLBACK_ERRNOS = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP})

# The tree code works on "a/b" strings rather than PurePath objects: at a
# million entries pathlib's parsing and hashing cost more than the syscalls.


def _check_relative(rel: PurePosixPath | str) -> str:
    """Validate one wanted path and return it as a canonical ``a/b`` string."""
    text = str(rel)
    if text.startswith("/"):
        raise ValueError(f"wanted path {text!r} is absolute")
    parts = text.split("/")
    if text in ("", ".") or any(part in ("", ".") for part in parts):
        raise ValueError(f"wanted path {text!r} is empty or not in canonical form")
    if ".." in parts:
        raise ValueError(f"wanted path {text!r} contains '..'")
    if "\0" in text:
        raise ValueError(f"wanted path {text!r} contains a NUL byte")
    if parts[0] == TREE_MARKER:
        raise ValueError(f"wanted path {text!r} collides with the tree marker")
    return text


def _walk_tree(root: str) -> tuple[dict[str, os.stat_result], list[str]]:
    """Every non-folder entry under ``root`` (lstat) and every folder, never following links."""
    files: dict[str, os.stat_result] = {}
    dirs: list[str] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(root, rel) if rel else root) as entries:
            for entry in entries:
                if not rel and entry.name == TREE_MARKER:
                    continue
                child = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_dir(follow_symlinks=False):
                    dirs.append(child)
                    stack.append(child)
                else:
                    files[child] = entry.stat(follow_symlinks=False)
    return files, dirs


def _same_file(dest: os.stat_result, source: os.stat_result) -> bool:
    """Whether ``dest`` is a hard link to ``source`` or a copy made from it."""
    if not stat.S_ISREG(dest.st_mode):
        return False
    if (dest.st_dev, dest.st_ino) == (source.st_dev, source.st_ino):
        return True
    # Copies keep the source's size and mtime (copy2), so these identify them.
    return dest.st_size == source.st_size and dest.st_mtime_ns == source.st_mtime_ns


def _place(source: Path, dest: Path, link: LinkFn) -> bool:
    """Put ``source`` at ``dest`` atomically; True when hard-linked, False when copied."""
    # Linking to a hidden temporary name and renaming over ``dest`` means a
    # reader never sees a missing or half-copied file at ``dest``.
    tmp_path = dest.with_name(atomic.temp_prefix(dest.name) + secrets.token_hex(6))
    try:
        try:
            link(source, tmp_path)
            linked = True
        except OSError as exc:
            if exc.errno not in _COPY_FALLBACK_ERRNOS:
                raise
            shutil.copy2(source, tmp_path)
            linked = False
        os.replace(tmp_path, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)
        raise
    return linked


def _write_marker(handle: BinaryIO) -> None:
    """Contents of the tree marker file."""
    handle.write(b"This folder is managed by crop-clusterd; its contents are replaced.\n")


def _claim_root(root: Path) -> None:
    """Create ``root`` or check that it is ours, and mark it as managed."""
    if root.is_symlink():
        raise ValueError(f"{root} is a symlink; refusing to manage a tree through it")
    root.mkdir(parents=True, exist_ok=True)
    marker = root / TREE_MARKER
    if not marker.exists():
        with os.scandir(root) as entries:
            if any(True for _ in entries):
                raise ValueError(
                    f"{root} is not empty and was not created by crop-clusterd "
                    f"(no {TREE_MARKER}); refusing to replace its contents"
                )
        atomic.atomic_write(marker, _write_marker)


def sync_link_tree(
    root: Path, wanted: Mapping[PurePosixPath, Path], *, link: LinkFn = os.link
) -> SyncStats:
    """Make ``root`` hold exactly the ``wanted`` relative paths, each a hard link to its source.

    Falls back to a copy when hard-linking fails with EXDEV, EPERM, EMLINK or
    ENOTSUP (``link`` is injectable for tests). Correct entries are left
    untouched, so calling this repeatedly is cheap (one walk of the tree and one
    ``stat`` per source). Anything else under ``root`` is removed, as are empty
    folders. ``root`` is owned by this function: it is marked with
    :data:`TREE_MARKER` on first use, and a non-empty folder without that
    marker is refused rather than emptied. Symlinks inside ``root`` are never
    followed (they are removed as stale entries). Sources that do not exist are
    skipped and reported in ``SyncStats.missing``. Wanted paths that are
    absolute, contain ``..``, or put a file where another wanted path needs a
    folder raise ``ValueError`` before anything is changed.
    """
    root = Path(root)
    checked, needed_dirs = _check_wanted(wanted)
    _claim_root(root)
    root_str = os.fspath(root)
    present, present_dirs = _walk_tree(root_str)
    # Remove stale entries first so a stale file never blocks a needed folder.
    removed, dirs_now = _remove_stale(root_str, checked, present, present_dirs)
    placed = _place_wanted(root, checked, present, dirs_now, link)
    dirs_removed = _remove_unneeded_dirs(root_str, dirs_now - needed_dirs)
    return dataclasses.replace(placed, removed=removed, dirs_removed=dirs_removed)


def _check_wanted(wanted: Mapping[PurePosixPath, Path]) -> tuple[dict[str, Path], set[str]]:
    """The wanted paths as canonical ``a/b`` strings, and every folder they need.

    Raises ``ValueError`` for a path :func:`_check_relative` refuses or one that
    is both a wanted file and a folder another wanted path needs.
    """
    checked: dict[str, Path] = {}
    for key, source in wanted.items():
        checked[_check_relative(key)] = source
    needed_dirs: set[str] = set()
    for rel in checked:
        cut = rel.rfind("/")
        while cut > 0:
            folder = rel[:cut]
            if folder in needed_dirs:
                break  # its ancestors were added with it
            needed_dirs.add(folder)
            cut = rel.rfind("/", 0, cut)
    clash = needed_dirs.intersection(checked)
    if clash:
        raise ValueError(f"wanted path {min(clash)!r} is both a file and a folder")
    return checked, needed_dirs


def _remove_stale(
    root_str: str,
    checked: Mapping[str, Path],
    present: Mapping[str, os.stat_result],
    present_dirs: list[str],
) -> tuple[int, set[str]]:
    """Remove entries not wanted and folders where a file is wanted.

    Returns how many entries were removed and the folders still present.
    """
    removed = 0
    for rel in present:
        if rel not in checked:
            os.unlink(os.path.join(root_str, rel))
            removed += 1
    dirs_now = set(present_dirs)
    for rel in sorted(dirs_now.intersection(checked), key=lambda r: -r.count("/")):
        shutil.rmtree(os.path.join(root_str, rel))
        removed += 1
        dirs_now.difference_update(d for d in present_dirs if d == rel or d.startswith(rel + "/"))
    return removed, dirs_now


def _place_wanted(
    root: Path,
    checked: Mapping[str, Path],
    present: Mapping[str, os.stat_result],
    dirs_now: set[str],
    link: LinkFn,
) -> SyncStats:
    """Link (or copy) every wanted entry that is not already right, in path order.

    Creates missing folders and adds them to ``dirs_now``. The returned stats
    hold ``linked``, ``copied``, ``replaced``, ``unchanged`` and ``missing``.
    """
    root_str = os.fspath(root)
    linked = copied = replaced = unchanged = 0
    missing: list[PurePosixPath] = []
    for rel in sorted(checked):
        source = checked[rel]
        try:
            source_stat = os.stat(source)
        except FileNotFoundError:
            missing.append(PurePosixPath(rel))
            continue
        existing = present.get(rel)
        if existing is not None and _same_file(existing, source_stat):
            unchanged += 1
            continue
        cut = rel.find("/")
        while cut > 0:
            folder = rel[:cut]
            if folder not in dirs_now:
                os.mkdir(os.path.join(root_str, folder))
                dirs_now.add(folder)
            cut = rel.find("/", cut + 1)
        if _place(Path(source), root / rel, link):
            linked += 1
        else:
            copied += 1
        if existing is not None:
            replaced += 1
    return SyncStats(
        linked=linked,
        copied=copied,
        replaced=replaced,
        unchanged=unchanged,
        missing=tuple(missing),
    )


def _remove_unneeded_dirs(root_str: str, unneeded: set[str]) -> int:
    """Remove the ``unneeded`` folders that are empty; return how many went."""
    dirs_removed = 0
    # Deepest first, so a folder emptied by removing its children goes too.
    for rel in sorted(unneeded, key=lambda r: -r.count("/")):
        try:
            os.rmdir(os.path.join(root_str, rel))
            dirs_removed += 1
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                raise
    return dirs_removed
