"""Free space of the state and output folders, and a warning when it runs low.

A box beside a trap runs for a season on an SD card or a small SSD; when the
card fills, commits fail (and are retried: no committed crop is lost) and
snapshots fail (the previous files stay). :class:`DiskWatch` says so before
that happens: the daemon checks both folders every second, logs ``disk_low``
once when one drops below ``state.min_free_mb`` and ``disk_ok`` when it has
recovered, and shows the figures in STATUS= and ``crop-clusterd status``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .log import get_logger

__all__ = ["MB", "DiskFigures", "DiskWatch", "free_mb", "recover_margin_mb"]

log = get_logger(__name__)

MB = 1024 * 1024
"""Bytes in the MB of ``state.min_free_mb`` and of the figures (as ``df -m`` counts)."""


def free_mb(folder: Path) -> int:
    """Free space in MB (:data:`MB`) for this process on the filesystem of ``folder``.

    A folder that does not exist yet is measured at its nearest existing parent
    (where it will be created). What is free for an unprivileged writer:
    blocks reserved for root are not counted. Raises :class:`OSError` when
    no folder on the way up can be measured (e.g. permission denied).
    """
    path = Path(folder).absolute()
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free // MB
        except (FileNotFoundError, NotADirectoryError):
            continue
    raise FileNotFoundError(f"no existing folder above {path}")


def recover_margin_mb(min_free_mb: int) -> int:
    """How far above ``min_free_mb`` a low folder must get to count as recovered.

    Without a margin, free space hovering at the limit (a snapshot's temporary
    file written and renamed) would log ``disk_low`` and ``disk_ok`` every second.
    """
    return max(16, min_free_mb // 20)


@dataclass(frozen=True, slots=True)
class DiskFigures:
    """The latest free space of each watched folder.

    ``free`` maps a folder's role (``"state"``, ``"output"``) to its free MB,
    None when it could not be measured (or not yet); ``low`` the roles below
    ``min_free_mb`` (latched until they recover, see :func:`recover_margin_mb`).
    """

    free: Mapping[str, int | None]
    min_free_mb: int
    low: tuple[str, ...] = ()

    def alert(self) -> str:
        """``"DISK LOW: state 512 MB free"`` for STATUS=, or ``""`` when none is low."""
        if not self.low:
            return ""
        figures = (self.free.get(role) for role in self.low)
        return "DISK LOW: " + ", ".join(
            f"{role} {'?' if mb is None else mb} MB free"
            for role, mb in zip(self.low, figures, strict=True)
        )

    def runtime_values(self) -> dict[str, object]:
        """The figures as the daemon publishes them for ``crop-clusterd status``:
        ``<role>_free_mb`` (int or None), ``min_free_mb`` and ``disk_low`` (roles)."""
        values: dict[str, object] = {f"{role}_free_mb": mb for role, mb in self.free.items()}
        values["min_free_mb"] = self.min_free_mb
        values["disk_low"] = list(self.low)
        return values


@dataclass
class DiskWatch:
    """Measures the state and output folders and logs when one runs low.

    ``min_free_mb`` (>= 0; 0 never warns) is the limit; ``read`` measures a
    folder in MB (default :func:`free_mb`; a test injects a fake). Call
    :meth:`check` from one thread; :attr:`figures` holds the latest result.
    """

    state_folder: Path
    output_folder: Path
    min_free_mb: int
    read: Callable[[Path], int] = free_mb
    figures: DiskFigures = field(init=False)
    _unreadable: set[str] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self.figures = DiskFigures({"state": None, "output": None}, self.min_free_mb)

    def check(self) -> DiskFigures:
        """Measure both folders; log ``disk_low`` (warning) when one drops below
        the limit, ``disk_ok`` (info) when it recovers, ``disk_space_unknown``
        (warning) once when one cannot be measured. Never raises OSError."""
        free: dict[str, int | None] = {}
        low = set(self.figures.low)
        for role, folder in (("state", self.state_folder), ("output", self.output_folder)):
            mb = free[role] = self._measure(role, folder)
            if mb is None:
                continue  # a folder that cannot be measured keeps its last state
            if role not in low and mb < self.min_free_mb:
                low.add(role)
                log.warning(
                    "disk_low", folder=role, path=str(folder), free_mb=mb,
                    min_free_mb=self.min_free_mb,
                )  # fmt: skip
            elif role in low and mb >= self.min_free_mb + recover_margin_mb(self.min_free_mb):
                low.discard(role)
                log.info("disk_ok", folder=role, path=str(folder), free_mb=mb)
        ordered = tuple(role for role in free if role in low)
        self.figures = DiskFigures(free, self.min_free_mb, ordered)
        return self.figures

    def _measure(self, role: str, folder: Path) -> int | None:
        try:
            mb = self.read(folder)
        except OSError as exc:
            if role not in self._unreadable:
                self._unreadable.add(role)
                log.warning("disk_space_unknown", folder=role, path=str(folder), reason=str(exc))
            return None
        self._unreadable.discard(role)
        return mb
