"""The simulator's species: body plans, colours and look-alike pairs.

Every species is derived from the run's seed, so the same seed gives the same
species; :func:`make_species` is the only entry point.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["PLANS", "Species", "clip_rgb", "make_species"]

PLANS: tuple[str, ...] = ("moth", "beetle", "fly", "slender", "wasp", "shieldbug")
"""Body plans; two species of one look-alike pair always share their plan."""

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


def _look_alike_pairs(count: int) -> int:
    """How many look-alike pairs a set of ``count`` species gets (3 of 8)."""
    if count < 2:
        return 0
    return min(count // 2, max(1, count * 3 // 8))


def clip_rgb(values: npt.ArrayLike) -> tuple[int, int, int]:
    """Round three values to the nearest integers in 0..255, as an RGB tuple."""
    arr = np.clip(np.rint(np.asarray(values, dtype=np.float64)), 0, 255).astype(int)
    return (int(arr[0]), int(arr[1]), int(arr[2]))


def _accent_for(body: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    """A marking colour that stands out from the body: much darker or much lighter."""
    lum = 0.3 * body[0] + 0.59 * body[1] + 0.11 * body[2]
    if lum > 110:
        return clip_rgb(np.array(body) * rng.uniform(0.15, 0.35))
    options = ((235, 225, 200), (230, 200, 60), (220, 120, 50), (240, 240, 240))
    return options[int(rng.integers(len(options)))]


def _base_species(
    index: int, plan: str, body: tuple[int, int, int], rng: np.random.Generator
) -> Species:
    low, high = _LENGTHS[plan]
    wing_alpha = 245 if plan == "moth" else int(rng.integers(70, 120))
    wing_rgb = body if plan == "moth" else clip_rgb(rng.uniform(170, 215, size=3))
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
    body = clip_rgb(np.array(base.body) + direction * rng.uniform(14.0, 22.0))
    accent = clip_rgb(np.array(base.accent) + rng.normal(0.0, 8.0, size=3))
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
