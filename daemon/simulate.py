"""A seeded camera-trap simulator: flat-bug-style crops with ground truth.

Arthropods arrive on a light screen (Poisson), stay a geometric number of frames and
leave. While present they drift, turn, change scale, blur now and then, and the light
changes over the session. Every detection is drawn with Pillow as an RGBA crop (the
animal with a halo of screen, opaque; the rest alpha 0), named and described exactly
as flat-bug names and describes its crops, so the daemon cannot tell the difference.
``labels.csv`` holds the individual behind every crop. The same seed and config give
byte-identical files.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

import numpy as np

from .simdraw import FloatArray, Individual, Light, draw_individual, noise_tile, render_crop
from .simspecies import make_species

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

Layout = Literal["per-frame", "flat"]

_IDENTIFIER_RE = re.compile(r"^[A-Za-z0-9-]+$")


# --- configuration and results ---------------------------------------------------------


@dataclass(frozen=True)
class SimConfig:
    """What to simulate; every field has a sensible default for a ~5k-crop demo night."""

    seed: int = 0
    frames: int = 300
    interval_s: float = 2.0
    start: datetime = field(default_factory=lambda: datetime(2024, 7, 1, 22, 0, 0))
    species: int = 8
    mean_present: float = 15.0
    mean_stay_frames: float = 60.0
    frame_width: int = 4000
    frame_height: int = 3000
    layout: Layout = "per-frame"
    identifier: str | None = "SIM"
    rate_fps: float | None = None
    crop_format: Literal["png"] = "png"
    atomic: bool = True
    miss_prob: float = 0.02

    def __post_init__(self) -> None:
        """Reject configs that would produce unreadable or colliding output."""
        problems: list[str] = []
        if self.frames < 1:
            problems.append(f"frames must be >= 1, got {self.frames}")
        if not self.interval_s >= 1.0:
            # Frame names have whole seconds: two frames within a second would collide.
            problems.append(
                f"interval_s must be >= 1 s (names have whole seconds), got {self.interval_s}"
            )
        if self.species < 1:
            problems.append(f"species must be >= 1, got {self.species}")
        if not self.mean_present > 0:
            problems.append(f"mean_present must be > 0, got {self.mean_present}")
        if not self.mean_stay_frames >= 1:
            problems.append(f"mean_stay_frames must be >= 1, got {self.mean_stay_frames}")
        if self.frame_width < 800 or self.frame_height < 800:
            problems.append(
                f"frame must be at least 800x800 px to hold the crops, got "
                f"{self.frame_width}x{self.frame_height}"
            )
        if self.layout not in ("per-frame", "flat"):
            problems.append(f"layout must be 'per-frame' or 'flat', got {self.layout!r}")
        if self.identifier is not None and not _IDENTIFIER_RE.match(self.identifier):
            problems.append(
                f"identifier must be letters, digits or '-' (it sits between '_' in "
                f"file names), got {self.identifier!r}"
            )
        if self.rate_fps is not None and not self.rate_fps > 0:
            problems.append(f"rate_fps must be > 0 when set, got {self.rate_fps}")
        if self.crop_format != "png":
            problems.append(f"crop_format must be 'png' (RGBA), got {self.crop_format!r}")
        if not 0.0 <= self.miss_prob < 1.0:
            problems.append(f"miss_prob must be in [0, 1), got {self.miss_prob}")
        if problems:
            raise ValueError("invalid simulation config: " + "; ".join(problems))


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


# --- the world -------------------------------------------------------------------------


class _World:
    """Arrivals, stays, movement and light; all randomness flows from the seed."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.rng = np.random.default_rng([config.seed, 0x7A1D])
        self.species = make_species(config.species, config.seed)
        # Some species are common, some rare; pairs are not all at the bottom.
        weights = 1.0 / (1.0 + self.rng.permutation(config.species)) ** 0.6
        self.weights = weights / weights.sum()
        self.present: list[Individual] = []
        self.next_id = 0
        self.arrival_rate = config.mean_present / config.mean_stay_frames
        self.leave_prob = 1.0 / config.mean_stay_frames
        self.margin = 260.0
        self.light_phase = self.rng.uniform(0.0, 2.0 * math.pi, size=3)
        self.light_walk = 0.0

    def _arrive(self) -> None:
        cfg = self.config
        sp = self.species[int(self.rng.choice(cfg.species, p=self.weights))]
        ident = self.next_id
        self.next_id += 1
        master = draw_individual(sp, np.random.default_rng([cfg.seed, ident, 0x10C]))
        home = float(self.rng.normal(1.0, 0.03))
        self.present.append(
            Individual(
                ident=ident,
                species=sp,
                master=master,
                cx=float(self.rng.uniform(self.margin, cfg.frame_width - self.margin)),
                cy=float(self.rng.uniform(self.margin, cfg.frame_height - self.margin)),
                angle=float(self.rng.uniform(0.0, 360.0)),
                scale=home,
                home_scale=home,
            )
        )

    def _move(self, ind: Individual) -> None:
        cfg, rng = self.config, self.rng
        ind.blur_next = False
        if rng.random() < 0.03:
            # A walk or short hop to another spot of the screen.
            dist = rng.uniform(80.0, 500.0)
            heading = rng.uniform(0.0, 2.0 * math.pi)
            ind.cx += dist * math.cos(heading)
            ind.cy += dist * math.sin(heading)
            ind.angle += rng.normal(0.0, 60.0)
            ind.blur_next = rng.random() < 0.5
        else:
            ind.cx += rng.normal(0.0, 2.5)
            ind.cy += rng.normal(0.0, 2.5)
            ind.angle += rng.normal(0.0, 4.0) if rng.random() < 0.9 else rng.normal(0.0, 35.0)
        ind.cx = float(np.clip(ind.cx, self.margin, cfg.frame_width - self.margin))
        ind.cy = float(np.clip(ind.cy, self.margin, cfg.frame_height - self.margin))
        ind.angle = float(ind.angle % 360.0)
        pull = 0.1 * (ind.home_scale - ind.scale)  # scale wanders but stays near home
        ind.scale = float(np.clip(ind.scale * rng.normal(1.0, 0.012) + pull, 0.8, 1.2))

    def step(self, index: int) -> Light:
        """Advance to frame ``index``: leave, arrive, move; return the frame's light."""
        cfg, rng = self.config, self.rng
        if index == 0:
            # Start in the steady state rather than with an empty screen.
            for _ in range(int(rng.poisson(cfg.mean_present))):
                self._arrive()
        else:
            stay = rng.random(len(self.present)) >= self.leave_prob
            self.present = [ind for ind, keep in zip(self.present, stay, strict=True) if keep]
            for ind in self.present:
                self._move(ind)
            for _ in range(int(rng.poisson(self.arrival_rate))):
                self._arrive()
        # The light cycle runs on frames, not on the run length, so a shorter run is a
        # prefix of a longer one with the same seed.
        t = index / 900.0
        self.light_walk = 0.97 * self.light_walk + rng.normal(0.0, 0.01)
        flicker = rng.normal(0.0, 0.03)
        level = 1.0 + 0.12 * math.sin(2 * math.pi * t + self.light_phase[0])
        level += self.light_walk + flicker
        warm = 0.06 * math.sin(2 * math.pi * 0.7 * t + self.light_phase[1])
        gains = (level * (1.0 + warm), level, level * (1.0 - warm))
        return Light(gains=(float(gains[0]), float(gains[1]), float(gains[2])))


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
    on_frame: Callable[[str], None] | None = None,
) -> SimSummary:
    """Simulate a night into ``out``; returns counts and the path of ``labels.csv``.

    ``out`` may exist but must be empty. With ``config.rate_fps`` frames are paced
    in real time: ``sleep`` is called between frames with what is left of 1/rate
    after drawing the frame. ``on_frame`` gets each frame's name once it is written.
    """
    out = Path(out)
    _prepare_out(config, out)
    world = _World(config)
    labels: list[tuple[str, str]] = []
    seen_species: set[int] = set()
    noise = noise_tile(config.seed)
    period = None if config.rate_fps is None else 1.0 / config.rate_fps

    for index in range(config.frames):
        began = time.monotonic()
        light = world.step(index)
        frame = frame_name(config.start + timedelta(seconds=index * config.interval_s))
        detections = _detect(config, world, index, light, noise)
        for name, det in _write_frame(config, out, frame, detections):
            labels.append((name, f"{det.individual.species.code}-ind{det.individual.ident:04d}"))
            seen_species.add(det.individual.species.index)
        if on_frame is not None:
            on_frame(frame)
        if period is not None and index + 1 < config.frames:
            sleep(max(0.0, period - (time.monotonic() - began)))

    labels_path = _write_labels(out, labels)
    summary = SimSummary(
        frames=config.frames,
        crops=len(labels),
        individuals=world.next_id,
        species=len(seen_species),
        labels_path=labels_path,
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


def _detect(
    config: SimConfig, world: _World, index: int, light: Light, noise: FloatArray
) -> list[_Detection]:
    """Render the crops of frame ``index``: who is seen, in flat-bug's arbitrary order."""
    frame_size = (config.frame_width, config.frame_height)
    visible = [ind for ind in world.present if world.rng.random() >= config.miss_prob]
    order = world.rng.permutation(len(visible))  # flat-bug's order says nothing of who
    detections: list[_Detection] = []
    for pos in order:
        ind = visible[int(pos)]
        rng = np.random.default_rng([config.seed, index, ind.ident, 0xC20B])
        crop, area = render_crop(ind, light, frame_size, noise, rng)
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


def _write_labels(out: Path, labels: Sequence[tuple[str, str]]) -> Path:
    """Write ``labels.csv`` (``filename,label``) atomically; returns its path."""
    buf_csv = io.StringIO()
    writer = csv.writer(buf_csv, lineterminator="\n")
    writer.writerow(["filename", "label"])
    writer.writerows(labels)
    labels_path = out / "labels.csv"
    _write(labels_path, buf_csv.getvalue().encode(), atomic=True)
    return labels_path


def _write_report(config: SimConfig, out: Path, summary: SimSummary, world: _World) -> None:
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
        "--species",
        type=int,
        default=d.species,
        help="number of species, with look-alike pairs (default %(default)s)",
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
        default=d.mean_stay_frames,
        help="mean frames an individual stays (default %(default)s)",
    )
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
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: simulate, print a one-line summary; 2 on bad input."""
    parser = argparse.ArgumentParser(
        prog="simulate_trap",
        description="Write a seeded synthetic camera-trap night in flat-bug's format, "
        "with ground-truth labels.csv.",
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
