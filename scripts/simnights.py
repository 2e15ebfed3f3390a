"""Simulated nights for the benches: drawn once and cached, staged by hard links,
fed to a watched folder by renames (so feeding writes no data)."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

NIGHT_START = datetime(2024, 7, 1, 22, 0, 0)
"""Capture time of the first frame of night 0; night ``k`` starts ``k`` days later."""
CROPS_PER_FRAME = 13.7  # the simulator's mean_present 14, less its 2% misses


@dataclass(frozen=True)
class Night:
    """A simulated night on disk: frame folders (flat-bug layout) under ``folder``."""

    index: int
    folder: Path
    crops: int
    start: datetime

    @property
    def name(self) -> str:
        """``night-YYYY-MM-DD``: the date the night began."""
        return f"night-{self.start:%Y-%m-%d}"

    def frames(self) -> list[Path]:
        """The frame folders, in time order."""
        return sorted(p for p in self.folder.iterdir() if p.is_dir())


def _crop_number(path: Path) -> int:
    parts = path.stem.split("_")
    return int(parts[parts.index("CROPNUMBER") + 1])


def _trim(folder: Path, crops: int) -> int:
    """Keep the first ``crops`` crops in time order (whole frames, then the last
    frame's lowest crop numbers); returns how many there were."""
    kept = 0
    total = 0
    for frame in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted((frame / "crops").glob("*.png"), key=_crop_number)
        total += len(files)
        if kept >= crops:
            shutil.rmtree(frame)
            continue
        for extra in files[crops - kept :]:
            extra.unlink()
        kept += min(len(files), crops - kept)
    return total


def make_night(cache: Path, index: int, crops: int, seed: int = 0) -> Night:
    """Night ``index`` of exactly ``crops`` crops, simulated into ``cache`` or reused.

    Starts at 22:00 on ``NIGHT_START`` + ``index`` days; seed ``seed + index``,
    so every night has other individuals. Takes about 12 ms per crop to draw.
    """
    from crop_clusterd.simulate import SimConfig, simulate

    start = NIGHT_START + timedelta(days=index)
    folder = cache / f"{start:%Y%m%d}-seed{seed + index}-{crops}"
    night = Night(index, folder, crops, start)
    if (folder / ".complete").exists():
        return night
    frames = int(crops / CROPS_PER_FRAME) + 2
    while True:
        if folder.exists():
            shutil.rmtree(folder)
        config = SimConfig(
            seed=seed + index, frames=frames, start=start, mean_present=14.0, behaviour="classic"
        )
        simulate(config, folder)
        if _trim(folder, crops) >= crops:
            break
        frames = int(frames * 1.3) + 1  # fewer visitors than expected: a longer night
    (folder / ".complete").write_text(f"{crops}\n")
    return night


def stage_night(night: Night, staging: Path) -> Path:
    """Hard-link the night's frames into ``staging/<night name>`` (nothing is copied).

    Returns the staged folder, ready to be renamed into a watched folder.
    """
    dest = staging / night.name
    if dest.exists():
        shutil.rmtree(dest)
    for frame in night.frames():
        for src in frame.rglob("*"):
            target = dest / frame.name / src.relative_to(frame)
            if src.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(src, target)
    return dest


def feed(staged: Path, watch: Path, rate: float | None) -> None:
    """Move a staged night into ``watch``: whole at once (``rate`` None), or frame by
    frame at ``rate`` crops per second (renames only: nothing is copied)."""
    if rate is None:
        staged.rename(watch / staged.name)
        return
    dest = watch / staged.name
    dest.mkdir()
    due = time.monotonic()
    for frame in sorted(staged.iterdir()):
        time.sleep(max(0.0, due - time.monotonic()))
        n = sum(1 for _ in (frame / "crops").iterdir())
        frame.rename(dest / frame.name)
        due += n / rate
    staged.rmdir()
