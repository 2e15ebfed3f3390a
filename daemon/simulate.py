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
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "FRAME_SUFFIX",
    "PLANS",
    "TIME_FORMAT",
    "SimConfig",
    "SimSummary",
    "Species",
    "add_simulate_arguments",
    "config_from_args",
    "frame_name",
    "main",
    "make_species",
    "simulate",
]

TIME_FORMAT = "%Y%m%d%H%M%S"
"""How the capture time is written at the start of a frame name (for readers)."""
FRAME_SUFFIX = "-00-06"
"""What follows the time in a frame name, as on the real trap."""

PLANS: tuple[str, ...] = ("moth", "beetle", "fly", "slender", "wasp", "shieldbug")
"""Body plans; two species of one look-alike pair always share their plan."""

Layout = Literal["per-frame", "flat"]
FloatArray = npt.NDArray[np.float32]

_IDENTIFIER_RE = re.compile(r"^[A-Za-z0-9-]+$")
_SS = 2  # supersampling of the master drawing, for smooth edges
_SCREEN = np.array([226.0, 224.0, 230.0], dtype=np.float32)  # the white screen fabric

# Well-separated body colours; a look-alike sibling moves only a little away from one.
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (125, 82, 45),  # brown
    (38, 34, 36),  # black
    (205, 165, 40),  # yellow
    (72, 122, 52),  # green
    (170, 45, 32),  # red
    (128, 124, 118),  # grey
    (205, 115, 45),  # orange
    (175, 150, 110),  # tan
    (45, 58, 105),  # steel blue
)
_LENGTHS: dict[str, tuple[float, float]] = {
    "moth": (90.0, 170.0),
    "beetle": (55.0, 110.0),
    "fly": (55.0, 85.0),
    "slender": (55.0, 90.0),
    "wasp": (60.0, 100.0),
    "shieldbug": (55.0, 95.0),
}
_MARKINGS: dict[str, tuple[str, ...]] = {
    "moth": ("band", "spots", "stripes"),
    "beetle": ("spots", "stripes", "band"),
    "fly": ("stripes", "spots"),
    "slender": ("stripes", "spots"),
    "wasp": ("stripes", "spots"),
    "shieldbug": ("spots", "band", "stripes"),
}


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


@dataclass(frozen=True)
class Species:
    """How one species looks; ``look_alike_of`` names its near-twin, if any."""

    index: int
    plan: str
    length: float  # body length in output pixels
    width: float  # body width relative to the plan's default
    body: tuple[int, int, int]
    accent: tuple[int, int, int]
    wing: tuple[int, int, int, int]
    marking: str
    marks: int
    mark_size: float  # relative to body length
    leg_length: float
    antenna_length: float
    look_alike_of: int | None

    @property
    def code(self) -> str:
        """Short name used in labels, e.g. ``sp03``."""
        return f"sp{self.index:02d}"


def frame_name(when: datetime) -> str:
    """flat-bug frame name for a capture time, e.g. ``20240701220000-00-06``."""
    return when.strftime(TIME_FORMAT) + FRAME_SUFFIX


# --- species ---------------------------------------------------------------------------


def _look_alike_pairs(count: int) -> int:
    """How many look-alike pairs a set of ``count`` species gets (3 of 8)."""
    if count < 2:
        return 0
    return min(count // 2, max(1, count * 3 // 8))


def _clip_rgb(values: npt.ArrayLike) -> tuple[int, int, int]:
    arr = np.clip(np.rint(np.asarray(values, dtype=np.float64)), 0, 255).astype(int)
    return (int(arr[0]), int(arr[1]), int(arr[2]))


def _accent_for(body: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    """A marking colour that stands out from the body: much darker or much lighter."""
    lum = 0.3 * body[0] + 0.59 * body[1] + 0.11 * body[2]
    if lum > 110:
        return _clip_rgb(np.array(body) * rng.uniform(0.15, 0.35))
    options = ((235, 225, 200), (230, 200, 60), (220, 120, 50), (240, 240, 240))
    return options[int(rng.integers(len(options)))]


def _base_species(
    index: int, plan: str, body: tuple[int, int, int], rng: np.random.Generator
) -> Species:
    low, high = _LENGTHS[plan]
    wing_alpha = 245 if plan == "moth" else int(rng.integers(70, 120))
    wing_rgb = body if plan == "moth" else _clip_rgb(rng.uniform(170, 215, size=3))
    markings = _MARKINGS[plan]
    return Species(
        index=index,
        plan=plan,
        length=float(rng.uniform(low, high)),
        width=float(rng.uniform(0.85, 1.15)),
        body=body,
        accent=_accent_for(body, rng),
        wing=(*wing_rgb, wing_alpha),
        marking=markings[int(rng.integers(len(markings)))],
        marks=int(rng.integers(2, 6)),
        mark_size=float(rng.uniform(0.045, 0.075)),
        leg_length=float(rng.uniform(0.8, 1.2)),
        antenna_length=float(rng.uniform(0.7, 1.3)),
        look_alike_of=None,
    )


def _sibling(base: Species, index: int, rng: np.random.Generator) -> Species:
    """A near-twin: same plan and pattern, colour a few RGB steps off, small tweaks."""
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction) + 1e-9
    body = _clip_rgb(np.array(base.body) + direction * rng.uniform(14.0, 22.0))
    accent = _clip_rgb(np.array(base.accent) + rng.normal(0.0, 8.0, size=3))
    if base.plan == "moth":
        wing: tuple[int, int, int, int] = (*body, base.wing[3])
    else:
        wing = base.wing
    # One subtle pattern difference: a mark more or less, or bigger marks.
    marks, mark_size = base.marks, base.mark_size
    if rng.random() < 0.5:
        marks = base.marks + (1 if base.marks <= 3 else -1)
    else:
        mark_size = base.mark_size * 1.2
    return Species(
        index=index,
        plan=base.plan,
        length=base.length * float(rng.uniform(0.9, 1.1)),
        width=base.width * float(rng.uniform(0.95, 1.05)),
        body=body,
        accent=accent,
        wing=wing,
        marking=base.marking,
        marks=marks,
        mark_size=mark_size,
        leg_length=base.leg_length,
        antenna_length=base.antenna_length,
        look_alike_of=base.index,
    )


def make_species(count: int, seed: int) -> tuple[Species, ...]:
    """The species of a run: look-alike pairs first (2k, 2k+1), then unrelated ones.

    Unrelated species get different body plans and well-separated palette colours
    (as long as there are enough of them); a look-alike pair shares its plan and
    pattern and differs only a little in colour, size and markings.
    """
    if count < 1:
        raise ValueError(f"need at least one species, got {count}")
    rng = np.random.default_rng([seed, 0x5BEC1E5])
    plans = [PLANS[int(i)] for i in rng.permutation(len(PLANS))]
    colours = [_PALETTE[int(i)] for i in rng.permutation(len(_PALETTE))]
    pairs = _look_alike_pairs(count)
    out: list[Species] = []
    group = 0
    while len(out) < count:
        base = _base_species(
            len(out), plans[group % len(plans)], colours[group % len(colours)], rng
        )
        out.append(base)
        if group < pairs and len(out) < count:
            out.append(_sibling(base, len(out), rng))
        group += 1
    return tuple(out)


# --- drawing ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Look:
    """One individual's own version of its species (drawn once, then transformed)."""

    species: Species
    length: float
    body: tuple[int, int, int]
    accent: tuple[int, int, int]
    jitter: tuple[float, ...]  # marking placement and leg angles, in [-1, 1]


def _individual_look(species: Species, rng: np.random.Generator) -> _Look:
    return _Look(
        species=species,
        length=species.length * float(rng.normal(1.0, 0.04)),
        body=_clip_rgb(np.array(species.body) + rng.normal(0.0, 4.0, size=3)),
        accent=_clip_rgb(np.array(species.accent) + rng.normal(0.0, 4.0, size=3)),
        jitter=tuple(float(v) for v in rng.uniform(-1.0, 1.0, size=32)),
    )


def _shade(colour: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return _clip_rgb(np.array(colour) * factor)


def _ellipse_poly(
    cx: float, cy: float, rx: float, ry: float, angle_deg: float, n: int = 28
) -> list[tuple[float, float]]:
    """Polygon of an ellipse rotated by ``angle_deg`` (ImageDraw ellipses cannot rotate)."""
    a = math.radians(angle_deg)
    ca, sa = math.cos(a), math.sin(a)
    pts = []
    for k in range(n):
        t = 2.0 * math.pi * k / n
        x, y = rx * math.cos(t), ry * math.sin(t)
        pts.append((cx + x * ca - y * sa, cy + x * sa + y * ca))
    return pts


class _Painter:
    """Draws one individual pointing up, head at the top, on a supersampled canvas."""

    def __init__(self, look: _Look) -> None:
        self.look = look
        self.sp = look.species
        self.u = look.length * _SS
        self.size = math.ceil(self.u * 2.7) | 1
        self.cx = self.size / 2.0
        self.cy = self.size / 2.0
        self.base = Image.new("RGBA", (self.size, self.size), (0, 0, 0, 0))
        self.draw = ImageDraw.Draw(self.base)
        self.wings = Image.new("RGBA", (self.size, self.size), (0, 0, 0, 0))
        self.wdraw = ImageDraw.Draw(self.wings)
        self.dark = _shade(look.body, 0.55)
        self.line = max(1, round(self.u * 0.022))
        self._j = 0

    def j(self) -> float:
        """Next jitter value of this individual, in [-1, 1]."""
        value = self.look.jitter[self._j % len(self.look.jitter)]
        self._j += 1
        return value

    def ell(
        self, x: float, y: float, rx: float, ry: float, fill: tuple[int, ...], wing: bool = False
    ) -> None:
        """Upright ellipse in body units, on the body or the wing layer."""
        target = self.wdraw if wing else self.draw
        target.ellipse(
            [
                self.cx + x * self.u - rx * self.u,
                self.cy + y * self.u - ry * self.u,
                self.cx + x * self.u + rx * self.u,
                self.cy + y * self.u + ry * self.u,
            ],
            fill=fill,
        )

    def poly(
        self, pts: Sequence[tuple[float, float]], fill: tuple[int, ...], wing: bool = False
    ) -> None:
        """Filled polygon in body units."""
        target = self.wdraw if wing else self.draw
        target.polygon([(self.cx + x * self.u, self.cy + y * self.u) for x, y in pts], fill=fill)

    def seg(
        self,
        pts: Sequence[tuple[float, float]],
        fill: tuple[int, ...],
        width: int,
        wing: bool = False,
    ) -> None:
        """Polyline (legs, antennae, stripes) in body units."""
        target = self.wdraw if wing else self.draw
        target.line(
            [(self.cx + x * self.u, self.cy + y * self.u) for x, y in pts],
            fill=fill,
            width=width,
            joint="curve",
        )

    def legs(self, y0: float, y1: float, reach: float, thin: float = 1.0) -> None:
        """Three pairs of two-segment legs attached between y0 and y1."""
        width = max(1, round(self.line * thin))
        for k in range(3):
            ya = y0 + (y1 - y0) * k / 2.0
            forward = (1 - k) * 0.9  # front legs point forward, hind legs back
            for side in (-1.0, 1.0):
                ang = math.radians(90 - 40 * forward + 8 * self.j())
                kx, ky = math.sin(ang) * reach * 0.45, -math.cos(ang) * reach * 0.45
                fx = kx + reach * 0.5 * 0.35
                fy = ky - forward * reach * 0.5 * 0.9 + (0.25 if k == 2 else 0.05) * reach * 0.5
                self.seg(
                    [(0.0, ya), (side * kx, ya + ky), (side * fx, ya + fy)],
                    (*self.dark, 255),
                    width,
                )

    def antennae(self, y: float, length: float, spread: float = 30.0) -> None:
        for side in (-1.0, 1.0):
            ang = math.radians(spread + 6 * self.j())
            mid = (side * math.sin(ang) * length * 0.5, y - math.cos(ang) * length * 0.5)
            end = (side * math.sin(ang * 1.4) * length, y - math.cos(ang * 1.4) * length)
            self.seg([(0.0, y), mid, end], (*self.dark, 255), max(1, self.line // 2 + 1))

    def bands(
        self,
        x: float,
        y: float,
        rx: float,
        ry: float,
        count: int,
        size: float,
        colour: tuple[int, int, int],
    ) -> None:
        """Transverse stripes across an upright ellipse, kept inside it."""
        for k in range(count):
            t = (k + 1) / (count + 1) * 1.6 - 0.8 + 0.04 * self.j()
            yy = y + t * ry
            half = rx * math.sqrt(max(0.0, 1.0 - t * t)) * 0.95
            self.poly(
                [
                    (x - half, yy - size / 2),
                    (x + half, yy - size / 2),
                    (x + half, yy + size / 2),
                    (x - half, yy + size / 2),
                ],
                (*colour, 255),
            )

    def spots(
        self,
        x: float,
        y: float,
        rx: float,
        ry: float,
        count: int,
        size: float,
        colour: tuple[int, int, int],
        paired: bool = True,
    ) -> None:
        """Spots scattered inside an upright ellipse (in mirrored pairs if ``paired``)."""
        for k in range(count):
            t = (k + 0.5) / count * 1.4 - 0.7 + 0.06 * self.j()
            off = (0.45 + 0.1 * self.j()) * rx * math.sqrt(max(0.0, 1 - t * t))
            for side in (-1.0, 1.0) if paired else (0.0,):
                self.ell(x + side * off, y + t * ry, size * 0.8, size * 0.8, (*colour, 255))

    def render(self) -> Image.Image:
        """Draw the plan; returns the animal on a transparent canvas, cropped tight."""
        getattr(self, "_" + self.sp.plan)()
        self.base.alpha_composite(self.wings)
        size = max(1, round(self.size / _SS))
        out = self.base.resize((size, size), Image.Resampling.LANCZOS)
        box = out.getbbox()
        return out.crop(box) if box else out

    # One method per plan. Units: body length = 1, head at y = -0.5, tail at +0.5.

    def _moth(self) -> None:
        sp, w, b = self.sp, self.sp.width, self.look.body
        self.legs(-0.3, -0.18, 0.35 * sp.leg_length)
        self.antennae(-0.42, 0.35 * sp.antenna_length, 25)
        self.ell(0.0, 0.05, 0.07 * w, 0.3, (*self.dark, 255))
        span = 0.62 * w
        for side in (-1.0, 1.0):
            wing = [
                (0.0, -0.34),
                (side * span, 0.18 + 0.02 * self.j()),
                (side * span * 0.7, 0.45),
                (0.0, 0.38),
            ]
            self.poly(wing, (*b, 255), wing=True)
            lighter = _shade(b, 1.15)
            self.poly(
                [(0.0, -0.3), (side * span * 0.85, 0.2), (side * span * 0.4, 0.25)],
                (*lighter, 255),
                wing=True,
            )
            for k in range(sp.marks if sp.marking == "stripes" else 1):
                f = 0.35 + 0.5 * (k + 1) / (sp.marks + 1) + 0.02 * self.j()
                a = (side * span * f * 0.2, -0.34 + 0.72 * f)  # along the inner edge
                c = (side * span * f, -0.34 + 0.52 * f)  # along the leading edge
                if sp.marking == "spots":
                    for s in range(sp.marks):
                        g = 0.3 + 0.5 * s / max(1, sp.marks - 1)
                        px, py = a[0] + (c[0] - a[0]) * g, a[1] + (c[1] - a[1]) * g
                        self.ell(
                            px,
                            py,
                            sp.mark_size * 0.7,
                            sp.mark_size * 0.7,
                            (*self.look.accent, 255),
                            wing=True,
                        )
                else:
                    width = max(1, round(self.u * sp.mark_size * 0.45))
                    self.seg([a, c], (*self.look.accent, 255), width, wing=True)
        self.ell(0.0, -0.24, 0.09 * w, 0.12, (*_shade(b, 0.9), 255), wing=True)
        self.ell(0.0, -0.4, 0.06 * w, 0.06, (*self.dark, 255), wing=True)

    def _beetle(self) -> None:
        sp, w, b = self.sp, self.sp.width, self.look.body
        self.legs(-0.2, 0.1, 0.6 * sp.leg_length)
        self.antennae(-0.42, 0.28 * sp.antenna_length, 35)
        self.ell(0.0, -0.42, 0.1 * w, 0.08, (*self.dark, 255))
        self.ell(0.0, -0.28, 0.2 * w, 0.1, (*_shade(b, 0.8), 255))
        ex, ey, rx, ry = 0.0, 0.14, 0.3 * w, 0.34
        self.ell(ex, ey, rx, ry, (*b, 255))
        ms = sp.mark_size
        if sp.marking == "spots":
            self.spots(ex, ey, rx, ry, sp.marks, ms, self.look.accent)
        elif sp.marking == "stripes":
            for k in range(sp.marks):
                off = (k + 1) / (sp.marks + 1) * rx * 0.9 + 0.01 * self.j()
                for side in (-1.0, 1.0):
                    self.seg(
                        [(side * off, ey - ry * 0.7), (side * off, ey + ry * 0.7)],
                        (*self.look.accent, 255),
                        max(1, round(self.u * ms * 0.4)),
                    )
        else:
            self.bands(ex, ey, rx, ry, 1 + sp.marks // 3, ms * 1.6, self.look.accent)
        self.seg([(0.0, ey - ry), (0.0, ey + ry)], (*self.dark, 255), self.line)

    def _fly(self) -> None:
        sp, w, b = self.sp, self.sp.width, self.look.body
        self.legs(-0.22, -0.02, 0.55 * sp.leg_length)
        for side in (-1.0, 1.0):
            ang = side * (28 + 5 * self.j())
            self.poly(_ellipse_poly(side * 0.2 * w, 0.12, 0.11, 0.32, -ang), sp.wing, wing=True)
        self.ell(0.0, 0.18, 0.17 * w, 0.27, (*b, 255))
        if sp.marking == "stripes":
            self.bands(0.0, 0.18, 0.17 * w, 0.27, sp.marks, sp.mark_size, self.look.accent)
        else:
            self.spots(0.0, 0.18, 0.17 * w, 0.27, sp.marks, sp.mark_size * 0.8, self.look.accent)
        self.ell(0.0, -0.14, 0.15 * w, 0.15, (*_shade(b, 0.85), 255))
        for side in (-1.0, 1.0):
            self.seg(
                [(side * 0.05 * w, -0.24), (side * 0.05 * w, -0.04)],
                (*self.look.accent, 255),
                max(1, round(self.u * 0.02)),
            )
        self.ell(0.0, -0.36, 0.13 * w, 0.09, (*self.dark, 255))
        eye = (150, 40, 30) if sum(b) > 200 else (120, 30, 25)
        for side in (-1.0, 1.0):
            self.ell(side * 0.08 * w, -0.37, 0.065, 0.075, (*eye, 255))

    def _slender(self) -> None:
        sp, w, b = self.sp, self.sp.width, self.look.body
        self.legs(-0.26, -0.14, 0.95 * sp.leg_length, thin=0.6)
        self.antennae(-0.42, 0.3 * sp.antenna_length, 20)
        for side in (-1.0, 1.0):
            ang = side * (22 + 5 * self.j())
            self.poly(_ellipse_poly(side * 0.14, 0.02, 0.06, 0.3, -ang), sp.wing, wing=True)
            if sp.marking == "spots":
                self.ell(
                    side * 0.2,
                    0.0 + 0.02 * self.j(),
                    sp.mark_size * 0.6,
                    sp.mark_size * 0.6,
                    (*self.look.accent, 200),
                    wing=True,
                )
        self.ell(0.0, 0.18, 0.055 * w, 0.32, (*b, 255))
        if sp.marking == "stripes":
            self.bands(0.0, 0.18, 0.055 * w, 0.32, sp.marks, sp.mark_size * 0.7, self.look.accent)
        self.ell(0.0, -0.2, 0.09 * w, 0.1, (*_shade(b, 0.85), 255))
        self.ell(0.0, -0.36, 0.055 * w, 0.05, (*self.dark, 255))

    def _wasp(self) -> None:
        sp, w, b = self.sp, self.sp.width, self.look.body
        self.legs(-0.25, -0.08, 0.6 * sp.leg_length)
        self.antennae(-0.42, 0.35 * sp.antenna_length, 30)
        self.ell(0.0, 0.22, 0.14 * w, 0.24, (*b, 255))
        if sp.marking == "stripes":
            self.bands(0.0, 0.22, 0.14 * w, 0.24, sp.marks, sp.mark_size, self.look.accent)
        else:
            self.spots(0.0, 0.22, 0.14 * w, 0.24, sp.marks, sp.mark_size * 0.7, self.look.accent)
        self.seg([(0.0, -0.06), (0.0, 0.0)], (*self.dark, 255), max(1, round(self.u * 0.03)))
        self.ell(0.0, -0.17, 0.11 * w, 0.12, (*_shade(b, 0.75), 255))
        self.ell(0.0, -0.36, 0.1 * w, 0.08, (*self.look.accent, 255))
        for side in (-1.0, 1.0):
            ang = side * (10 + 4 * self.j())
            self.poly(_ellipse_poly(side * 0.09, 0.05, 0.06, 0.27, -ang), sp.wing, wing=True)

    def _shieldbug(self) -> None:
        sp, w, b = self.sp, self.sp.width, self.look.body
        self.legs(-0.12, 0.12, 0.5 * sp.leg_length)
        self.antennae(-0.44, 0.4 * sp.antenna_length, 30)
        self.poly(
            [(-0.06 * w, -0.46), (0.06 * w, -0.46), (0.1 * w, -0.32), (-0.1 * w, -0.32)],
            (*self.dark, 255),
        )
        shield = [
            (-0.14 * w, -0.34),
            (0.14 * w, -0.34),
            (0.32 * w, -0.12),
            (0.28 * w, 0.25),
            (0.0, 0.48),
            (-0.28 * w, 0.25),
            (-0.32 * w, -0.12),
        ]
        self.poly(shield, (*b, 255))
        self.poly([(-0.16 * w, -0.12), (0.16 * w, -0.12), (0.0, 0.2)], (*_shade(b, 0.85), 255))
        ms = sp.mark_size
        if sp.marking == "spots":
            self.spots(0.0, 0.06, 0.26 * w, 0.3, sp.marks, ms * 0.8, self.look.accent)
        elif sp.marking == "band":
            self.bands(0.0, 0.0, 0.3 * w, 0.3, 1 + sp.marks // 3, ms * 1.2, self.look.accent)
        else:
            for k in range(sp.marks):
                off = (k + 1) / (sp.marks + 1) * 0.24 * w
                for side in (-1.0, 1.0):
                    self.seg(
                        [(side * off, -0.3), (side * off * 0.5, 0.3)],
                        (*self.look.accent, 255),
                        max(1, round(self.u * ms * 0.35)),
                    )


# --- per-frame appearance --------------------------------------------------------------


@dataclass
class _Individual:
    """Mutable state of one animal while it is on the screen."""

    ident: int
    species: Species
    master: Image.Image
    cx: float
    cy: float
    angle: float
    scale: float
    home_scale: float
    blur_next: bool = False


@dataclass(frozen=True)
class _Light:
    """Light of one frame: colour gains for the session drift and this frame's flicker."""

    gains: tuple[float, float, float]


@dataclass(frozen=True)
class _Detection:
    """One rendered crop and what goes into the frame's metadata for it."""

    individual: _Individual
    png: bytes
    box: tuple[int, int, int, int]
    area: int
    conf: float


_NOISE_SIZE = 512


def _noise_tile(seed: int) -> FloatArray:
    """Unit normal noise shared by all crops of a run (channel 0 grain, 1-3 sensor).

    Drawing fresh normals for every crop would cost more than the rest of its
    rendering; a random window of one big tile looks just as random.
    """
    rng = np.random.default_rng([seed, 0x9015E])
    return rng.standard_normal(size=(_NOISE_SIZE, _NOISE_SIZE, 4), dtype=np.float32)


def _noise_window(tile: FloatArray, h: int, w: int, rng: np.random.Generator) -> FloatArray:
    if h > tile.shape[0] or w > tile.shape[1]:
        return rng.standard_normal(size=(h, w, 4), dtype=np.float32)
    y = int(rng.integers(0, tile.shape[0] - h + 1))
    x = int(rng.integers(0, tile.shape[1] - w + 1))
    return tile[y : y + h, x : x + w]


def _render_crop(
    ind: _Individual,
    light: _Light,
    frame_size: tuple[int, int],
    noise: FloatArray,
    rng: np.random.Generator,
) -> tuple[Image.Image, int]:
    """The crop of one individual in one frame, and its mask area in pixels."""
    master = ind.master
    # Slight anisotropic squash: the animal tilts a little relative to the camera.
    sx = ind.scale * float(rng.normal(1.0, 0.02))
    sy = ind.scale * float(rng.normal(1.0, 0.02))
    size = (max(4, round(master.width * sx)), max(4, round(master.height * sy)))
    im = master.resize(size, Image.Resampling.BICUBIC)
    im = im.rotate(ind.angle, resample=Image.Resampling.BICUBIC, expand=True)

    extent = max(im.width, im.height)
    halo = max(2.0, 0.07 * extent) * float(rng.uniform(0.7, 1.4))
    pad = math.ceil(halo * 2) + 4
    h, w = im.height + 2 * pad, im.width + 2 * pad
    insect = np.zeros((h, w, 4), dtype=np.float32)
    insect[pad : pad + im.height, pad : pad + im.width] = np.asarray(im, dtype=np.float32)
    alpha = insect[..., 3:4] * np.float32(1.0 / 255.0)

    # flat-bug's masks are loose: a blobby halo of screen around the animal.
    solid = Image.fromarray(((alpha[..., 0] > 0.25) * 255).astype(np.uint8), "L")
    spread = np.asarray(solid.filter(ImageFilter.GaussianBlur(halo)), dtype=np.float32)
    wobble = rng.integers(0, 256, size=(6, 6)).astype(np.uint8)
    wobble_full = np.asarray(
        Image.fromarray(wobble, "L").resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32
    )
    mask = spread > (12.0 + wobble_full * 0.12)
    mask |= alpha[..., 0] > 0.02

    # Screen fabric: slight shading plus grain, then the animal over it.
    grain = _noise_window(noise, h, w, rng)
    screen = _SCREEN + rng.normal(0.0, 4.0, size=3).astype(np.float32)
    background = screen + (wobble_full[..., None] * np.float32(16.0 / 255.0) - 8.0)
    background += grain[..., :1] * np.float32(9.0)
    rgb = background + (insect[..., :3] - background) * alpha

    blur_roll = rng.random()
    if ind.blur_next or blur_roll < 0.04:
        rgb = _motion_blur(rgb, float(rng.uniform(0, 180)), int(rng.integers(3, 9)))
    elif blur_roll < 0.09:
        radius = float(rng.uniform(0.8, 2.2))
        img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
        rgb = np.asarray(img.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)

    # The lamp is brightest in the middle of the screen.
    fx = ind.cx / frame_size[0] - 0.5
    fy = ind.cy / frame_size[1] - 0.5
    falloff = 1.0 - 0.35 * (fx * fx + fy * fy)
    gains = np.array(light.gains, dtype=np.float32) * np.float32(falloff)
    rgb = rgb * gains + grain[..., 1:] * np.float32(2.5)

    out = np.empty((h, w, 4), dtype=np.uint8)
    out[..., :3] = np.clip(rgb, 0, 255).astype(np.uint8) * mask[..., None]
    out[..., 3] = mask * np.uint8(255)
    crop = Image.fromarray(out, "RGBA")
    box = crop.getchannel("A").getbbox()
    if box is not None:
        crop = crop.crop(box)
    return crop, int(np.count_nonzero(mask))


def _motion_blur(rgb: FloatArray, angle_deg: float, length: int) -> FloatArray:
    """Average of copies shifted along a line: the animal moved during the exposure."""
    dx, dy = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    acc = np.zeros_like(rgb)
    for k in range(length):
        t = k - (length - 1) / 2.0
        acc += np.roll(rgb, (round(t * dy), round(t * dx)), axis=(0, 1))
    return acc / float(length)


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
        self.present: list[_Individual] = []
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
        look = _individual_look(sp, np.random.default_rng([cfg.seed, ident, 0x10C]))
        master = _Painter(look).render()
        home = float(self.rng.normal(1.0, 0.03))
        self.present.append(
            _Individual(
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

    def _move(self, ind: _Individual) -> None:
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

    def step(self, index: int) -> _Light:
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
        return _Light(gains=(float(gains[0]), float(gains[1]), float(gains[2])))


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
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"simulation output {out} must be a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    if config.layout == "flat":
        (out / "crops").mkdir()
        (out / "metadata").mkdir()

    world = _World(config)
    labels: list[tuple[str, str]] = []
    seen_species: set[int] = set()
    frame_size = (config.frame_width, config.frame_height)
    noise = _noise_tile(config.seed)
    period = None if config.rate_fps is None else 1.0 / config.rate_fps

    for index in range(config.frames):
        began = time.monotonic()
        light = world.step(index)
        frame = frame_name(config.start + timedelta(seconds=index * config.interval_s))
        visible = [ind for ind in world.present if world.rng.random() >= config.miss_prob]
        order = world.rng.permutation(len(visible))  # flat-bug's order says nothing of who
        detections: list[_Detection] = []
        for pos in order:
            ind = visible[int(pos)]
            rng = np.random.default_rng([config.seed, index, ind.ident, 0xC20B])
            crop, area = _render_crop(ind, light, frame_size, noise, rng)
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

        if config.layout == "per-frame":
            crop_dir = out / frame / "crops"
            crop_dir.mkdir(parents=True)
            meta_dir = out / frame
        else:
            crop_dir, meta_dir = out / "crops", out / "metadata"
        for i, det in enumerate(detections):
            name = _crop_name(frame, i, config.identifier)
            _write(crop_dir / name, det.png, config.atomic)
            labels.append((name, f"{det.individual.species.code}-ind{det.individual.ident:04d}"))
            seen_species.add(det.individual.species.index)
        meta = json.dumps(_metadata(config, frame, detections), indent=1).encode()
        _write(meta_dir / f"metadata_{frame}_UUID_{config.identifier}.json", meta, config.atomic)

        if on_frame is not None:
            on_frame(frame)
        if period is not None and index + 1 < config.frames:
            sleep(max(0.0, period - (time.monotonic() - began)))

    buf_csv = io.StringIO()
    writer = csv.writer(buf_csv, lineterminator="\n")
    writer.writerow(["filename", "label"])
    writer.writerows(labels)
    labels_path = out / "labels.csv"
    _write(labels_path, buf_csv.getvalue().encode(), atomic=True)

    summary = SimSummary(
        frames=config.frames,
        crops=len(labels),
        individuals=world.next_id,
        species=len(seen_species),
        labels_path=labels_path,
    )
    report = {
        "config": _config_json(config),
        "summary": {
            "frames": summary.frames,
            "crops": summary.crops,
            "individuals": summary.individuals,
            "species": summary.species,
            "labels": labels_path.name,
        },
        "species": [{**asdict(sp), "code": sp.code} for sp in world.species],
        "time_format": TIME_FORMAT,
    }
    _write(out / "simulation.json", json.dumps(report, indent=1).encode(), atomic=True)
    return summary


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
