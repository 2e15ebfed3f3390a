"""What a clustering gets wrong, by kind, against per-crop ground truth.

A pure analysis of (cluster id per crop, truth row per crop), used by
``scripts/bench_methods.py`` to say what a change to the linker fixes or
breaks. The truth is the simulator's ``truth.csv`` (one row per crop:
``filename,individual,visit,frame,time_s,cx,cy,jump,blur,still``) or, where a
session has none, rows derived from labels, frame times and box centres
(:func:`derive_truth`), which know one visit per individual and no blur.

Error kinds (see :class:`TrackErrors`):

* seen from an individual, walking its detections in frame order, each
  consecutive pair put in different clusters is a *break*: at a move when the
  later detection jumped, at a return when the pair spans two visits, else
  within a visit (and of those, how many touch a blurred crop);
* seen from a cluster, walking the frames it has crops in, a step whose
  individuals are all new (none of the previous frame's continue) is a
  *handover*; two handovers in one frame that exchange the same individuals
  between two clusters are one *swap*, every other handover a *takeover*.

A swap therefore also shows as breaks of both individuals: the counts answer
different questions and are not meant to add up.
"""

from __future__ import annotations

import csv
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path

from .flatbug import MetadataIndex, TimeFormat, frame_of_crop, parse_crop_name

__all__ = [
    "JUMP_PX",
    "TRUTH_COLUMNS",
    "TrackErrors",
    "Truth",
    "TruthRow",
    "analyse",
    "derive_truth",
    "load_truth_csv",
]

TRUTH_COLUMNS = ("filename", "individual", "visit", "frame", "time_s", "cx", "cy")
"""Columns ``truth.csv`` must have; ``jump``, ``blur`` and ``still`` are read when present."""

JUMP_PX = 60.0
"""Derived truth: a detection whose box centre moved more than this since its
individual's previous detection counts as a jump (the simulator drifts about
2.5 px a frame and hops 80-500 px, so 60 px separates the two)."""


@dataclass(frozen=True, slots=True)
class TruthRow:
    """What really happened for one crop.

    ``frame`` orders frames (an index, or any increasing number); ``time_s``
    is seconds from any origin; ``cx``/``cy`` the box centre in frame pixels,
    None when unknown. ``jump``: the individual moved more than a drift since
    its previous detection; ``blur``: the crop is motion-blurred; ``still``:
    the individual is in a still period.
    """

    filename: str
    individual: str
    visit: int
    frame: int
    time_s: float
    cx: float | None = None
    cy: float | None = None
    jump: bool = False
    blur: bool = False
    still: bool = False


@dataclass(frozen=True, slots=True)
class Truth:
    """Truth rows and, when any part was derived rather than read, how."""

    rows: tuple[TruthRow, ...]
    derived: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TrackErrors:
    """Error counts of one clustering (see the module docstring for the kinds).

    ``clusters`` counts the clusters holding at least one truth crop;
    ``crops_off_main`` the crops outside their individual's largest cluster;
    ``mixed_clusters`` the clusters holding two or more individuals.
    """

    crops: int
    individuals: int
    clusters: int
    clusters_per_individual: float
    breaks_within_visit: int
    breaks_blurred: int
    breaks_at_move: int
    breaks_at_return: int
    takeovers: int
    swaps: int
    singletons: int
    mixed_clusters: int
    crops_off_main: int

    def to_dict(self) -> dict[str, int | float]:
        """The counts as a flat dict, for JSON output."""
        return asdict(self)


def _order(row: TruthRow) -> tuple[int, float, str]:
    return (row.frame, row.time_s, row.filename)


def analyse(clusters: Sequence[int], truth: Sequence[TruthRow]) -> TrackErrors:
    """Count the errors of ``clusters`` (one id per crop) against ``truth`` (same order).

    Raises ``ValueError`` when the lengths differ or there are no crops.
    """
    if len(clusters) != len(truth):
        raise ValueError(f"{len(clusters)} cluster ids but {len(truth)} truth rows")
    if not truth:
        raise ValueError("no crops to analyse")
    by_individual: dict[str, list[tuple[TruthRow, int]]] = defaultdict(list)
    for row, cid in zip(truth, clusters, strict=True):
        by_individual[row.individual].append((row, cid))
    within = blurred = at_move = at_return = off_main = 0
    for seen in by_individual.values():
        seen.sort(key=lambda pair: _order(pair[0]))
        for (prev, c_prev), (cur, c_cur) in pairwise(seen):
            if c_prev == c_cur:
                continue
            if cur.visit != prev.visit:
                at_return += 1
            elif cur.jump:
                at_move += 1
            else:
                within += 1
                blurred += prev.blur or cur.blur
        off_main += len(seen) - max(Counter(c for _, c in seen).values())
    sizes = Counter(clusters)
    takeovers, swaps = _handovers(clusters, truth)
    members: dict[int, set[str]] = defaultdict(set)
    for row, cid in zip(truth, clusters, strict=True):
        members[cid].add(row.individual)
    return TrackErrors(
        crops=len(truth),
        individuals=len(by_individual),
        clusters=len(sizes),
        clusters_per_individual=len(sizes) / len(by_individual),
        breaks_within_visit=within,
        breaks_blurred=blurred,
        breaks_at_move=at_move,
        breaks_at_return=at_return,
        takeovers=takeovers,
        swaps=swaps,
        singletons=sum(1 for n in sizes.values() if n == 1),
        mixed_clusters=sum(1 for m in members.values() if len(m) > 1),
        crops_off_main=off_main,
    )


def _handovers(clusters: Sequence[int], truth: Sequence[TruthRow]) -> tuple[int, int]:
    """(takeovers, swaps): see the module docstring."""
    frames: dict[int, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
    for row, cid in zip(truth, clusters, strict=True):
        frames[cid][row.frame].add(row.individual)
    # Handovers keyed by the frame they happen in: (cluster, before, after).
    events: dict[int, list[tuple[int, frozenset[str], frozenset[str]]]] = defaultdict(list)
    for cid, per_frame in frames.items():
        order = sorted(per_frame)
        for f_prev, f in pairwise(order):
            if not per_frame[f_prev] & per_frame[f]:
                events[f].append((cid, frozenset(per_frame[f_prev]), frozenset(per_frame[f])))
    handovers = swaps = 0
    for happened in events.values():
        handovers += len(happened)
        unpaired = list(happened)
        while unpaired:
            cid, before, after = unpaired.pop()
            for i, (other, o_before, o_after) in enumerate(unpaired):
                if other != cid and o_before == after and o_after == before:
                    del unpaired[i]
                    swaps += 1
                    break
    return handovers - 2 * swaps, swaps


# --- reading and deriving truth -----------------------------------------------------------


def _flag(value: str | None) -> bool:
    return value is not None and value.strip() not in ("", "0", "false", "False")


def _coord(value: str) -> float | None:
    return float(value) if value.strip() else None


def load_truth_csv(path: Path) -> list[TruthRow]:
    """Read the simulator's ``truth.csv`` (see :data:`TRUTH_COLUMNS`).

    Raises ``ValueError`` naming the file for a missing column or a bad number.
    """
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in TRUTH_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}")
        rows: list[TruthRow] = []
        for rec in reader:
            try:
                rows.append(
                    TruthRow(
                        filename=rec["filename"],
                        individual=rec["individual"],
                        visit=int(rec["visit"]),
                        frame=int(rec["frame"]),
                        time_s=float(rec["time_s"]),
                        cx=_coord(rec["cx"]),
                        cy=_coord(rec["cy"]),
                        jump=_flag(rec.get("jump")),
                        blur=_flag(rec.get("blur")),
                        still=_flag(rec.get("still")),
                    )
                )
            except ValueError as exc:
                raise ValueError(f"{path}: line {reader.line_num}: {exc}") from None
    return rows


CentreOf = Callable[[str], tuple[float, float] | None]


def metadata_centres(folder: Path) -> CentreOf:
    """A look-up of a crop path's box centre in the flat-bug JSON under ``folder``."""
    index = MetadataIndex.scan(folder, loose=True)

    def centre(name: str) -> tuple[float, float] | None:
        parsed = parse_crop_name(name)
        if parsed is None:
            return None
        return index.center(frame_of_crop(Path(name), parsed), parsed.index)[0]

    return centre


def derive_truth(
    names: Sequence[str],
    labels: Mapping[str, str],
    time_format: TimeFormat,
    centre_of: CentreOf | None = None,
    jump_px: float = JUMP_PX,
) -> Truth:
    """Truth rows for the labelled crops among ``names`` (paths of flat-bug crops).

    One visit per individual; frames ordered by the time in their name (crops
    without a readable time are left out); a jump where the box centre moved
    more than ``jump_px`` since the individual's previous detection, when
    ``centre_of`` knows both centres; no blur or still periods known.
    """
    found: list[tuple[str, str, str, float]] = []
    for name in names:
        label = labels.get(name)
        parsed = parse_crop_name(name)
        when = None if parsed is None else time_format.parse(parsed.frame)
        if label is not None and parsed is not None and when is not None:
            found.append((name, label, parsed.frame, when))
    if not found:
        return Truth(())
    first = min(t for *_, t in found)
    frame_rank = {f: i for i, f in enumerate(sorted({(t, f) for _, _, f, t in found}))}
    rows = []
    last: dict[str, tuple[float, float] | None] = {}
    for name, label, frame, when in sorted(found, key=lambda r: (r[3], r[2], r[0])):
        centre = None if centre_of is None else centre_of(name)
        prev = last.get(label)
        jump = centre is not None and prev is not None and math.dist(centre, prev) > jump_px
        last[label] = centre
        rows.append(
            TruthRow(
                filename=name,
                individual=label,
                visit=0,
                frame=frame_rank[(when, frame)],
                time_s=when - first,
                cx=None if centre is None else centre[0],
                cy=None if centre is None else centre[1],
                jump=jump,
            )
        )
    derived = ["one visit per individual", "no blur or still periods known"]
    if centre_of is not None and any(r.cx is not None for r in rows):
        derived.append(f"jump = box centre moved > {jump_px:g} px since the previous detection")
    else:
        derived.append("no box centres, so no jumps known")
    return Truth(tuple(rows), tuple(derived))
