"""Sessions: which night (or run of activity) a crop belongs to.

Field users count individuals per night, and the old batch tool wrote one
result per night; a session is that unit. Clusters never span two sessions,
each session has its own outputs (``OUT/<id>/``), and a closed session's
linker and vectors leave memory, so a night costs what the night holds, not
what the season so far holds.

The rule (``[session]`` in the config, :class:`SessionRule`):

* ``"night"``: a night runs from ``night_starts_h`` (local hour of the frames'
  capture time, default noon) to the same hour the next day; its id is the date
  the night began, ``YYYY-MM-DD``.
* ``"gap"``: a new session starts when a crop's capture time is more than
  ``gap_s`` away from every crop of the current one; its id is the capture time
  of its first crop, ``YYYY-MM-DDTHH-MM-SS``.
* ``"none"``: one session, ``"all"``, forever (the layout before sessions).

Capture times are the frames' naive local times stored as seconds "as if UTC"
(:mod:`crop_clusterd.flatbug`), so calendar arithmetic on them in UTC gives the
trap's own wall clock, whatever the zone of the machine. A crop without a
capture time is placed by its file's modification time in local time.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from . import defaults
from .config import Config, SessionSplit
from .records import Crop

__all__ = ["SessionAssigner", "SessionRule", "capture_seconds", "session_rule"]

Command = Literal["run", "cluster"]


@dataclass(frozen=True, slots=True)
class SessionRule:
    """How crops are split into sessions (see the module docstring).

    ``night_starts_h`` hours (local), ``gap_s`` and ``close_after_s`` seconds.
    """

    split: SessionSplit = "none"
    night_starts_h: float = defaults.NIGHT_STARTS_H
    gap_s: float = defaults.SESSION_GAP_S
    close_after_s: float = defaults.SESSION_CLOSE_AFTER_S

    @property
    def single(self) -> bool:
        """Whether there is one session only (``"none"``: outputs in the output folder)."""
        return self.split == "none"

    def night_of(self, t: float) -> str:
        """The id (``YYYY-MM-DD``) of the night holding capture time ``t`` (seconds)."""
        begun = datetime.fromtimestamp(t - self.night_starts_h * 3600.0, UTC)
        return begun.strftime("%Y-%m-%d")


def session_rule(config: Config, command: Command) -> SessionRule:
    """The session rule of ``config`` for ``command``.

    ``"auto"`` (unset) is ``"night"`` for run and ``"none"`` for cluster.
    """
    s = config.session
    split: SessionSplit = s.split or ("night" if command == "run" else "none")
    return SessionRule(split, s.night_starts_h, s.gap_s, s.close_after_s)


def capture_seconds(crop: Crop) -> float:
    """The crop's capture time, or its file's modification time as local wall clock.

    Seconds "as if UTC" (see the module docstring); NaN when neither is known.
    """
    if crop.time is not None and math.isfinite(crop.time):
        return crop.time
    if crop.mtime_ns is None:
        return math.nan
    t = crop.mtime_ns / 1e9
    # The local wall clock of the modification, expressed like a capture time.
    return t + time.localtime(t).tm_gmtoff


def gap_id(t: float) -> str:
    """The id of a ``"gap"`` session whose first crop was captured at ``t``."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H-%M-%S")


class SessionAssigner:
    """Assigns capture times to sessions for one rule, keeping what ``"gap"`` needs.

    ``"night"`` and ``"none"`` are stateless; ``"gap"`` remembers the span of
    capture times of the session last assigned, so a crop within ``gap_s`` of
    it joins it. ``restore`` seeds that span after a restart. Times are seconds;
    a NaN time joins the current session (or ``"all"``-like ``"undated"`` first).
    """

    def __init__(self, rule: SessionRule) -> None:
        self.rule = rule
        self._current: str | None = None
        self._span = (math.nan, math.nan)

    def restore(self, session: str, first: float, last: float) -> None:
        """Continue ``session``, whose crops were captured from ``first`` to ``last``."""
        self._current, self._span = session, (first, last)

    def assign(self, t: float) -> str:
        """The session of a crop captured at ``t`` (seconds; NaN when unknown)."""
        rule = self.rule
        if rule.split == "none":
            return defaults.ALL_SESSION
        if math.isnan(t):
            return self._current or "undated"
        if rule.split == "night":
            return rule.night_of(t)
        first, last = self._span
        if self._current is not None and first - rule.gap_s <= t <= last + rule.gap_s:
            self._span = (min(first, t), max(last, t))
            return self._current
        self._current, self._span = gap_id(t), (t, t)
        return self._current
