"""The ``track`` linker's checkpoint file: what later matching needs, no pickle.

A checkpoint holds the state a :class:`~crop_clusterd.linking.track.TrackLinker`
cannot read back from the stored crops: the open tracklets of each trap (their
first and last crop, first and last time and frame ordinal, latest crops, the
sums of their embeddings and centres that stitching compares), the frames of
each cluster that still has an open tracklet, the frame ordinal of each trap
and the retired crops. Which track every crop is in is
not written: each track's cluster id is its smallest member's sequence number,
so the stored cluster ids give it back. The file's size therefore depends on
how many tracklets are open, not on how many crops came before.

To tell a checkpoint that belongs to the stored crops from one that does not,
it also holds a digest of the cluster ids it covers, and the times, centres and
a digest of the vectors of the active tracks' latest crops (the only crops
later matching reads); :mod:`.track` compares those with the stored crops
before using it. Crops' vectors are not written (only one sum per open
tracklet): a few tracks' latest crops would already outweigh everything else in
the file, which is rewritten every ``state.index_save_s``.

Format: one NumPy ``.npz`` archive (read with ``allow_pickle=False``) whose
``meta`` member is UTF-8 JSON (format, version, settings, covered crops,
dimension, traps, digests) and whose other members are plain numeric arrays.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from ..atomic import atomic_write
from ..records import TrapId
from .base import FloatArray, IntArray

__all__ = ["CheckpointError", "TrackCheckpoint", "checkpoint_path", "digest"]

FORMAT = "crop-clusterd track checkpoint"
VERSION = 2


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or is not one this code wrote."""


def checkpoint_path(index_file: Path) -> Path:
    """Where ``track`` keeps its checkpoint beside the saved-index path it is given.

    ``state/index.hnsw`` gives ``state/index.track.npz``: a name of its own, so
    an HNSW index is never read as a checkpoint nor the other way round.
    """
    return index_file.with_name(f"{index_file.stem}.track.npz")


def digest(values: IntArray | npt.NDArray[np.float32]) -> str:
    """A 128-bit hex digest of an int64 or float32 array's little-endian bytes."""
    dtype = "<i8" if values.dtype.kind == "i" else "<f4"
    data = np.ascontiguousarray(values, dtype=dtype).tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass(frozen=True)
class TrackCheckpoint:
    """The state of a ``track`` linker after its first ``covers`` crops.

    ``settings`` the linker's settings (JSON values); ``dim`` the embedding
    dimension; ``traps`` the trap of each trap code in code order (code 0 is
    always ``None``, crops without a flat-bug frame); ``ids_digest``
    :func:`digest` of the covered crops' cluster ids; ``vectors_digest`` of
    the vectors of ``recent_seqs`` (R x dim float32, rows of retired crops zero,
    as the linker holds them).

    Arrays, A open tracklets (not yet closed by the stitching pass, see
    :mod:`.stitch`): ``ordinals`` (T,) frames matched so far per trap code;
    ``active_trap``, ``active_first`` (A,) each open tracklet's trap code and
    first crop, in each trap's matching order; ``first_ordinal``,
    ``first_time`` (A,) of its first frame; ``last_seq``, ``last_ordinal``
    (A,) int64 and ``last_time`` (A,) seconds (NaN unknown) of its latest
    frame; ``recent`` (A, memory) its latest crops, oldest first, padded with
    -1 at the end; ``vsum`` (A, dim) float64 the sum of its embeddings,
    ``csum`` (A, 2) and ``ccount`` (A,) of its known centres. F pairs
    ``frames_cluster``, ``frames_ordinal``: the frame ordinals held by each
    cluster with an open tracklet. ``retired`` the retired crops.
    R distinct latest crops: ``recent_seqs`` (R,) ascending, ``recent_times``
    (R,), ``recent_centers`` (R, 2) pixels.
    """

    settings: dict[str, Any]
    covers: int
    dim: int
    traps: tuple[TrapId | None, ...]
    ids_digest: str
    vectors_digest: str
    ordinals: IntArray
    active_trap: IntArray
    active_first: IntArray
    first_ordinal: IntArray
    first_time: FloatArray
    last_seq: IntArray
    last_ordinal: IntArray
    last_time: FloatArray
    recent: IntArray
    vsum: FloatArray
    csum: FloatArray
    ccount: IntArray
    frames_cluster: IntArray
    frames_ordinal: IntArray
    retired: IntArray
    recent_seqs: IntArray
    recent_times: FloatArray
    recent_centers: FloatArray

    def write(self, path: Path) -> None:
        """Write the checkpoint to ``path`` atomically; OSError on failure."""
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "settings": self.settings,
            "covers": self.covers,
            "dim": self.dim,
            "traps": [None if t is None else [t.place, t.identifier] for t in self.traps],
            "ids_digest": self.ids_digest,
            "vectors_digest": self.vectors_digest,
        }
        arrays = {name: getattr(self, name) for name in _SHAPES}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)

        def write(handle: BinaryIO) -> None:
            np.savez(handle, **arrays)

        atomic_write(path, write)

    @classmethod
    def read(cls, path: Path) -> TrackCheckpoint:
        """Read a checkpoint; raises FileNotFoundError when there is none and
        :class:`CheckpointError` when it is unreadable, of another format or
        version, or its arrays disagree in shape."""
        try:
            with np.load(path, allow_pickle=False) as npz:
                meta = json.loads(bytes(npz["meta"]).decode())
                raw = {name: npz[name] for name in _SHAPES}
        except FileNotFoundError:
            raise
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise CheckpointError(f"unreadable checkpoint {path}: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a track checkpoint")
        if meta.get("version") != VERSION:
            raise CheckpointError(f"{path}: checkpoint version {meta.get('version')!r}")
        try:
            settings, covers, dim = dict(meta["settings"]), int(meta["covers"]), int(meta["dim"])
            traps = tuple(
                None if t is None else TrapId(str(t[0]), str(t[1])) for t in meta["traps"]
            )
            digests = str(meta["ids_digest"]), str(meta["vectors_digest"])
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise CheckpointError(f"{path}: bad checkpoint header: {exc}") from exc
        arrays = _checked(raw, {"m": int(settings.get("memory", 0)), "d": dim}, path)
        return cls(settings, covers, dim, traps, *digests, **arrays)


# Each array's dtype and shape: "A", "R", "T" are counts shared between arrays,
# "m" the track memory, "d" the embedding dimension, "*" any length.
_SHAPES: dict[str, tuple[str, tuple[str | int, ...]]] = {
    "ordinals": ("<i8", ("T",)),
    "active_trap": ("<i8", ("A",)),
    "active_first": ("<i8", ("A",)),
    "first_ordinal": ("<i8", ("A",)),
    "first_time": ("<f8", ("A",)),
    "last_seq": ("<i8", ("A",)),
    "last_ordinal": ("<i8", ("A",)),
    "last_time": ("<f8", ("A",)),
    "recent": ("<i8", ("A", "m")),
    "vsum": ("<f8", ("A", "d")),
    "csum": ("<f8", ("A", 2)),
    "ccount": ("<i8", ("A",)),
    "frames_cluster": ("<i8", ("F",)),
    "frames_ordinal": ("<i8", ("F",)),
    "retired": ("<i8", ("*",)),
    "recent_seqs": ("<i8", ("R",)),
    "recent_times": ("<f8", ("R",)),
    "recent_centers": ("<f8", ("R", 2)),
}


def _checked(raw: dict[str, npt.NDArray[Any]], known: dict[str, int], path: Path) -> dict[str, Any]:
    """The arrays with their dtypes and shapes checked; CheckpointError otherwise."""
    sizes = dict(known)
    out: dict[str, Any] = {}
    for name, (dtype, shape) in _SHAPES.items():
        array = raw[name]
        if array.dtype != np.dtype(dtype) or array.ndim != len(shape):
            raise CheckpointError(f"{path}: {name} is {array.dtype} {array.shape}")
        for axis, want in zip(shape, array.shape, strict=True):
            if isinstance(axis, int):
                ok = want == axis
            elif axis == "*":
                ok = True
            else:
                ok = sizes.setdefault(axis, want) == want
            if not ok:
                raise CheckpointError(f"{path}: {name} has shape {array.shape}")
        out[name] = array
    return out
