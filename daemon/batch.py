"""The batch command: resolve inputs, embed, cluster in one go, write outputs.

It drives the same stages the live daemon uses (intake, embed, link, outputs);
only the feeding differs: every crop arrives in one batch, in sorted filename
order, so a crop's sequence number is its rank in that order.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

from .atomic import atomic_write
from .clusterdirs import CLUSTER_DIRS, DEDUP_DIRS, cluster_folder_plan, pick_representatives
from .config import Config
from .csvfiles import CLUSTERS_CSV, ERRORS_CSV, write_clusters_csv, write_errors_csv
from .embfile import EMBEDDINGS_PKL, load_embeddings_pickle, write_embeddings_pickle
from .evaluate import (
    Evaluation,
    evaluate,
    labels_from_folders,
    load_labels_csv,
    match_labels,
)
from .factory import embedder_from_config, linker_from_config, linker_spec
from .flatbug import MetadataIndex, ProblemTally, TimeFormat, describe_crop, frames_of_names
from .inputs import resolve_inputs
from .linking import LinkBatch
from .linktree import SyncStats, sync_link_tree
from .log import get_logger
from .records import Assignment, Crop, FrameId, Skipped
from .sessions import SessionAssigner, SessionRule, capture_seconds, session_rule

log = get_logger(__name__)

EVAL_JSON = "eval.json"


@dataclass(frozen=True)
class BatchRequest:
    """One batch run: the effective config plus what only the command line says."""

    config: Config
    inputs: tuple[str, ...] = ()
    from_embeddings: Path | None = None
    labels_csv: Path | None = None
    labels_from_folders: bool = False
    num_classes: int | None = None


@dataclass(frozen=True)
class BatchResult:
    """What a batch run produced."""

    out: Path
    n_crops: int
    n_clusters: int
    n_singletons: int
    skipped: tuple[Skipped, ...]
    threshold: float
    method: str
    warnings: tuple[str, ...] = ()
    evaluation: Evaluation | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Embeddings:
    names: tuple[str, ...]
    paths: tuple[Path | None, ...]
    vectors: npt.NDArray[np.float32]
    crops: tuple[Crop, ...]
    labels: tuple[str | None, ...] | None
    # Without crops (a pickle, no metadata, not track): each name's frame, for its trap.
    frames: tuple[FrameId | None, ...] | None = None

    def rows(self, rows: npt.NDArray[np.int64]) -> _Embeddings:
        """The given rows only, in that order."""
        picked = rows.tolist()
        return _Embeddings(
            names=tuple(self.names[i] for i in picked),
            paths=tuple(self.paths[i] for i in picked),
            vectors=self.vectors[rows],
            crops=tuple(self.crops[i] for i in picked) if self.crops else (),
            labels=None if self.labels is None else tuple(self.labels[i] for i in picked),
            frames=None if self.frames is None else tuple(self.frames[i] for i in picked),
        )


def run_batch(request: BatchRequest) -> BatchResult:
    """Cluster the requested crops (or embeddings) and write every output.

    Writes clusters.csv, errors.csv, embeddings.pkl (unless re-clustering a
    pickle or ``output.save_embeddings`` is false), the cluster/dedup folders
    when asked and, with labels, eval.json into ``output.folder``. Raises
    `InputError`, `OSError` or `ValueError` for unusable inputs.
    """
    config = request.config
    out = config.output.folder
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    tally = ProblemTally()
    skipped: list[Skipped] = []

    t0 = time.perf_counter()
    if request.from_embeddings is not None:
        data = _from_pickle(request.from_embeddings, config, tally)
    else:
        data = _embed_inputs(request, config, tally, skipped)
    timings["embed_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sessions = _sessions(data, session_rule(config, "cluster"))
    ids = _cluster_sessions(config, data, sessions)
    timings["cluster_s"] = time.perf_counter() - t0
    sizes = np.bincount(ids, minlength=len(ids)) if len(ids) else np.zeros(0, dtype=np.int64)
    n_clusters = int(np.count_nonzero(sizes))
    n_singletons = int(np.count_nonzero(sizes == 1))
    spec = linker_spec(config)
    log.info(
        "clustered",
        crops=len(ids),
        clusters=n_clusters,
        singletons=n_singletons,
        method=spec.method,
        threshold=spec.threshold,
        metadata=spec.metadata,
        seconds=round(timings["cluster_s"], 2),
    )

    labels = _labels(request, data)
    t0 = time.perf_counter()
    if sessions is None:
        _write_outputs(request, data, ids, labels, skipped, out)
    else:
        write_errors_csv(out / ERRORS_CSV, skipped)
        for session, rows in sessions.items():
            part = data.rows(rows)
            local = np.searchsorted(rows, ids[rows])  # back to the session's own numbering
            sub_labels = None if labels is None else tuple(labels[i] for i in rows)
            _write_outputs(request, part, local, sub_labels, skipped=(), out=out / session)
        log.info("sessions_written", sessions=len(sessions), folder=str(out))
    timings["write_s"] = time.perf_counter() - t0

    evaluation = None
    if labels is not None:
        evaluation = _evaluate(out, ids, labels, request.num_classes)
    warnings = tuple(tally.summary_lines())
    for line in warnings:
        log.warning("crop_problems", summary=line)
    return BatchResult(
        out=out,
        n_crops=len(ids),
        n_clusters=n_clusters,
        n_singletons=n_singletons,
        skipped=tuple(skipped),
        threshold=spec.threshold,
        method=spec.method,
        warnings=warnings,
        evaluation=evaluation,
        timings=timings,
    )


def _sessions(data: _Embeddings, rule: SessionRule) -> dict[str, npt.NDArray[np.int64]] | None:
    """Each session's rows of ``data`` (ascending), sessions in id order; None for ``none``.

    Crops are assigned in capture-time order (``gap`` depends on it), the order
    the daemon sees them in when they arrive as they are taken.
    """
    if rule.single:
        return None
    times = np.array([_capture(data, i) for i in range(len(data.names))], dtype=np.float64)
    assigner = SessionAssigner(rule)
    rows: dict[str, list[int]] = {}
    for i in np.argsort(times, kind="stable").tolist():
        rows.setdefault(assigner.assign(float(times[i])), []).append(i)
    return {s: np.array(sorted(r), dtype=np.int64) for s, r in sorted(rows.items())}


def _capture(data: _Embeddings, i: int) -> float:
    """Row ``i``'s capture time as the daemon reads it (:func:`capture_seconds`)."""
    if data.crops:
        crop = data.crops[i]
        if crop.time is None and crop.mtime_ns is None and crop.path is not None:
            with contextlib.suppress(OSError):
                crop = replace(crop, mtime_ns=crop.path.stat().st_mtime_ns)
        return capture_seconds(crop)
    return float("nan")


def _cluster_sessions(
    config: Config, data: _Embeddings, sessions: dict[str, npt.NDArray[np.int64]] | None
) -> npt.NDArray[np.int64]:
    """Every crop's cluster id, in ``data`` order; sessions are linked apart.

    A cluster id is its smallest member's row, so ids of different sessions
    never collide (evaluation sees them as one clustering).
    """
    if sessions is None:
        return _cluster(config, data)
    ids = np.empty(len(data.names), dtype=np.int64)
    for rows in sessions.values():
        ids[rows] = rows[_cluster(config, data.rows(rows))]
    return ids


def _cluster(config: Config, data: _Embeddings) -> npt.NDArray[np.int64]:
    """Link every crop in one batch; each crop's cluster id, in ``data`` order."""
    linker = linker_from_config(config)
    batch = _link_batch(data)
    if len(batch):
        linker.add(batch)
    return linker.cluster_ids()


def _write_outputs(
    request: BatchRequest,
    data: _Embeddings,
    ids: npt.NDArray[np.int64],
    labels: tuple[str | None, ...] | None,
    skipped: Sequence[Skipped],
    out: Path,
) -> None:
    """clusters.csv, errors.csv, embeddings.pkl and the cluster/dedup folders in ``out``."""
    config = request.config
    out.mkdir(parents=True, exist_ok=True)
    assignments = [
        Assignment(seq=i, name=name, cluster=int(c))
        for i, (name, c) in enumerate(zip(data.names, ids.tolist(), strict=True))
    ]
    label_map = None
    if config.output.save_labels and labels is not None:
        label_map = {n: lab for n, lab in zip(data.names, labels, strict=True) if lab is not None}
    write_clusters_csv(out / CLUSTERS_CSV, assignments, label_map)
    write_errors_csv(out / ERRORS_CSV, skipped)
    if config.output.save_embeddings and request.from_embeddings is None:
        write_embeddings_pickle(out / EMBEDDINGS_PKL, data.names, data.vectors, labels)
    _write_folders(config, out, assignments, data)


def _describe(
    paths: Sequence[Path], names: Sequence[str], config: Config, tally: ProblemTally
) -> list[Crop]:
    """Read frame, time and box position of each crop from its name and metadata."""
    time_format = TimeFormat.compile(config.input.time_format)
    metadata = None
    if config.input.meta_folder is not None:
        # loose: the -mf folder may be kept apart from the crops (see MetadataIndex).
        metadata = MetadataIndex.scan(config.input.meta_folder, loose=True)
        log.info("metadata_indexed", folder=str(config.input.meta_folder), frames=len(metadata))
        if len(metadata) == 0:
            log.warning(
                "metadata_folder_empty",
                folder=str(config.input.meta_folder),
                hint="no metadata_*.json found; crops link on time alone",
            )
    crops = []
    for path, name in zip(paths, names, strict=True):
        crop, problems = describe_crop(path, name, time_format=time_format, metadata=metadata)
        tally.add(name, problems)
        crops.append(crop)
    return crops


def _embed_inputs(
    request: BatchRequest, config: Config, tally: ProblemTally, skipped: list[Skipped]
) -> _Embeddings:
    # Imported here: torch takes seconds to import and --from-embeddings needs none of it.
    from .decode import embed_crops

    paths = resolve_inputs(request.inputs, recursive=config.input.recursive)
    names = [str(p) for p in paths]
    log.info("inputs_resolved", files=len(paths))
    crops = _describe(paths, names, config, tally)
    embedder = embedder_from_config(config)
    kept: list[Crop] = []
    vectors: npt.NDArray[np.float32] | None = None
    started = last_report = time.perf_counter()
    for result in embed_crops(
        crops,
        embedder,
        batch_size=config.embed.batch_size,
        workers=config.input.workers,
        background=config.input.background_rgb,
        max_pixels=config.input.max_pixels,
    ):
        for skip in result.skipped:
            log.warning("file_skipped", file=skip.name, reason=skip.reason)
        skipped.extend(result.skipped)
        if result.embedded:
            if vectors is None:
                # One preallocated array: no list of per-crop vectors to stack later.
                vectors = np.empty((len(crops), result.embedded[0].vector.shape[0]), np.float32)
            for item in result.embedded:
                vectors[len(kept)] = item.vector
                kept.append(item.crop)
        now = time.perf_counter()
        if now - last_report >= 10:
            last_report = now
            done = len(kept) + len(skipped)
            log.info(
                "embed_progress",
                done=done,
                total=len(crops),
                crops_per_s=round(done / (now - started), 1),
            )
    log.info("embedded", crops=len(kept), skipped=len(skipped), model=embedder.describe())
    if vectors is None:
        vectors = np.empty((0, 0), np.float32)
    return _Embeddings(
        names=tuple(c.name for c in kept),
        paths=tuple(c.path for c in kept),
        vectors=vectors[: len(kept)],
        crops=tuple(kept),
        labels=None,
    )


def _from_pickle(path: Path, config: Config, tally: ProblemTally) -> _Embeddings:
    loaded = load_embeddings_pickle(path)
    log.info("embeddings_loaded", file=str(path), crops=len(loaded.names))
    # Frames, times and boxes come from the names; only needed for gating or track.
    if config.with_metadata or config.link.method == "track":
        paths = [Path(n) for n in loaded.names]
        crops = tuple(_describe(paths, loaded.names, config, tally))
        return _Embeddings(loaded.names, tuple(paths), loaded.embeddings, crops, loaded.labels)
    # Still each name's trap: no link may cross traps (frames_of_names shares one
    # record per frame, so a million names cost little memory).
    return _Embeddings(
        names=loaded.names,
        paths=(None,) * len(loaded.names),
        vectors=loaded.embeddings,
        crops=(),
        labels=loaded.labels,
        frames=frames_of_names(loaded.names),
    )


def _link_batch(data: _Embeddings) -> LinkBatch:
    if not data.crops:
        plain = LinkBatch.from_embeddings(data.vectors)
        if data.frames is None:
            return plain
        return replace(plain, frames=data.frames)
    crops = data.crops
    times = np.array([np.nan if c.time is None else c.time for c in crops], dtype=np.float64)
    centers = np.array([c.center or (np.nan, np.nan) for c in crops], dtype=np.float64)
    sizes = np.array([c.frame_size or (np.nan, np.nan) for c in crops], dtype=np.float64)
    n = len(crops)
    frames = tuple(c.frame for c in crops)
    return LinkBatch(data.vectors, times, centers.reshape(n, 2), frames, sizes.reshape(n, 2))


def _labels(request: BatchRequest, data: _Embeddings) -> tuple[str | None, ...] | None:
    if request.labels_csv is not None:
        mapping = load_labels_csv(request.labels_csv)
    elif request.labels_from_folders:
        # From the names, not data.paths: names from a pickle are paths too, and
        # paths are only filled in when the crops were described.
        mapping = labels_from_folders([Path(n) for n in data.names])
    else:
        return data.labels
    labels = tuple(match_labels(data.names, mapping))
    missing = sum(1 for lab in labels if lab is None)
    if missing:
        log.warning("labels_missing", crops=missing, of=len(labels))
    return labels


def _evaluate(
    out: Path, ids: npt.NDArray[np.int64], labels: Sequence[str | None], num_classes: int | None
) -> Evaluation | None:
    known = [i for i, lab in enumerate(labels) if lab is not None]
    if not known:
        return None
    evaluation = evaluate(ids[known].tolist(), [str(labels[i]) for i in known])
    if num_classes is not None and num_classes != evaluation.n_labels:
        log.warning("num_classes_mismatch", given=num_classes, found=evaluation.n_labels)
    payload = json.dumps(evaluation.to_dict(), indent=2).encode() + b"\n"

    def write(fh: BinaryIO) -> None:
        fh.write(payload)

    atomic_write(out / EVAL_JSON, write)
    return evaluation


def _write_folders(
    config: Config, out: Path, assignments: list[Assignment], data: _Embeddings
) -> None:
    if not (config.output.gen_cluster_dirs or config.output.dedup):
        return
    sources = {n: p for n, p in zip(data.names, data.paths, strict=True) if p is not None}
    if not sources:
        log.warning("cluster_folders_skipped", reason="no crop files (embeddings input)")
        return
    if config.output.gen_cluster_dirs:
        stats = sync_link_tree(out / CLUSTER_DIRS, cluster_folder_plan(assignments, sources))
        log.info("cluster_folders_written", folder=str(out / CLUSTER_DIRS), **_stats(stats))
    if config.output.dedup:
        reps = pick_representatives(assignments, data.vectors)
        plan = cluster_folder_plan(assignments, sources, representatives=reps)
        stats = sync_link_tree(out / DEDUP_DIRS, plan)
        log.info("dedup_written", folder=str(out / DEDUP_DIRS), **_stats(stats))


def _stats(stats: SyncStats) -> dict[str, int]:
    return {"linked": stats.linked, "copied": stats.copied, "removed": stats.removed}
