"""A session's cluster gallery: ``index.html`` that opens from ``file://``, offline.

The page and its script and style ship in the package (``gallery_assets/``)
and are copied next to the session's files; the data are JavaScript files that
assign globals (``gallery/index.js`` and one ``gallery/block-<k>.js`` per
block of cluster ids), since a page opened from ``file://`` cannot fetch JSON
in Chromium but may load scripts. Cluster ``c`` is in block ``c // BLOCK``:
cluster ids are the local number of a cluster's first crop, so a night's new
clusters fill new blocks and an old block changes only when one of its
clusters grows or merges. Only blocks whose bytes changed are written; the
index (written last, every file atomically) names each block with a hash of
its content, which the page adds to the block's URL so a reload never shows a
cached old block. Thumbnails are :mod:`crop_clusterd.thumbs`'s.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import BinaryIO, Final

import numpy as np
import numpy.typing as npt

from . import atomic
from .summary import SessionSummary
from .thumbs import thumb_name

__all__ = [
    "BLOCK",
    "GALLERY_DIR",
    "INDEX_HTML",
    "GalleryCrops",
    "GalleryWriter",
    "cluster_rows",
]

INDEX_HTML: Final = "index.html"
GALLERY_DIR: Final = "gallery"
BLOCK: Final = 1000
"""Cluster ids per data block."""

_ASSETS: Final = ("index.html", "gallery.js", "gallery.css")
# Seconds of 0001-01-01 and 9999-12-31T23:59:59 (see summary.py): outside, no time.
_TIME_RANGE: Final = (-62_135_596_800.0, 253_402_300_799.0)


@dataclass(frozen=True, slots=True, eq=False)
class GalleryCrops:
    """One session's live crops: ``names`` (as in ``clusters.csv``), their current
    ``clusters``, capture ``times`` (seconds, NaN when unknown), ``frames``
    (flat-bug frame name, None when unknown) and ``boxes`` (n×4: box centre x, y
    and frame width, height from flat-bug's metadata, pixels, NaN when unknown;
    None: no metadata at all), all of length n."""

    names: Sequence[str]
    clusters: npt.NDArray[np.int64]
    times: npt.NDArray[np.float64]
    frames: Sequence[str | None]
    boxes: npt.NDArray[np.float64] | None = None


def _isos(times: npt.NDArray[np.float64]) -> list[str | None]:
    """ISO local capture times to the second (None when unknown), vectorised."""
    ok = np.isfinite(times) & (times >= _TIME_RANGE[0]) & (times <= _TIME_RANGE[1])
    seconds = np.floor(np.where(ok, times, 0)).astype(np.int64)  # as fromtimestamp: down
    text = np.datetime_as_string(seconds.astype("datetime64[s]"), unit="s")
    return [str(t) if k else None for t, k in zip(text.tolist(), ok.tolist(), strict=True)]


def cluster_rows(crops: GalleryCrops) -> dict[int, list[object]]:
    """The page's row per cluster id: ``[id, crops, frames, first, last, members, track]``.

    ``frames`` counts distinct known frames (a crop without one counts as its
    own frame); ``first``/``last`` are ISO local capture times (None when no
    crop has one); ``members`` lists ``[name, thumbnail file, time]`` in
    capture-time order (crops without a time last, then by name). ``track`` is
    the box track the page sketches (:func:`_track`), None without boxes.
    """
    by_cluster: dict[int, list[int]] = {}
    for i, c in enumerate(crops.clusters.tolist()):
        by_cluster.setdefault(c, []).append(i)
    isos = _isos(crops.times)
    thumbs = [thumb_name(n) for n in crops.names]
    rows: dict[int, list[object]] = {}
    for c, members in by_cluster.items():
        times = [float(crops.times[i]) for i in members]
        order = sorted(
            range(len(members)),
            key=lambda k: (not np.isfinite(times[k]), times[k], crops.names[members[k]]),
        )
        frames = {crops.frames[i] or f"\0{i}" for i in members}
        known = [i for i in members if isos[i] is not None]
        rows[c] = [
            c,
            len(members),
            len(frames),
            min((isos[i] for i in known), key=str, default=None),
            max((isos[i] for i in known), key=str, default=None),
            [[crops.names[members[k]], thumbs[members[k]], isos[members[k]]] for k in order],
            _track(crops.boxes, [members[k] for k in order]),
        ]
    return rows


def _track(boxes: npt.NDArray[np.float64] | None, members: list[int]) -> list[object] | None:
    """``[frame width, frame height, [x0, y0, x1, y1, ...]]``: the box centres of
    ``members`` (already in capture order) that have one, in whole pixels, and
    the frame size most of them were captured in (None each when unknown; the
    page then frames the track by its own extent). None when no member has a box.
    """
    if boxes is None:
        return None
    picked = boxes[members]
    known = picked[np.isfinite(picked[:, :2]).all(axis=1)]
    if len(known) == 0:
        return None
    sizes = known[np.isfinite(known[:, 2:]).all(axis=1), 2:]
    frame: list[float | None] = [None, None]
    if len(sizes):
        values, counts = np.unique(sizes, axis=0, return_counts=True)
        frame = [round(float(v)) for v in values[int(np.argmax(counts))]]
    return [*frame, np.rint(known[:, :2]).astype(np.int64).ravel().tolist()]


def _json(value: object) -> str:
    # ensure_ascii: the files are pure ASCII, so their encoding can never be misread;
    # "</" is escaped so no crop name can close a script element.
    return json.dumps(value, ensure_ascii=True, separators=(",", ":")).replace("</", "<\\/")


def _script(call: str, value: object) -> bytes:
    return f"{call}({_json(value)});\n".encode("ascii")


def _put(path: Path, data: bytes) -> None:
    def write(handle: BinaryIO) -> None:
        handle.write(data)

    atomic.atomic_write(path, write)


def _digest(data: bytes) -> str:
    return hashlib.sha1(data, usedforsecurity=False).hexdigest()[:12]


@dataclass
class _Remembered:
    """What a writer keeps of one folder between snapshots: each block's file
    digest, and each cluster's row (JSON text) with the key it was built from."""

    blocks: dict[int, str]
    keys: dict[int, tuple[int, int]] = field(default_factory=dict)
    rows: dict[int, str] = field(default_factory=dict)
    index: bytes = b""


@dataclass
class GalleryWriter:
    """Writes session folders' galleries, rebuilding only what changed.

    A cluster's row is rebuilt only when its members changed (:func:`_cluster_keys`),
    a block file is rewritten only when one of its rows changed, and the index
    only when a block or the summary did: a snapshot where a few clusters grew
    costs those clusters' rows plus a few vectorised passes over the session's
    crops. ``root`` is what relative crop names are relative to (a ``file://``
    URL ending in ``/``; the page links absolute names directly). Raises
    ``OSError`` when a file cannot be written (the previous one stays).
    """

    root: str = ""
    _folders: dict[Path, _Remembered] = field(default_factory=dict)

    def write(
        self, folder: Path, crops: GalleryCrops, summary: SessionSummary, *, title: str = ""
    ) -> int:
        """Write ``folder``'s page, its changed blocks and the index; returns the
        number of blocks written."""
        data = folder / GALLERY_DIR
        data.mkdir(parents=True, exist_ok=True)
        self._assets(folder)
        state = self._folders.get(folder)
        if state is None:
            state = self._folders[folder] = _Remembered(_blocks_on_disk(data))
        dirty = _update_rows(state, crops)
        written = 0
        hashes: dict[int, str] = {}
        for k, clusters in _by_block(state.rows).items():
            path = data / _block_file(k)
            if k not in dirty and k in state.blocks and path.exists():
                hashes[k] = state.blocks[k]
                continue
            rows = ",".join(state.rows[c] for c in clusters)
            block = f"galleryBlock([{k},[{rows}]]);\n".encode("ascii")
            hashes[k] = _digest(block)
            if state.blocks.get(k) != hashes[k] or not path.exists():
                _put(path, block)
                written += 1
        index = {
            "title": title,
            "summary": summary.to_json(),
            "root": self.root,
            "blocks": [[k, hashes[k]] for k in sorted(hashes)],
        }
        body = _script("galleryIndex", index)
        if state.index != body or not (data / "index.js").exists():
            _put(data / "index.js", body)
            state.index = body
        for k in set(state.blocks) - set(hashes):  # blocks whose clusters all merged away
            (data / _block_file(k)).unlink(missing_ok=True)
        state.blocks = hashes
        return written

    def forget(self, folder: Path) -> None:
        """Drop what is remembered of ``folder`` (a closed session's)."""
        self._folders.pop(folder, None)

    def _assets(self, folder: Path) -> None:
        source = resources.files("crop_clusterd").joinpath("gallery_assets")
        for name in _ASSETS:
            body = source.joinpath(name).read_bytes()
            target = folder / (name if name == INDEX_HTML else f"{GALLERY_DIR}/{name}")
            try:
                if target.read_bytes() == body:
                    continue
            except FileNotFoundError:
                pass
            _put(target, body)


def _update_rows(state: _Remembered, crops: GalleryCrops) -> set[int]:
    """Rebuild the rows of the clusters whose members changed, drop those of
    clusters that are gone; returns the blocks touched."""
    keys = _cluster_keys(crops)
    changed = [c for c, key in keys.items() if state.keys.get(c) != key]
    gone = [c for c in state.keys if c not in keys]
    for c in gone:
        del state.keys[c], state.rows[c]
    if changed:
        members = np.flatnonzero(np.isin(crops.clusters, changed))
        for c, row in cluster_rows(_subset(crops, members)).items():
            state.rows[c] = _json(row)
            state.keys[c] = keys[c]
    return {c // BLOCK for c in (*changed, *gone)}


_MIX: Final = (
    np.uint64(0x9E3779B97F4A7C15),
    np.uint64(0xC2B2AE3D27D4EB4F),
    np.uint64(0x165667B19E3779F9),
)


def _cluster_keys(crops: GalleryCrops) -> dict[int, tuple[int, int]]:
    """Each cluster's (crops, fingerprint of its members' names, times and boxes).

    Vectorised: one Python ``hash`` per name (cached on the string, which the
    snapshot keeps from one snapshot to the next) and numpy sums, so it costs
    a few milliseconds at 100,000 crops where building every row costs seconds.
    """
    n = len(crops.names)
    names = np.fromiter((hash(x) for x in crops.names), dtype=np.int64, count=n)
    with np.errstate(over="ignore"):  # wrap-around is the point: sums modulo 2**64
        mixed = names.view(np.uint64) * _MIX[0] + crops.times.view(np.uint64) * _MIX[1]
        if crops.boxes is not None:
            boxes = np.ascontiguousarray(crops.boxes).view(np.uint64)
            mixed += (boxes * _MIX[2]).sum(axis=1, dtype=np.uint64)
        order = np.argsort(crops.clusters, kind="stable")
        ids, starts, counts = np.unique(
            crops.clusters[order], return_index=True, return_counts=True
        )
        sums = np.add.reduceat(mixed[order], starts) if n else np.empty(0, np.uint64)
    return dict(zip(ids.tolist(), zip(counts.tolist(), sums.tolist(), strict=True), strict=True))


def _by_block(rows: dict[int, str]) -> dict[int, list[int]]:
    """The clusters of each block, in id order, blocks in order."""
    out: dict[int, list[int]] = {}
    for c in sorted(rows):
        out.setdefault(c // BLOCK, []).append(c)
    return out


def _subset(crops: GalleryCrops, members: npt.NDArray[np.int64]) -> GalleryCrops:
    idx = members.tolist()
    return GalleryCrops(
        [crops.names[i] for i in idx],
        crops.clusters[members],
        crops.times[members],
        [crops.frames[i] for i in idx],
        None if crops.boxes is None else crops.boxes[members],
    )


def _block_file(k: int) -> str:
    return f"block-{k}.js"


def _blocks_on_disk(data: Path) -> dict[int, str]:
    """The blocks a previous process wrote, with their hashes, so that a restart
    rewrites none that is still the same."""
    found: dict[int, str] = {}
    for entry in os.scandir(data):
        stem = entry.name.removeprefix("block-").removesuffix(".js")
        if entry.name.startswith("block-") and entry.name.endswith(".js") and stem.isdigit():
            try:
                found[int(stem)] = _digest(Path(entry.path).read_bytes())
            except FileNotFoundError:
                continue
    return found
