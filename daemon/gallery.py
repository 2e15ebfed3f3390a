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
from datetime import UTC, datetime
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


def _iso(t: float) -> str | None:
    if not (np.isfinite(t) and _TIME_RANGE[0] <= t <= _TIME_RANGE[1]):
        return None
    return datetime.fromtimestamp(t, UTC).replace(tzinfo=None).isoformat(timespec="seconds")


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
    rows: dict[int, list[object]] = {}
    for c, members in by_cluster.items():
        times = [float(crops.times[i]) for i in members]
        order = sorted(
            range(len(members)),
            key=lambda k: (not np.isfinite(times[k]), times[k], crops.names[members[k]]),
        )
        frames = {crops.frames[i] or f"\0{i}" for i in members}
        known = [t for t in times if np.isfinite(t)]
        rows[c] = [
            c,
            len(members),
            len(frames),
            _iso(min(known)) if known else None,
            _iso(max(known)) if known else None,
            [
                [crops.names[members[k]], thumb_name(crops.names[members[k]]), _iso(times[k])]
                for k in order
            ],
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


def _script(call: str, value: object) -> bytes:
    # ensure_ascii: the file is pure ASCII, so its encoding can never be misread;
    # "</" is escaped so no crop name can close a script element.
    text = json.dumps(value, ensure_ascii=True, separators=(",", ":")).replace("</", "<\\/")
    return f"{call}({text});\n".encode("ascii")


def _put(path: Path, data: bytes) -> None:
    def write(handle: BinaryIO) -> None:
        handle.write(data)

    atomic.atomic_write(path, write)


def _digest(data: bytes) -> str:
    return hashlib.sha1(data, usedforsecurity=False).hexdigest()[:12]


@dataclass
class GalleryWriter:
    """Writes session folders' galleries, rewriting only what changed.

    ``root`` is what relative crop names are relative to (a ``file://`` URL
    ending in ``/``; the page links absolute names directly). Raises
    ``OSError`` when a file cannot be written (the previous one stays).
    """

    root: str = ""
    _blocks: dict[Path, dict[int, str]] = field(default_factory=dict)
    _inputs: dict[Path, dict[int, bytes]] = field(default_factory=dict)
    _index: dict[Path, bytes] = field(default_factory=dict)

    def write(
        self, folder: Path, crops: GalleryCrops, summary: SessionSummary, *, title: str = ""
    ) -> int:
        """Write ``folder``'s page, its changed blocks and the index; returns the
        number of blocks written."""
        data = folder / GALLERY_DIR
        data.mkdir(parents=True, exist_ok=True)
        self._assets(folder)
        known = self._blocks.setdefault(folder, _blocks_on_disk(data))
        inputs = self._inputs.setdefault(folder, {})
        written = 0
        hashes: dict[int, str] = {}
        for k, members in _block_members(crops.clusters).items():
            # Rows are built only for a block whose crops changed: at 100,000
            # crops building every row at every snapshot costs seconds.
            signature = _signature(crops, members)
            if inputs.get(k) == signature and k in known and (data / _block_file(k)).exists():
                hashes[k] = known[k]
                continue
            rows = cluster_rows(_subset(crops, members))
            body = _script("galleryBlock", [k, [rows[c] for c in sorted(rows)]])
            hashes[k] = _digest(body)
            inputs[k] = signature
            if known.get(k) != hashes[k] or not (data / _block_file(k)).exists():
                _put(data / _block_file(k), body)
                written += 1
        index = {
            "title": title,
            "summary": summary.to_json(),
            "root": self.root,
            "blocks": [[k, hashes[k]] for k in sorted(hashes)],
        }
        body = _script("galleryIndex", index)
        if self._index.get(folder) != body or not (data / "index.js").exists():
            _put(data / "index.js", body)
            self._index[folder] = body
        for k in set(known) - set(hashes):  # blocks whose clusters all merged away
            (data / _block_file(k)).unlink(missing_ok=True)
            inputs.pop(k, None)
        self._blocks[folder] = hashes
        return written

    def forget(self, folder: Path) -> None:
        """Drop what is remembered of ``folder`` (a closed session's)."""
        self._blocks.pop(folder, None)
        self._inputs.pop(folder, None)
        self._index.pop(folder, None)

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


def _block_members(clusters: npt.NDArray[np.int64]) -> dict[int, npt.NDArray[np.int64]]:
    """Each block's crops (indexes, in crop order), blocks in id order."""
    order = np.argsort(clusters // BLOCK, kind="stable")
    blocks = (clusters // BLOCK)[order]
    cuts = np.flatnonzero(np.diff(blocks)) + 1
    return {int(blocks[g[0]]): order[g] for g in np.split(np.arange(len(order)), cuts) if len(g)}


def _signature(crops: GalleryCrops, members: npt.NDArray[np.int64]) -> bytes:
    """A digest of everything a block's rows are built from."""
    h = hashlib.sha1(usedforsecurity=False)
    h.update(members.tobytes())
    h.update(crops.clusters[members].tobytes())
    h.update(crops.times[members].tobytes())
    if crops.boxes is not None:
        h.update(crops.boxes[members].tobytes())
    idx = members.tolist()
    h.update("\0".join(crops.names[i] for i in idx).encode("utf-8", "surrogateescape"))
    h.update("\0".join(crops.frames[i] or "" for i in idx).encode("utf-8", "surrogateescape"))
    return h.digest()


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
