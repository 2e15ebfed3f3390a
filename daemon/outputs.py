"""Output files shared by the batch command and the live daemon.

Readers poll these files while the daemon runs, so every file is replaced
atomically (:func:`atomic_write`): a reader sees either the previous complete
file or the new complete file, never a half-written one. Cluster folders are
trees of hard links kept in sync by :func:`sync_link_tree`.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import functools
import io
import os
import pickle
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from .records import Assignment, Merge, Skipped

__all__ = [
    "NOT_CLUSTERED",
    "TREE_MARKER",
    "LoadedEmbeddings",
    "SyncStats",
    "atomic_write",
    "cluster_folder_plan",
    "escape_cell",
    "load_embeddings_pickle",
    "pick_representatives",
    "read_clusters_csv",
    "read_errors_csv",
    "sync_link_tree",
    "unescape_cell",
    "write_clusters_csv",
    "write_embeddings_pickle",
    "write_errors_csv",
    "write_merges_csv",
]

NOT_CLUSTERED = "not-clustered"
"""Folder that holds the crops of single-member clusters."""

TREE_MARKER = ".crop-clusterd-tree"
"""File that marks a folder as owned by :func:`sync_link_tree`."""

# Rows normalised per step: bounds the float64 scratch space to a few MB.
_CHUNK_ROWS = 65536
_MAX_NAME_BYTES = 255


# --------------------------------------------------------------------------- atomic writes


@functools.cache
def _umask() -> int:
    """The process umask, read without changing it where /proc allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    # Fallback briefly sets the umask; only reached off Linux.
    old = os.umask(0o022)
    os.umask(old)
    return old


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable; a no-op where the filesystem cannot."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some filesystems (and platforms) refuse fsync on folders; the rename
        # itself has already happened, so there is nothing to undo.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def _tmp_name(name: str) -> str:
    """Hidden temporary-file prefix for ``name`` that leaves room under the 255-byte limit."""
    cut = name.encode("utf-8", "surrogateescape")[:200].decode("utf-8", "ignore")
    return f".{cut}.tmp-"


def remove_stale_temp_files(path: Path) -> int:
    """Delete temporary files that :func:`atomic_write` left for ``path`` when the
    process was killed mid-write (a snapshot of a million embeddings leaves a
    large one); return how many. Call before anything writes ``path`` again."""
    removed = 0
    prefix = _tmp_name(path.name)
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(path.parent):
            if entry.name.startswith(prefix) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
    return removed


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Replace ``path`` with what ``write`` writes to the binary file it is given.

    The data goes to a hidden temporary file in the same folder
    (``.<name>.tmp-<random>``), is flushed and fsynced, then renamed over
    ``path`` and the folder fsynced. On any error (including an ``OSError`` such
    as ENOSPC, which propagates unchanged) the temporary file is removed and the
    previous ``path`` is left intact. The new file keeps the old file's mode, or
    gets ``0o666`` minus the umask.
    """
    path = Path(path)
    folder = path.parent
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    fd, tmp_name = tempfile.mkstemp(prefix=_tmp_name(path.name), dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        # BaseException too: a Ctrl-C mid-write must not leave temp files behind.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(folder)


# A spreadsheet opening the CSV runs a cell that starts with one of these as a
# formula (CSV injection: a crop named "=HYPERLINK(...).png"). OWASP's fix: prefix
# such cells with an apostrophe, which spreadsheets show as text. A leading
# apostrophe is doubled, so :func:`unescape_cell` can always undo the escape.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")
# Plain numbers (e.g. a label "-1") cannot be formulas; they stay as they are.
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def escape_cell(value: str) -> str:
    """A text cell made safe from spreadsheet formula evaluation (prefix ``'``)."""
    if value.startswith(_FORMULA_STARTS) and not _PLAIN_NUMBER.fullmatch(value):
        return "'" + value
    return value


def unescape_cell(value: str) -> str:
    """Undo :func:`escape_cell` on a cell read back from one of our CSV files."""
    if value.startswith("'") and escape_cell(value[1:]) == value:
        return value[1:]
    return value


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Atomically write a UTF-8 CSV file with ``header`` and ``rows``.

    Every text cell goes through :func:`escape_cell`, so no cell is a live formula.
    """

    def write(binary: BinaryIO) -> None:
        # newline="" lets the csv module quote embedded newlines itself.
        # surrogateescape: Linux file names may hold bytes that are not UTF-8;
        # they are written back as the same bytes rather than failing the file.
        text = io.TextIOWrapper(
            binary, encoding="utf-8", errors="surrogateescape", newline="", write_through=True
        )
        try:
            writer = csv.writer(text, lineterminator="\n")
            # With "\n" as line end the csv module would leave a lone "\r"
            # unquoted, and readers treat it as a line break: quote such rows.
            quoted = csv.writer(text, lineterminator="\n", quoting=csv.QUOTE_ALL)
            writer.writerow(header)
            for raw in rows:
                row = [escape_cell(c) if isinstance(c, str) else c for c in raw]
                if any(isinstance(cell, str) and "\r" in cell for cell in row):
                    quoted.writerow(row)
                else:
                    writer.writerow(row)
            text.flush()
        finally:
            # Detach so closing the wrapper does not close the caller's file.
            text.detach()

    atomic_write(path, write)


# --------------------------------------------------------------------------- CSV files


def write_clusters_csv(
    path: Path, rows: Iterable[Assignment], labels: Mapping[str, str] | None = None
) -> None:
    """Write ``clusters.csv``: ``filename,cluster`` (plus ``label`` when labels are given).

    A crop without a known label gets an empty label cell.
    """
    if labels is None:
        _write_csv(path, ("filename", "cluster"), ((a.name, a.cluster) for a in rows))
    else:
        _write_csv(
            path,
            ("filename", "cluster", "label"),
            ((a.name, a.cluster, labels.get(a.name, "")) for a in rows),
        )


def _read_pairs(path: Path, header: tuple[str, str]) -> Iterator[tuple[int, str, str]]:
    """Rows of a two-column CSV we wrote, as (line number, first cell, second cell),
    after checking the header; cells are not yet unescaped."""
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as handle:
        reader = csv.reader(handle)
        found = next(reader, None)
        if found is None or found[:2] != list(header):
            raise ValueError(f"{path}: line 1: expected header '{','.join(header)}', got {found!r}")
        for row in reader:
            if len(row) < 2:
                raise ValueError(f"{path}: line {reader.line_num}: expected 2 columns, got {row!r}")
            yield reader.line_num, row[0], row[1]


def read_clusters_csv(path: Path) -> list[tuple[str, int]]:
    """Read ``clusters.csv`` back as ``(filename, cluster)`` pairs, in file order."""
    out: list[tuple[str, int]] = []
    for line, name, cluster in _read_pairs(path, ("filename", "cluster")):
        try:
            out.append((unescape_cell(name), int(cluster)))
        except ValueError:
            raise ValueError(
                f"{path}: line {line}: cluster {cluster!r} is not an integer"
            ) from None
    return out


def read_errors_csv(path: Path) -> list[tuple[str, str]]:
    """Read ``errors.csv`` back as ``(filename, reason)`` pairs, in file order."""
    return [
        (unescape_cell(name), unescape_cell(reason))
        for _, name, reason in _read_pairs(path, ("filename", "reason"))
    ]


def write_errors_csv(path: Path, skipped: Iterable[Skipped]) -> None:
    """Write ``errors.csv``: ``filename,reason`` for every file that was not clustered."""
    _write_csv(path, ("filename", "reason"), ((s.name, s.reason) for s in skipped))


def _iso_utc(timestamp: float) -> str:
    """A POSIX timestamp as ISO-8601 UTC with milliseconds."""
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat(timespec="milliseconds")


def write_merges_csv(path: Path, merges: Iterable[tuple[float, Merge]]) -> None:
    """Write ``merges.csv``: ``time,from,into``, time as ISO-8601 UTC."""
    _write_csv(
        path,
        ("time", "from", "into"),
        ((_iso_utc(t), m.from_cluster, m.into_cluster) for t, m in merges),
    )


# --------------------------------------------------------------------------- embeddings pickle


def write_embeddings_pickle(
    path: Path,
    names: Sequence[str],
    embeddings: npt.NDArray[np.floating[Any]],
    labels: Sequence[str | None] | None = None,
) -> None:
    """Write ``embeddings.pkl``: a dict ``filename``, ``embedding`` (float32 n×d), ``label``.

    ``label`` is present only when labels are given. Pickle protocol 5 streams
    the array straight from memory, so writing needs no second copy of it.
    """
    array = np.ascontiguousarray(embeddings, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (n x d), got shape {array.shape}")
    if len(names) != array.shape[0]:
        raise ValueError(f"{len(names)} names but {array.shape[0]} embedding rows")
    payload: dict[str, object] = {"filename": list(names), "embedding": array}
    if labels is not None:
        if len(labels) != len(names):
            raise ValueError(f"{len(labels)} labels but {len(names)} names")
        payload["label"] = list(labels)
    atomic_write(path, lambda handle: pickle.dump(payload, handle, protocol=5))


@dataclass(frozen=True, slots=True, eq=False)
class LoadedEmbeddings:
    """Embeddings read from a pickle: L2-normalised float32 C-contiguous rows."""

    names: tuple[str, ...]
    embeddings: npt.NDArray[np.float32]
    labels: tuple[str | None, ...] | None


# What rebuilding numpy arrays, dtypes and plain containers needs, and nothing
# else: any other global in a pickle can run arbitrary code on load.
_NUMPY_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
}
_BUILTINS_ALLOWED = {"list", "dict", "tuple", "set", "frozenset", "bytes", "bytearray"}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays and builtin containers."""

    def find_class(self, module: str, name: str) -> Any:
        """Resolve an allowed global or raise ``ValueError`` naming the refused one."""
        if module.startswith("numpy.core."):
            # Pickles from numpy 1.x name the private core under its old path.
            module = "numpy._core." + module.removeprefix("numpy.core.")
        if (module, name) in _NUMPY_ALLOWED or (module, name) == ("_codecs", "encode"):
            return super().find_class(module, name)
        if module in ("builtins", "__builtin__") and name in _BUILTINS_ALLOWED:
            return super().find_class("builtins", name)
        raise ValueError(
            f"embeddings pickle references disallowed global '{module}.{name}'; "
            "only numpy arrays and plain containers are accepted"
        )


def _as_matrix(path: Path, raw: object) -> npt.NDArray[np.float32]:
    """The ``embedding`` value as a writable float32 C-contiguous n×d array.

    Consumes a list argument: each element is dropped once copied, so peak
    memory stays near one extra copy of the data.
    """
    if isinstance(raw, np.ndarray) and raw.dtype != object:
        if raw.ndim != 2:
            raise ValueError(f"{path}: 'embedding' must be 2-D (n x d), got shape {raw.shape}")
        if not np.issubdtype(raw.dtype, np.number) or np.issubdtype(raw.dtype, np.complexfloating):
            raise ValueError(f"{path}: 'embedding' has non-numeric dtype {raw.dtype}")
        if raw.dtype == np.float32 and raw.flags.c_contiguous and raw.flags.writeable:
            return raw
        # Assignment casts in small buffered blocks: the only extra memory is
        # the float32 result itself.
        out = np.empty(raw.shape, dtype=np.float32)
        out[...] = raw
        return out
    if isinstance(raw, np.ndarray):  # an object array of vectors
        if raw.ndim != 1:
            raise ValueError(f"{path}: 'embedding' object array must be 1-D, got {raw.shape}")
        items: list[object] = raw.tolist()
        del raw
    elif isinstance(raw, list):
        items = raw
    elif isinstance(raw, tuple):
        items = list(raw)
    else:
        raise ValueError(
            f"{path}: 'embedding' must be an array or a list of vectors, got {type(raw).__name__}"
        )
    n = len(items)
    if n == 0:
        return np.empty((0, 0), dtype=np.float32)
    dim = int(_as_vector(path, 0, items[0], None).shape[0])
    out = np.empty((n, dim), dtype=np.float32)
    for i in range(n):
        out[i] = _as_vector(path, i, items[i], dim)
        items[i] = None  # free each vector as soon as it is copied
    items.clear()
    return out


def _as_vector(path: Path, index: int, item: object, dim: int | None) -> npt.NDArray[np.float32]:
    """One list element as a 1-D float32 vector of ``dim`` values."""
    try:
        vector = np.asarray(item, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: embedding {index} is not a numeric vector: {exc}") from None
    # Models often return (1, d) per crop; the old tool stored them as they came.
    if vector.ndim == 2 and vector.shape[0] == 1:
        vector = vector[0]
    if vector.ndim != 1 or vector.shape[0] == 0:
        raise ValueError(f"{path}: embedding {index} has shape {vector.shape}, expected (d,)")
    if dim is not None and vector.shape[0] != dim:
        raise ValueError(
            f"{path}: ragged embeddings: vector {index} has {vector.shape[0]} values, "
            f"vector 0 has {dim}"
        )
    return vector


def _normalise_rows_in_place(path: Path, matrix: npt.NDArray[np.float32]) -> None:
    """L2-normalise each row in place, refusing NaN, infinite and zero rows."""
    for start in range(0, matrix.shape[0], _CHUNK_ROWS):
        chunk = matrix[start : start + _CHUNK_ROWS]
        norms = np.sqrt(np.einsum("ij,ij->i", chunk, chunk, dtype=np.float64))
        bad = ~np.isfinite(norms)
        if bad.any():
            row = start + int(np.argmax(bad))
            raise ValueError(f"{path}: embedding {row} contains NaN or infinite values")
        zero = norms == 0.0
        if zero.any():
            row = start + int(np.argmax(zero))
            raise ValueError(f"{path}: embedding {row} is all zeros and cannot be normalised")
        chunk /= norms.astype(np.float32)[:, None]


def _string_list(path: Path, key: str, raw: object, *, allow_none: bool) -> list[Any]:
    """A list of strings (or None where allowed) from a pickle value."""
    if isinstance(raw, np.ndarray):
        raw = raw.tolist()
    if not isinstance(raw, list | tuple):
        raise ValueError(f"{path}: '{key}' must be a list, got {type(raw).__name__}")
    out: list[Any] = []
    for i, item in enumerate(raw):
        if isinstance(item, str) or (allow_none and item is None):
            out.append(item)
        elif allow_none and isinstance(item, int | float | np.integer | np.floating):
            out.append(str(item))  # numeric class ids from older label files
        else:
            raise ValueError(f"{path}: '{key}' item {i} is {type(item).__name__}, not a string")
    return out


def load_embeddings_pickle(path: Path) -> LoadedEmbeddings:
    """Read an embeddings pickle written by this tool or by the old batch tool.

    Only numpy arrays and builtin containers are unpickled; any other global
    raises ``ValueError``. ``embedding`` may be an n×d array or a list of
    vectors (arrays or lists). Rows come back L2-normalised in float32, with at
    most one transient extra copy of the data while loading.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        try:
            loaded = _RestrictedUnpickler(handle).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as exc:
            raise ValueError(f"{path}: not a readable embeddings pickle: {exc}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a dict in the pickle, got {type(loaded).__name__}")
    for key in ("filename", "embedding"):
        if key not in loaded:
            raise ValueError(
                f"{path}: missing key '{key}' (keys present: {sorted(map(str, loaded))})"
            )
    names = tuple(_string_list(path, "filename", loaded.pop("filename"), allow_none=False))
    raw_labels = loaded.pop("label", None)
    labels = (
        None
        if raw_labels is None
        else tuple(_string_list(path, "label", raw_labels, allow_none=True))
    )
    matrix = _as_matrix(path, loaded.pop("embedding"))
    loaded.clear()
    if matrix.shape[0] != len(names):
        raise ValueError(f"{path}: {len(names)} filenames but {matrix.shape[0]} embeddings")
    if labels is not None and len(labels) != len(names):
        raise ValueError(f"{path}: {len(labels)} labels but {len(names)} filenames")
    _normalise_rows_in_place(path, matrix)
    return LoadedEmbeddings(names=names, embeddings=matrix, labels=labels)


# --------------------------------------------------------------------------- cluster folders


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
    tmp_path = dest.with_name(_tmp_name(dest.name) + secrets.token_hex(6))
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
        atomic_write(marker, _write_marker)


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

    _claim_root(root)
    root_str = os.fspath(root)
    present, present_dirs = _walk_tree(root_str)
    linked = copied = replaced = unchanged = removed = dirs_removed = 0
    missing: list[PurePosixPath] = []

    # Remove stale entries first so a stale file never blocks a needed folder.
    for rel in present:
        if rel not in checked:
            os.unlink(os.path.join(root_str, rel))
            removed += 1
    dirs_now = set(present_dirs)
    for rel in sorted(dirs_now.intersection(checked), key=lambda r: -r.count("/")):
        shutil.rmtree(os.path.join(root_str, rel))  # a folder where a file is wanted
        removed += 1
        dirs_now.difference_update(d for d in present_dirs if d == rel or d.startswith(rel + "/"))

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

    # Deepest first, so a folder emptied by removing its children goes too.
    for rel in sorted(dirs_now - needed_dirs, key=lambda r: -r.count("/")):
        try:
            os.rmdir(os.path.join(root_str, rel))
            dirs_removed += 1
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                raise
    return SyncStats(
        linked=linked,
        copied=copied,
        replaced=replaced,
        unchanged=unchanged,
        removed=removed,
        dirs_removed=dirs_removed,
        missing=tuple(missing),
    )


def _sanitise_basename(name: str) -> str:
    """A file name safe inside one folder: no separators, controls or leading dot."""
    cleaned = "".join(
        "_" if ch in "/\\" or ord(ch) < 0x20 or ord(ch) == 0x7F else ch for ch in name
    )
    stripped = cleaned.lstrip(".")
    cleaned = "_" * (len(cleaned) - len(stripped)) + stripped
    return cleaned or "_"


def _fit_name(stem_prefix: str, name: str, suffix_tag: str = "") -> str:
    """``stem_prefix + name`` with ``suffix_tag`` before the extension, cut to 255 bytes."""
    dot = name.rfind(".")
    stem, ext = (name[:dot], name[dot:]) if dot > 0 and len(name) - dot <= 16 else (name, "")
    tail = suffix_tag + ext
    budget = _MAX_NAME_BYTES - len((stem_prefix + tail).encode("utf-8", "surrogateescape"))
    encoded = stem.encode("utf-8", "surrogateescape")
    if len(encoded) > budget:
        # Cut on a character boundary so the result is still valid text.
        stem = encoded[:budget].decode("utf-8", "ignore")
    return stem_prefix + stem + tail


def _unique_name(taken: set[str], prefix: str, basename: str, seq: int) -> str:
    """A name not yet in ``taken``, derived deterministically from ``basename`` and ``seq``."""
    candidate = _fit_name(prefix, basename)
    attempt = 1
    while candidate in taken:
        tag = f"~{seq}" if attempt == 1 else f"~{seq}~{attempt}"
        candidate = _fit_name(prefix, basename, tag)
        attempt += 1
    taken.add(candidate)
    return candidate


def cluster_folder_plan(
    assignments: Sequence[Assignment],
    sources: Mapping[str, Path],
    *,
    representatives: Mapping[int, int] | None = None,
) -> dict[PurePosixPath, Path]:
    """Relative paths of the cluster folder tree for :func:`sync_link_tree`.

    Without ``representatives`` (``--gen_cluster_dirs``): ``<cluster>/<basename>``
    for every member of a cluster with two or more members and
    ``not-clustered/<basename>`` for singletons. With ``representatives``
    (``--dedup``; cluster id → seq of its representative): one file per cluster
    with two or more members, ``<cluster>_<basename>`` at the top level, and
    singletons in ``not-clustered/``. Basenames come from the source files,
    sanitised, and are de-duplicated in seq order (``name~<seq>.ext``).
    """
    members: dict[int, list[Assignment]] = {}
    for a in assignments:
        members.setdefault(a.cluster, []).append(a)
    placements: list[tuple[str, str, Assignment]] = []  # (folder, prefix, assignment)
    for cluster, group in members.items():
        if len(group) == 1:
            placements.append((NOT_CLUSTERED, "", group[0]))
        elif representatives is None:
            placements.extend((str(int(cluster)), "", a) for a in group)
        else:
            if cluster not in representatives:
                raise ValueError(f"no representative given for cluster {cluster}")
            rep = representatives[cluster]
            chosen = [a for a in group if a.seq == rep]
            if not chosen:
                raise ValueError(f"representative {rep} is not a member of cluster {cluster}")
            placements.append(("", f"{int(cluster)}_", chosen[0]))
    taken: dict[str, set[str]] = {}
    plan: dict[PurePosixPath, Path] = {}
    for folder, prefix, a in sorted(placements, key=lambda p: (p[0], p[2].seq)):
        if a.name not in sources:
            raise ValueError(f"no source file given for crop {a.name!r}")
        source = sources[a.name]
        if not isinstance(source, Path):
            source = Path(source)
        name = _unique_name(
            taken.setdefault(folder, set()), prefix, _sanitise_basename(source.name), a.seq
        )
        plan[PurePosixPath(folder, name) if folder else PurePosixPath(name)] = source
    return plan


def pick_representatives(
    assignments: Sequence[Assignment], embeddings: npt.NDArray[np.floating[Any]]
) -> dict[int, int]:
    """For each cluster with two or more members, the seq of the member nearest its mean.

    ``embeddings[i]`` is the vector of ``assignments[i]``. Nearness is cosine
    similarity to the mean of the cluster's vectors; ties go to the smallest seq.
    Works in chunks without per-member Python loops.
    """
    import scipy.sparse as sparse  # only this function needs scipy

    n = len(assignments)
    if embeddings.ndim != 2 or embeddings.shape[0] != n:
        raise ValueError(f"{n} assignments but embeddings have shape {embeddings.shape}")
    if n == 0:
        return {}
    clusters = np.fromiter((a.cluster for a in assignments), dtype=np.int64, count=n)
    seqs = np.fromiter((a.seq for a in assignments), dtype=np.int64, count=n)
    ids, inverse, counts = np.unique(clusters, return_inverse=True, return_counts=True)
    # Sparse indicator (clusters x items) @ embeddings sums each cluster without
    # copying or sorting the n x d matrix.
    # The indicator shares the embeddings' dtype so scipy does not upcast a copy.
    weight_dtype = np.float32 if embeddings.dtype == np.float32 else np.float64
    indicator = sparse.csr_matrix(
        (np.ones(n, dtype=weight_dtype), (inverse, np.arange(n))), shape=(len(ids), n)
    )
    sums = np.asarray(indicator @ embeddings, dtype=np.float64)
    scores = np.empty(n, dtype=np.float64)
    for start in range(0, n, _CHUNK_ROWS):
        chunk = np.asarray(embeddings[start : start + _CHUNK_ROWS], dtype=np.float64)
        means = sums[inverse[start : start + _CHUNK_ROWS]]
        dots = np.einsum("ij,ij->i", chunk, means)
        norms = np.sqrt(np.einsum("ij,ij->i", chunk, chunk)) * np.sqrt(
            np.einsum("ij,ij->i", means, means)
        )
        with np.errstate(invalid="ignore", divide="ignore"):
            cosine = np.where(norms > 0, dots / norms, 0.0)
        scores[start : start + len(chunk)] = cosine
    # Sort by cluster, best score first, then smallest seq; the first row of
    # each cluster is its representative.
    order = np.lexsort((seqs, -scores, inverse))
    first = np.ones(n, dtype=bool)
    first[1:] = inverse[order][1:] != inverse[order][:-1]
    picked = order[first]
    return {int(ids[inverse[i]]): int(seqs[i]) for i in picked.tolist() if counts[inverse[i]] >= 2}
