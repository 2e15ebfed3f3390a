"""The simulator's configuration: :class:`SimConfig` and its by-behaviour defaults.

Kept apart from :mod:`crop_clusterd.simulate` so the behaviour model
(:mod:`crop_clusterd.simbehave`) can read it without importing the writer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

__all__ = ["Behaviour", "Layout", "SimConfig"]

Layout = Literal["per-frame", "flat"]
Behaviour = Literal["trap", "classic"]

_IDENTIFIER_RE = re.compile(r"^[A-Za-z0-9-]+$")


@dataclass(frozen=True)
class SimConfig:
    """What to simulate; every field has a sensible default for a ~5k-crop demo night."""

    seed: int = 0
    frames: int = 300
    interval_s: float = 2.0
    start: datetime = field(default_factory=lambda: datetime(2024, 7, 1, 22, 0, 0))
    # None: by behaviour (see _BY_BEHAVIOUR); resolved in __post_init__, read the
    # resolved values through species_count and stay_frames.
    species: int | None = None
    mean_present: float = 15.0
    mean_stay_frames: float | None = None
    frame_width: int = 4000
    frame_height: int = 3000
    layout: Layout = "per-frame"
    identifier: str | None = "SIM"
    rate_fps: float | None = None
    crop_format: Literal["png"] = "png"
    atomic: bool = True
    miss_prob: float = 0.02
    # New fields go last: a classic run's simulation.json then lists the old fields
    # first, in their old order, with their old values.
    behaviour: Behaviour = "trap"
    # --- the trap behaviour only. The values are assumptions, not measurements: moths
    # at a light settle on or near it and alternate resting with short walks and
    # flights around it, and leave and come back to it (Frank 1988, J. Lepid. Soc.
    # 42:63-93, reviews these responses); the minutes below fit what the issue reports
    # of real trap sequences (tens of frames per moth at a frame every few seconds).
    return_prob: float = 0.3  # share of visits after which the animal comes back
    return_after_s: float = 180.0  # mean time away before it comes back (minutes)
    return_min_s: float = 30.0  # shortest time away: a return, not a hop
    still_s: float = 120.0  # mean still period: settled on the sheet, not a pixel moved
    walk_s: float = 10.0  # mean walk between still periods
    walk_speed_px_s: tuple[float, float] = (10.0, 60.0)  # walking speed, px/s (~1-10 mm/s)
    blur_speed_px_s: float = 30.0  # walks at least this fast are motion-blurred
    hop_every_s: float = 300.0  # mean time between short flights to another spot
    hop_px: tuple[float, float] = (80.0, 500.0)  # how far a short flight goes, px
    miss_after_miss: float = 0.7  # a miss after a miss (miss_prob: after a detection)

    def __post_init__(self) -> None:
        """Resolve by-behaviour defaults; reject configs that would produce unreadable
        or colliding output (``ValueError`` naming every problem)."""
        defaults = _BY_BEHAVIOUR.get(self.behaviour, _BY_BEHAVIOUR["trap"])
        if self.species is None:
            object.__setattr__(self, "species", int(defaults["species"]))
        if self.mean_stay_frames is None:
            object.__setattr__(self, "mean_stay_frames", float(defaults["stay"]))
        problems = self._problems() + self._trap_problems()
        if problems:
            raise ValueError("invalid simulation config: " + "; ".join(problems))

    @property
    def species_count(self) -> int:
        """The number of species, resolved by behaviour when not given."""
        assert self.species is not None  # resolved in __post_init__
        return self.species

    @property
    def stay_frames(self) -> float:
        """Mean frames of a stay (a visit in ``trap``), resolved by behaviour."""
        assert self.mean_stay_frames is not None  # resolved in __post_init__
        return self.mean_stay_frames

    def _trap_problems(self) -> list[str]:
        problems: list[str] = []
        if self.behaviour not in ("trap", "classic"):
            problems.append(f"behaviour must be 'trap' or 'classic', got {self.behaviour!r}")
        for name in ("return_prob", "miss_after_miss"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("return_after_s", "still_s", "walk_s", "blur_speed_px_s", "hop_every_s"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.return_min_s <= self.return_after_s:
            problems.append(f"return_min_s must be in [0, return_after_s], got {self.return_min_s}")
        for name in ("walk_speed_px_s", "hop_px"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                problems.append(f"{name} must be (low, high) with 0 <= low <= high")
        return problems

    def _problems(self) -> list[str]:
        problems: list[str] = []
        if self.frames < 1:
            problems.append(f"frames must be >= 1, got {self.frames}")
        if not self.interval_s >= 1.0:
            # Frame names have whole seconds: two frames within a second would collide.
            problems.append(
                f"interval_s must be >= 1 s (names have whole seconds), got {self.interval_s}"
            )
        if self.species_count < 1:
            problems.append(f"species must be >= 1, got {self.species}")
        if not self.mean_present > 0:
            problems.append(f"mean_present must be > 0, got {self.mean_present}")
        if not self.stay_frames >= 1:
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
        return problems


_BY_BEHAVIOUR: dict[str, dict[str, float]] = {
    # classic: the first simulator's defaults, so its old command lines give old files.
    "classic": {"species": 8, "stay": 60.0},
    # trap: more species (a night at a light trap brings tens), and visits of minutes
    # (150 frames = 5 min at 2 s) made of still periods and walks.
    "trap": {"species": 20, "stay": 150.0},
}
