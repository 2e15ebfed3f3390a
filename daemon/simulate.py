"""A seeded camera-trap simulator: flat-bug-style crops with ground truth.

Arthropods come to a light screen and leave, and the light changes over the session;
how they behave is :mod:`crop_clusterd.simbehave` (``SimConfig.behaviour``: ``trap``,
the default, with returning visits, still periods, walks, blur when moving and runs
of missed detections; or ``classic``, the first model, byte for byte). Every
detection is drawn with Pillow as an RGBA crop (the animal with a halo of screen,
opaque; the rest alpha 0), named and described exactly as flat-bug names and
describes its crops, so the daemon cannot tell the difference. The same seed and
config give byte-identical files.

Ground truth, one row per crop in the order crops were written:

- ``labels.csv``: ``filename,label``; label = the individual, e.g. ``sp03-ind0012``.
- ``truth.csv``: ``filename,individual,visit,frame,time_s,cx,cy,jump,blur,still``.
  ``individual`` is the label of ``labels.csv``; ``visit`` counts its visits from 0
  (always 0 in ``classic``; a visit the detector missed entirely leaves its number
  unused); ``frame`` is the frame index from 0 and ``time_s`` seconds since the first
  frame; ``cx, cy`` the box centre in px (a half where the box is odd); ``jump`` is 1
  when the individual moved more than a drift (a hop or a walk; classic: a jump)
  since its previous detection in the same visit, so a visit's first crop has 0;
  ``blur`` is 1 when the crop is motion-blurred (classic's focus blur is not motion
  and counts 0); ``still`` is 1 while it sits in a still period and did not move in
  this frame (always 0 in ``classic``, whose animals drift every frame).
- ``simulation.json``: the config, counts and every species.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from .simbehave import World, make_world
from .simconfig import SimConfig
from .simdraw import FloatArray, Individual, Light, noise_tile, render_crop

__all__ = [
    "FRAME_SUFFIX",
    "TIME_FORMAT",
    "SimConfig",
    "SimSummary",
    "add_simulate_arguments",
    "config_from_args",
    "frame_name",
    "main",
    "simulate",
]

TIME_FORMAT = "%Y%m%d%H%M%S"
"""How the capture time is written at the start of a frame name (for readers)."""
FRAME_SUFFIX = "-00-06"
"""What follows the time in a frame name, as on the real trap."""

# --- results ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SimSummary:
    """What a run wrote: counts and where the ground truth is.

    ``species`` counts the species that actually showed up.
    """

    frames: int
    crops: int
    individuals: int
    species: int
    labels_path: Path
    truth_path: Path


def frame_name(when: datetime) -> str:
    """flat-bug frame name for a capture time, e.g. ``20240701220000-00-06``."""
    return when.strftime(TIME_FORMAT) + FRAME_SUFFIX


@dataclass(frozen=True)
class _Detection:
    """One rendered crop and what goes into the frame's metadata for it."""

    individual: Individual
    png: bytes
    box: tuple[int, int, int, int]
    area: int
    conf: float
    blur: bool  # motion-blurred
    visit: int
    still: bool


TRUTH_COLUMNS = ("filename", "individual", "visit", "frame", "time_s", "cx", "cy", "jump",
                 "blur", "still")  # fmt: skip
"""The columns of ``truth.csv``, one row per crop (see the module docstring)."""


# --- writing ---------------------------------------------------------------------------


def _write(path: Path, data: bytes, atomic: bool) -> None:
    """Write a file; atomically (hidden temp name, then rename) unless told not to."""
    if not atomic:
        path.write_bytes(data)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _crop_name(frame: str, index: int, identifier: str | None) -> str:
    if identifier is None:
        return f"crop_{frame}_CROPNUMBER_{index}_.png"
    return f"crop_{frame}_CROPNUMBER_{index}_UUID_{identifier}.png"


def _metadata(config: SimConfig, frame: str, detections: Sequence[_Detection]) -> dict[str, object]:
    boxes = [list(d.box) for d in detections]
    return {
        "boxes": boxes,
        "contours": [[[x1, x2, x2, x1], [y1, y1, y2, y2]] for x1, y1, x2, y2 in boxes],
        "confs": [d.conf for d in detections],
        "classes": [0 for _ in detections],
        "scales": [1.0 if max(b[2] - b[0], b[3] - b[1]) < 200 else 0.5 for b in boxes],
        "areas": [d.area for d in detections],
        "image_path": f"{frame}.jpg",
        "image_width": config.frame_width,
        "image_height": config.frame_height,
        "mask_width": config.frame_width,
        "mask_height": config.frame_height,
        "identifier": config.identifier,
    }


def _config_json(config: SimConfig) -> dict[str, object]:
    data = asdict(config)
    data["start"] = config.start.isoformat()
    return data


def simulate(
    config: SimConfig,
    out: Path,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    on_frame: Callable[[str], None] | None = None,
) -> SimSummary:
    """Simulate a night into ``out``; returns counts and the path of ``labels.csv``.

    ``out`` may exist but must be empty. With ``config.rate_fps`` frames are paced
    in real time: ``sleep`` is called between frames with what is left of 1/rate
    after drawing the frame, as ``clock`` (seconds) measured it. ``on_frame`` gets
    each frame's name once it is written.
    """
    out = Path(out)
    _prepare_out(config, out)
    world = make_world(config)
    labels: list[tuple[str, str]] = []
    truth: list[tuple[object, ...]] = []
    last_visit: dict[int, int] = {}  # individual -> visit of its last detection
    seen_species: set[int] = set()
    noise = noise_tile(config.seed)
    period = None if config.rate_fps is None else 1.0 / config.rate_fps

    for index in range(config.frames):
        began = clock()
        light = world.step(index)
        frame = frame_name(config.start + timedelta(seconds=index * config.interval_s))
        detections = _detect(config, world, index, light, noise)
        for name, det in _write_frame(config, out, frame, detections):
            ind = det.individual
            label = f"{ind.species.code}-ind{ind.ident:04d}"
            labels.append((name, label))
            truth.append(_truth_row(config, name, label, index, det, last_visit))
            seen_species.add(ind.species.index)
        if on_frame is not None:
            on_frame(frame)
        if period is not None and index + 1 < config.frames:
            sleep(max(0.0, period - (clock() - began)))

    labels_path = _write_csv(out / "labels.csv", ("filename", "label"), labels)
    truth_path = _write_csv(out / "truth.csv", TRUTH_COLUMNS, truth)
    summary = SimSummary(
        frames=config.frames,
        crops=len(labels),
        individuals=world.next_id,
        species=len(seen_species),
        labels_path=labels_path,
        truth_path=truth_path,
    )
    _write_report(config, out, summary, world)
    return summary


def _prepare_out(config: SimConfig, out: Path) -> None:
    """Create ``out`` (and the flat layout's folders); ``FileExistsError`` unless new or empty."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"simulation output {out} must be a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    if config.layout == "flat":
        (out / "crops").mkdir()
        (out / "metadata").mkdir()


def _truth_row(
    config: SimConfig,
    name: str,
    label: str,
    index: int,
    det: _Detection,
    last_visit: dict[int, int],
) -> tuple[object, ...]:
    """The ``truth.csv`` row of one written crop; clears its individual's move flag."""
    ind = det.individual
    # A jump needs a detection before it in the same visit to jump from.
    jump = ind.moved and last_visit.get(ind.ident) == det.visit
    ind.moved = False
    last_visit[ind.ident] = det.visit
    x1, y1, x2, y2 = det.box
    time_s = index * config.interval_s
    return (name, label, det.visit, index, f"{time_s:g}", f"{(x1 + x2) / 2:g}",
            f"{(y1 + y2) / 2:g}", int(jump), int(det.blur), int(det.still))  # fmt: skip


def _detect(
    config: SimConfig, world: World, index: int, light: Light, noise: FloatArray
) -> list[_Detection]:
    """Render the crops of frame ``index``: who is seen, in flat-bug's arbitrary order."""
    frame_size = (config.frame_width, config.frame_height)
    visible = world.visible()
    classic = config.behaviour == "classic"
    order = world.rng.permutation(len(visible))  # flat-bug's order says nothing of who
    detections: list[_Detection] = []
    for pos in order:
        ind = visible[int(pos)]
        rng = np.random.default_rng([config.seed, index, ind.ident, 0xC20B])
        crop, area, blur = render_crop(ind, light, frame_size, noise, rng, classic_blur=classic)
        x1 = int(np.clip(round(ind.cx - crop.width / 2), 0, config.frame_width - crop.width))
        y1 = int(np.clip(round(ind.cy - crop.height / 2), 0, config.frame_height - crop.height))
        buf = io.BytesIO()
        crop.save(buf, "PNG", compress_level=1)
        detections.append(
            _Detection(
                individual=ind,
                png=buf.getvalue(),
                box=(x1, y1, x1 + crop.width, y1 + crop.height),
                area=area,
                conf=round(float(rng.uniform(0.35, 0.99)), 4),
                blur=blur,
                visit=ind.visit,
                still=ind.still and not ind.stepped,
            )
        )
    return detections


def _write_frame(
    config: SimConfig, out: Path, frame: str, detections: Sequence[_Detection]
) -> list[tuple[str, _Detection]]:
    """Write one frame's crops, then its metadata; returns each crop's file name."""
    if config.layout == "per-frame":
        crop_dir = out / frame / "crops"
        crop_dir.mkdir(parents=True)
        meta_dir = out / frame
    else:
        crop_dir, meta_dir = out / "crops", out / "metadata"
    written: list[tuple[str, _Detection]] = []
    for i, det in enumerate(detections):
        name = _crop_name(frame, i, config.identifier)
        _write(crop_dir / name, det.png, config.atomic)
        written.append((name, det))
    meta = json.dumps(_metadata(config, frame, detections), indent=1).encode()
    _write(meta_dir / f"metadata_{frame}_UUID_{config.identifier}.json", meta, config.atomic)
    return written


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    """Write a CSV file with ``header`` atomically; returns its path."""
    buf_csv = io.StringIO()
    writer = csv.writer(buf_csv, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    _write(path, buf_csv.getvalue().encode(), atomic=True)
    return path


def _write_report(config: SimConfig, out: Path, summary: SimSummary, world: World) -> None:
    """Write ``simulation.json``: the config, the summary and every species."""
    report = {
        "config": _config_json(config),
        "summary": {
            "frames": summary.frames,
            "crops": summary.crops,
            "individuals": summary.individuals,
            "species": summary.species,
            "labels": summary.labels_path.name,
        },
        "species": [{**asdict(sp), "code": sp.code} for sp in world.species],
        "time_format": TIME_FORMAT,
    }
    _write(out / "simulation.json", json.dumps(report, indent=1).encode(), atomic=True)


# --- command line ----------------------------------------------------------------------


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's flags (shared by ``crop-clusterd simulate`` and the script)."""
    d = SimConfig()
    parser.add_argument(
        "-o", "--out", required=True, type=Path, help="output folder (new or empty)"
    )
    parser.add_argument(
        "--seed", type=int, default=d.seed, help="random seed (default %(default)s)"
    )
    parser.add_argument(
        "--frames", type=int, default=d.frames, help="number of frames (default %(default)s)"
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=d.interval_s,
        help="seconds between frames, >= 1 (default %(default)s)",
    )
    parser.add_argument(
        "--start",
        type=datetime.fromisoformat,
        default=d.start,
        help="capture time of the first frame, ISO format (default %(default)s)",
    )
    parser.add_argument(
        "--behaviour",
        choices=("trap", "classic"),
        default=d.behaviour,
        help="trap: visits with returns, still periods and walks, blur when moving, runs "
        "of missed detections; classic: the first simulator's model, byte for byte "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--species",
        type=int,
        default=None,
        help="number of species, with look-alike pairs (default 20 for trap, 8 for classic)",
    )
    parser.add_argument(
        "--present",
        type=float,
        default=d.mean_present,
        help="mean number of individuals on the screen (default %(default)s)",
    )
    parser.add_argument(
        "--stay",
        type=float,
        default=None,
        help="mean frames an individual stays (trap: per visit; default 150 for trap, "
        "60 for classic)",
    )
    parser.add_argument(
        "--miss",
        type=float,
        default=d.miss_prob,
        help="chance a detection is missed (trap: after a detection; default %(default)s)",
    )
    _add_trap_arguments(parser, d)
    parser.add_argument(
        "--layout",
        choices=("per-frame", "flat"),
        default=d.layout,
        help="per-frame: <out>/<frame>/crops/ as flat-bug does; "
        "flat: <out>/crops/ and <out>/metadata/ (default %(default)s)",
    )
    parser.add_argument(
        "--rate", type=float, default=None, help="write frames live at this many frames per second"
    )
    parser.add_argument(
        "--no-identifier",
        action="store_true",
        help="name files as flat-bug does without an identifier",
    )
    parser.add_argument(
        "--non-atomic",
        action="store_true",
        help="write files straight to their final names, as flat-bug does",
    )


def _add_trap_arguments(parser: argparse.ArgumentParser, d: SimConfig) -> None:
    """The flags of the trap behaviour (ignored by classic)."""
    group = parser.add_argument_group("trap behaviour (ignored with --behaviour classic)")
    group.add_argument(
        "--return-prob",
        type=float,
        default=d.return_prob,
        help="share of visits after which the individual comes back (default %(default)s)",
    )
    group.add_argument(
        "--return-after",
        type=float,
        default=d.return_after_s,
        help="mean seconds away before it comes back (default %(default)s)",
    )
    group.add_argument(
        "--still",
        type=float,
        default=d.still_s,
        help="mean seconds of a still period (default %(default)s)",
    )
    group.add_argument(
        "--walk",
        type=float,
        default=d.walk_s,
        help="mean seconds of a walk between still periods (default %(default)s)",
    )
    group.add_argument(
        "--hop-every",
        type=float,
        default=d.hop_every_s,
        help="mean seconds between short flights of 80-500 px (default %(default)s)",
    )
    group.add_argument(
        "--miss-run",
        type=float,
        default=d.miss_after_miss,
        help="chance of another miss after a miss (default %(default)s)",
    )


def config_from_args(ns: argparse.Namespace) -> SimConfig:
    """Build a ``SimConfig`` from arguments parsed with ``add_simulate_arguments``."""
    return SimConfig(
        seed=ns.seed,
        frames=ns.frames,
        interval_s=ns.interval,
        start=ns.start,
        species=ns.species,
        mean_present=ns.present,
        mean_stay_frames=ns.stay,
        layout=ns.layout,
        identifier=None if ns.no_identifier else SimConfig().identifier,
        rate_fps=ns.rate,
        atomic=not ns.non_atomic,
        miss_prob=ns.miss,
        behaviour=ns.behaviour,
        return_prob=ns.return_prob,
        return_after_s=ns.return_after,
        still_s=ns.still,
        walk_s=ns.walk,
        hop_every_s=ns.hop_every,
        miss_after_miss=ns.miss_run,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: simulate, print a one-line summary; 2 on bad input."""
    parser = argparse.ArgumentParser(
        prog="simulate_trap",
        description="Write a seeded synthetic camera-trap night in flat-bug's format, "
        "with ground-truth labels.csv and truth.csv.",
    )
    add_simulate_arguments(parser)
    ns = parser.parse_args(argv)
    try:
        config = config_from_args(ns)
        began = time.monotonic()
        summary = simulate(config, ns.out)
    except (ValueError, FileExistsError) as exc:
        print(f"simulate: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"simulated {summary.frames} frames, {summary.crops} crops of "
        f"{summary.individuals} individuals ({summary.species} species) in "
        f"{time.monotonic() - began:.1f} s -> {ns.out} (labels: {summary.labels_path})"
    )
    return 0
