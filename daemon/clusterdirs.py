"""Cluster folders: which crop goes where under ``clusters/`` and ``dedup/``.

:func:`cluster_folder_plan` maps assignments to relative paths (sanitised,
de-duplicated names); :func:`~crop_clusterd.linktree.sync_link_tree` makes a
folder match the plan. :func:`pick_representatives` chooses each cluster's
crop for ``dedup/``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from .embfile import ROW_CHUNK
from .records import Assignment

__all__ = [
    "CLUSTER_DIRS",
    "DEDUP_DIRS",
    "NOT_CLUSTERED",
    "cluster_folder_plan",
    "pick_representatives",
]

CLUSTER_DIRS: Final = "clusters"
"""Folder of one sub-folder per cluster (``--gen_cluster_dirs``) in an output folder."""
DEDUP_DIRS: Final = "dedup"
"""Folder of one representative per cluster (``--dedup``) in an output folder."""
NOT_CLUSTERED: Final = "not-clustered"
"""Folder that holds the crops of single-member clusters."""

_MAX_NAME_BYTES = 255


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
    for start in range(0, n, ROW_CHUNK):
        chunk = np.asarray(embeddings[start : start + ROW_CHUNK], dtype=np.float64)
        means = sums[inverse[start : start + ROW_CHUNK]]
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
