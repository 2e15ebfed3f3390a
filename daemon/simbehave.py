"""How the simulator's animals behave: arrivals, visits, movement, misses and light.

Two behaviours (``SimConfig.behaviour``):

- ``classic``: the model of the first simulator, kept byte for byte so old figures can
  be reproduced. Individuals arrive (Poisson), stay a geometric number of frames and
  never come back; 3 % of frames an individual hops 80-500 px (blurred half the time),
  otherwise it drifts 2.5 px; blur also strikes at random (in the renderer) and each
  detection is missed independently with ``miss_prob``.
- ``trap``: closer to a light trap. Visits end and 30 % of leavers come back minutes
  later at another place (same individual, next visit number); on the screen an animal
  sits still for minutes (not a pixel of movement, only light and sensor noise change)
  between short walks and rare hops; only moving animals are blurred; misses come in
  runs (a two-state Markov chain per individual).

All randomness flows from the run's seed: one generator for the world, and for each
individual's drawing a generator of its own, so the same seed gives the same night.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from .simdraw import Individual, Light, draw_individual
from .simspecies import make_species

if TYPE_CHECKING:
    from .simconfig import SimConfig

__all__ = ["ClassicWorld", "TrapWorld", "World", "make_world"]

_MARGIN = 260.0  # px kept free at the frame's edges, so a crop always fits
_DRIFT_PX = 2.5  # classic: per-axis standard deviation of a frame's drift
_HOP_BLUR_PROB = 0.5  # a hop ends in a blurred crop half the time (as classic's jumps)
_BLUR_LENGTHS = (3, 8)  # px of a motion blur, from just over blur speed to twice it


class World:
    """Species, who is on the screen, and the light; subclasses decide the behaviour."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.rng = np.random.default_rng([config.seed, 0x7A1D])
        self.species = make_species(config.species_count, config.seed)
        # Some species are common, some rare; pairs are not all at the bottom.
        weights = 1.0 / (1.0 + self.rng.permutation(config.species_count)) ** 0.6
        self.weights = weights / weights.sum()
        self.present: list[Individual] = []
        self.next_id = 0
        self.leave_prob = 1.0 / config.stay_frames
        self.margin = _MARGIN
        self.light_phase = self.rng.uniform(0.0, 2.0 * math.pi, size=3)
        self.light_walk = 0.0

    def _new_individual(self) -> Individual:
        cfg = self.config
        sp = self.species[int(self.rng.choice(cfg.species_count, p=self.weights))]
        ident = self.next_id
        self.next_id += 1
        master = draw_individual(sp, np.random.default_rng([cfg.seed, ident, 0x10C]))
        home = float(self.rng.normal(1.0, 0.03))
        return Individual(
            ident=ident,
            species=sp,
            master=master,
            cx=float(self.rng.uniform(self.margin, cfg.frame_width - self.margin)),
            cy=float(self.rng.uniform(self.margin, cfg.frame_height - self.margin)),
            angle=float(self.rng.uniform(0.0, 360.0)),
            scale=home,
            home_scale=home,
        )

    def _keep_inside(self, ind: Individual) -> bool:
        """Clip the position to the frame (less the margin); True when it was clipped."""
        cfg = self.config
        cx = float(np.clip(ind.cx, self.margin, cfg.frame_width - self.margin))
        cy = float(np.clip(ind.cy, self.margin, cfg.frame_height - self.margin))
        clipped = (cx, cy) != (ind.cx, ind.cy)
        ind.cx, ind.cy = cx, cy
        return clipped

    def _wander_scale(self, ind: Individual) -> None:
        pull = 0.1 * (ind.home_scale - ind.scale)  # scale wanders but stays near home
        ind.scale = float(np.clip(ind.scale * self.rng.normal(1.0, 0.012) + pull, 0.8, 1.2))

    def light(self, index: int) -> Light:
        """The light of frame ``index``: a slow cycle, a random walk and flicker."""
        rng = self.rng
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

    def step(self, index: int) -> Light:
        """Advance to frame ``index``: leave, move, arrive; return the frame's light."""
        raise NotImplementedError

    def visible(self) -> list[Individual]:
        """Who the detector finds in this frame, in the order of ``present``."""
        raise NotImplementedError


class ClassicWorld(World):
    """The first simulator's behaviour; its random draws must never change order."""

    def _arrive(self) -> None:
        self.present.append(self._new_individual())

    def _move(self, ind: Individual) -> None:
        rng = self.rng
        ind.blur_next = False
        if rng.random() < 0.03:
            # A walk or short hop to another spot of the screen.
            dist = rng.uniform(80.0, 500.0)
            heading = rng.uniform(0.0, 2.0 * math.pi)
            ind.cx += dist * math.cos(heading)
            ind.cy += dist * math.sin(heading)
            ind.angle += rng.normal(0.0, 60.0)
            ind.blur_next = rng.random() < 0.5
            ind.moved = True
        else:
            ind.cx += rng.normal(0.0, _DRIFT_PX)
            ind.cy += rng.normal(0.0, _DRIFT_PX)
            ind.angle += rng.normal(0.0, 4.0) if rng.random() < 0.9 else rng.normal(0.0, 35.0)
        self._keep_inside(ind)
        ind.angle = float(ind.angle % 360.0)
        self._wander_scale(ind)

    def step(self, index: int) -> Light:
        """Advance to frame ``index``: leave, move, arrive; return the frame's light."""
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
            for _ in range(int(rng.poisson(cfg.mean_present / cfg.stay_frames))):
                self._arrive()
        return self.light(index)

    def visible(self) -> list[Individual]:
        """Each present individual is missed independently with ``miss_prob``."""
        miss = self.config.miss_prob
        return [ind for ind in self.present if self.rng.random() >= miss]


def _per_frame(mean_s: float, interval_s: float) -> float:
    """Chance per frame that something lasting ``mean_s`` on average (exponential) ends."""
    return 1.0 - math.exp(-interval_s / mean_s)


class TrapWorld(World):
    """Visits with returns, still periods and walks, hops, movement blur, miss runs."""

    def __init__(self, config: SimConfig) -> None:
        super().__init__(config)
        dt = config.interval_s
        # (frame it comes back, who); None: one away since before the night, made when it
        # comes, so that individuals counts only animals that were on the screen.
        self.away: list[tuple[int, Individual | None]] = []
        self.p_walk = _per_frame(config.still_s, dt)
        self.p_settle = _per_frame(config.walk_s, dt)
        self.p_hop = _per_frame(config.hop_every_s, dt)
        # Returns bring a share of the visits, so new arrivals make up the rest.
        self.new_rate = config.mean_present / config.stay_frames * (1.0 - config.return_prob)

    def _place(self, ind: Individual) -> None:
        """Start a visit: settled at a random spot, not yet missed."""
        cfg = self.config
        ind.cx = float(self.rng.uniform(self.margin, cfg.frame_width - self.margin))
        ind.cy = float(self.rng.uniform(self.margin, cfg.frame_height - self.margin))
        ind.angle = float(self.rng.uniform(0.0, 360.0))
        ind.still, ind.moved, ind.missing, ind.blur_px = True, False, False, 0
        ind.stepped = False
        ind.visit = ind.visits
        ind.visits += 1

    def _away_frames(self) -> int:
        """Frames until a leaver comes back: a floor plus an exponential rest."""
        cfg = self.config
        rest = self.rng.exponential(max(cfg.return_after_s - cfg.return_min_s, 1e-9))
        return max(1, math.ceil((cfg.return_min_s + rest) / cfg.interval_s))

    def _start(self, index: int) -> None:
        cfg, rng = self.config, self.rng
        for _ in range(int(rng.poisson(cfg.mean_present))):
            ind = self._new_individual()
            self._place(ind)
            if rng.random() < cfg.walk_s / (cfg.walk_s + cfg.still_s):
                self._begin_walk(ind)
            self.present.append(ind)
        # Also start with the steady state's animals that are away for a while, so the
        # screen does not thin out until the first leavers return.
        away_mean = cfg.return_after_s / cfg.interval_s
        expected_away = cfg.mean_present * self.leave_prob * cfg.return_prob * away_mean
        for _ in range(int(rng.poisson(expected_away))):
            due = index + max(1, math.ceil(rng.uniform(0.0, 2.0 * away_mean)))
            self.away.append((due, None))

    def _begin_walk(self, ind: Individual) -> None:
        low, high = self.config.walk_speed_px_s
        ind.still = False
        ind.heading = float(self.rng.uniform(0.0, 2.0 * math.pi))
        ind.speed = float(self.rng.uniform(low, high))

    def _hop(self, ind: Individual) -> None:
        """A short flight to another spot; it lands and settles there."""
        rng = self.rng
        low, high = self.config.hop_px
        dist = rng.uniform(low, high)
        heading = rng.uniform(0.0, 2.0 * math.pi)
        ind.cx += dist * math.cos(heading)
        ind.cy += dist * math.sin(heading)
        ind.angle = float((ind.angle + rng.normal(0.0, 60.0)) % 360.0)
        self._keep_inside(ind)
        ind.still, ind.moved, ind.stepped = True, True, True
        if rng.random() < _HOP_BLUR_PROB:  # still fluttering when the shutter opens
            ind.blur_px = int(rng.integers(_BLUR_LENGTHS[0] + 1, _BLUR_LENGTHS[1] + 1))
            ind.blur_angle = math.degrees(heading)

    def _walk(self, ind: Individual) -> None:
        cfg, rng = self.config, self.rng
        ind.heading += float(rng.normal(0.0, 0.35))
        step = ind.speed * cfg.interval_s
        ind.cx += step * math.cos(ind.heading)
        ind.cy += step * math.sin(ind.heading)
        if self._keep_inside(ind):
            ind.heading += math.pi  # turn back at the edge of the screen
        ind.angle = float((ind.angle + rng.normal(0.0, 8.0)) % 360.0)
        self._wander_scale(ind)
        ind.moved = ind.stepped = True
        if ind.speed >= cfg.blur_speed_px_s:
            over = ind.speed / cfg.blur_speed_px_s - 1.0  # 0 at blur speed, 1 at twice it
            low, high = _BLUR_LENGTHS
            ind.blur_px = low + round(min(1.0, over) * (high - low))
            ind.blur_angle = math.degrees(ind.heading)

    def _move(self, ind: Individual) -> None:
        rng = self.rng
        ind.blur_px, ind.stepped = 0, False
        if rng.random() < self.p_hop:
            self._hop(ind)
        elif ind.still:
            if rng.random() < self.p_walk:
                self._begin_walk(ind)
                self._walk(ind)
        elif rng.random() < self.p_settle:
            ind.still = True
        else:
            self._walk(ind)

    def step(self, index: int) -> Light:
        """Advance to frame ``index``: visits end, animals move, leavers return, new ones
        arrive; return the frame's light."""
        cfg, rng = self.config, self.rng
        if index == 0:
            self._start(index)
            return self.light(index)
        staying: list[Individual] = []
        for ind in self.present:
            if rng.random() >= self.leave_prob:
                staying.append(ind)
            elif rng.random() < cfg.return_prob:
                self.away.append((index + self._away_frames(), ind))
        self.present = staying
        for ind in self.present:
            self._move(ind)
        back = [ind for due, ind in self.away if due <= index]
        self.away = [(due, ind) for due, ind in self.away if due > index]
        for came in back:
            ind = self._new_individual() if came is None else came
            self._place(ind)
            self.present.append(ind)
        for _ in range(int(rng.poisson(self.new_rate))):
            ind = self._new_individual()
            self._place(ind)
            self.present.append(ind)
        return self.light(index)

    def visible(self) -> list[Individual]:
        """Misses run in streaks: after a miss, another is ``miss_after_miss`` likely."""
        cfg = self.config
        seen: list[Individual] = []
        for ind in self.present:
            chance = cfg.miss_after_miss if ind.missing else cfg.miss_prob
            ind.missing = bool(self.rng.random() < chance)
            if not ind.missing:
                seen.append(ind)
        return seen


def make_world(config: SimConfig) -> World:
    """The world of ``config.behaviour``."""
    if config.behaviour == "classic":
        return ClassicWorld(config)
    return TrapWorld(config)
