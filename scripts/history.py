"""Synthetic history for ``endurance.py``: crops committed through the real link stage.

A season of 10^6 crops drawn and embedded through the daemon would take days on a
small machine, and the model is not what is measured. So history crops have no
image files: their embeddings are drawn directly and handed to the daemon's own
:class:`~crop_clusterd.link_stage.LinkStage` as micro-batches, one whole frame or
more at a time (at most ``embed.batch_size`` crops, as the embed stage forms
them). The link stage links them with the configured linker and commits them to
the state database exactly as for crops from files (names, frames, capture times,
box centres, stat and content hash, vectors, clusters, merges, batch numbers); at
the end it saves the index as at a daemon's stop, and one snapshot writes the
output folder. What differs from a real season:

* the files do not exist, so a restart's first scan does not walk them (a real
  trap folder would hold them all: the scan's cost is not in these figures);
* the vectors are synthetic: each night's individuals are variations of shared
  species, each crop its individual plus noise (cosine ~0.98 between two crops
  of one individual, ~0.55 between individuals of a species), so linking finds
  about one cluster per individual; individuals sit still with a few pixels of
  jitter, for ``track``'s motion model;
* file stats and content hashes are made up (random inodes and hashes, as the
  state's indexes on them would see real ones);
* nights are dated before the measured ones (22:00 on consecutive days, frames
  2 s apart, ~14 crops a frame), one night per ``crops_per_night`` crops.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from simnights import NIGHT_START

FRAME_S = 2.0
PRESENT = 14.0  # mean individuals on the screen
STAY_FRAMES = 60.0  # mean frames an individual stays
SPECIES = 50
INDIVIDUAL_SPREAD = 0.9
CROP_SPREAD = 0.15


def _unit(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return x


@dataclass
class _Visitor:
    vector: npt.NDArray[np.float32]
    cx: float
    cy: float
    left: int


@dataclass
class _NightDraw:
    """Draws one history night frame by frame: who is present, and their crops."""

    rng: np.random.Generator
    species: npt.NDArray[np.float32]
    start: datetime
    root: Path
    present: list[_Visitor] = field(default_factory=list)

    def _arrive(self) -> _Visitor:
        dim = self.species.shape[1]
        sp = self.species[int(self.rng.integers(len(self.species)))]
        noise = self.rng.standard_normal((dim,)).astype(np.float32)
        vector = _unit(sp + INDIVIDUAL_SPREAD / math.sqrt(dim) * noise)
        return _Visitor(
            vector,
            float(self.rng.uniform(300, 3700)),
            float(self.rng.uniform(300, 2700)),
            int(self.rng.geometric(1.0 / STAY_FRAMES)),
        )

    def frame(self, index: int, limit: int) -> list[Any]:
        """The crops (``Embedded``) of frame ``index``, at most ``limit``."""
        from crop_clusterd.flatbug import frame_of_path
        from crop_clusterd.records import Crop, Embedded

        arrivals = (
            self.rng.poisson(PRESENT) if index == 0 else self.rng.poisson(PRESENT / STAY_FRAMES)
        )
        self.present = [v for v in self.present if v.left > 0]
        self.present += [self._arrive() for _ in range(int(arrivals))]
        visitors = self.present[:limit]
        if not visitors:
            return []
        dim = self.species.shape[1]
        noise = self.rng.standard_normal((len(visitors), dim)).astype(np.float32)
        vectors = _unit(
            np.stack([v.vector for v in visitors]) + CROP_SPREAD / math.sqrt(dim) * noise
        )
        when = self.start + timedelta(seconds=index * FRAME_S)
        frame = when.strftime("%Y%m%d%H%M%S") + "-00-06"
        t = when.replace(tzinfo=UTC).timestamp()
        out = []
        for i, (v, vec) in enumerate(zip(visitors, vectors, strict=True)):
            v.left -= 1
            v.cx += float(self.rng.normal(0, 3))
            v.cy += float(self.rng.normal(0, 3))
            path = self.root / frame / "crops" / f"crop_{frame}_CROPNUMBER_{i}_UUID_SIM.png"
            crop = Crop(
                path=path,
                name=str(path),
                frame=frame_of_path(path),
                crop_index=i,
                time=t,
                center=(v.cx, v.cy),
                size=40_000 + i,
                mtime_ns=int(t * 1e9),
                # Random, as ext4 spreads a season's folders over its block groups:
                # the state's inode index then grows as it would beside a trap.
                inode=int(self.rng.integers(1, 1 << 31)),
                content=self.rng.bytes(16).hex(),
            )
            out.append(Embedded(crop, vec))
        return out


def history_batches(
    n: int, dim: int, *, crops_per_night: int, batch_size: int, seed: int, root: Path
) -> Iterator[Any]:
    """``MicroBatch``es of ``n`` synthetic crops over ``ceil(n / crops_per_night)`` nights
    dated before ``NIGHT_START``; whole frames, at most ``batch_size`` crops each."""
    from crop_clusterd.records import MicroBatch

    rng = np.random.default_rng([seed, 0x415])
    species = _unit(rng.standard_normal((SPECIES, dim)).astype(np.float32))
    nights = max(1, math.ceil(n / crops_per_night))
    made = 0
    for h in range(nights):
        count = min(crops_per_night, n - made)
        draw = _NightDraw(rng, species, NIGHT_START - timedelta(days=nights - h), root)
        pending: list[Any] = []
        index = 0
        while count > 0:
            crops = draw.frame(index, min(count, batch_size))
            index += 1
            count -= len(crops)
            made += len(crops)
            if len(pending) + len(crops) > batch_size:
                yield MicroBatch(tuple(pending), (time.monotonic(),) * len(pending), ())
                pending = []
            pending += crops
        if pending:
            yield MicroBatch(tuple(pending), (time.monotonic(),) * len(pending), ())


def build_history(
    config: Any,
    n: int,
    *,
    dim: int,
    crops_per_night: int,
    seed: int,
    say: Callable[[str], None] = print,
) -> float:
    """Commit ``n`` synthetic crops of ``dim`` floats into ``config``'s (empty) state
    folder through the link stage, close the last session (as the day's silence
    would), write one snapshot; returns the seconds it took."""
    from crop_clusterd.factory import linker_from_config, state_settings
    from crop_clusterd.link_stage import LinkStage
    from crop_clusterd.notify import Progress
    from crop_clusterd.sessionbook import SessionBook
    from crop_clusterd.sessions import session_rule
    from crop_clusterd.snapshot import SnapshotWriter
    from crop_clusterd.store import StateStore

    t0 = time.monotonic()
    folder = config.state.folder
    store = StateStore(folder)
    store.check_settings(state_settings(config))
    if store.next_seq():
        raise RuntimeError(f"{folder}: history needs an empty state folder")
    book = SessionBook(
        store,
        session_rule(config, "run"),
        lambda: linker_from_config(config),
        folder,
        keep_sessions=config.state.keep_sessions,
    )
    book.resume(time.time())
    link = LinkStage(
        book,
        queue.Queue(),
        threading.Event(),
        Progress(1e9),
        next_batch=store.last_batch() + 1,
        index_save_s=math.inf,
    )
    done = 0
    for batch in history_batches(
        n,
        dim,
        crops_per_night=crops_per_night,
        batch_size=config.embed.batch_size,
        seed=seed,
        root=folder.parent / "history-crops",
    ):
        link.handle(batch)
        before, done = done, done + len(batch.embedded)
        if done // 100_000 > before // 100_000:
            say(f"  history: {done:,} crops committed, {time.monotonic() - t0:.0f} s")
    link.save_index()
    if not book.rule.single:
        book.close(time.time(), reason="silence")
    store.close()
    SnapshotWriter(folder, config.output, session=book.rule).write()
    return time.monotonic() - t0
