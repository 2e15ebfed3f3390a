"""``crop-clusterd status``: what a running (or stopped) daemon has done, from its state.

Everything is read from the state folder through a read-only connection, so the
command is safe while the daemon runs and needs no socket or signal. Totals come
from the committed tables; live figures (queue depth, last snapshot, errors)
come from the ``runtime`` table, which the daemon refreshes every few seconds
along with a heartbeat (``updated_at``). A daemon counts as alive when that
heartbeat is recent and its pid exists.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TextIO

import numpy as np

from .store import DB_NAME, StateError, StateStore, session_cluster_sizes

__all__ = [
    "ALIVE_WITHIN_S",
    "RATE_WINDOW_S",
    "StatusReport",
    "format_status",
    "main_status",
    "read_status",
    "status_json",
]

ALIVE_WITHIN_S = 30.0
"""A heartbeat older than this means the daemon is not running (or hung)."""

RATE_WINDOW_S = 60.0
"""Crops per second are averaged over this many seconds."""


@dataclass(frozen=True, slots=True)
class StatusReport:
    """The state of one state folder, as ``crop-clusterd status`` shows it.

    Counts are of committed work: ``crops``, ``skipped`` and ``batches`` over
    every session; ``clusters``, ``singletons``, ``merges`` and
    ``session_crops`` of the newest ``session`` (open or last closed). Fields
    from the daemon's runtime table are None when it never published them (or
    published something unreadable).
    ``alive`` is True when the heartbeat is under :data:`ALIVE_WITHIN_S`
    seconds old, the pid exists and the phase is not ``stopped``. Disk
    figures, as the daemon last measured them: ``state_free_mb`` and
    ``output_free_mb`` free space (MB of 2^20 bytes) of its folders,
    ``min_free_mb`` its limit, ``disk_low`` the folders (``"state"``,
    ``"output"``) below it.
    """

    state_folder: str
    at: float
    crops: int
    clusters: int
    singletons: int
    skipped: int
    merges: int
    batches: int
    session: str | None
    session_open: bool
    session_crops: int
    sessions: int
    crops_per_s: float
    alive: bool
    pid: int | None
    phase: str | None
    started_at: float | None
    updated_at: float | None
    heartbeat_age_s: float | None
    queue: int | None
    last_snapshot_at: float | None
    snapshot_error: str | None
    state_error: str | None
    watch_mode: str | None
    state_free_mb: int | None = None
    output_free_mb: int | None = None
    min_free_mb: int | None = None
    disk_low: tuple[str, ...] = ()


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _integer(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _names(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(v for v in value if isinstance(v, str) and v)


def _pid_exists(pid: int) -> bool:
    """Whether a process with this pid exists (signal 0 checks without sending)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user (the service account)
    except OSError:
        return False
    return True


def read_status(state_folder: Path, *, now: float | None = None) -> StatusReport:
    """Read the status of the daemon whose state is in ``state_folder``.

    Raises :class:`~crop_clusterd.store.StateError` when the folder holds no
    state database or it cannot be read.
    """
    folder = Path(state_folder)
    at = time.time() if now is None else now
    db = folder / DB_NAME
    if not db.exists():
        where = "does not exist" if not folder.exists() else f"has no {DB_NAME}"
        raise StateError(
            f"no crop-clusterd state in {folder}: the folder {where}. "
            "Point --state (or state.folder in --config) at the daemon's state folder."
        )
    with StateStore(folder, readonly=True) as store:
        try:
            counts = store.counts()  # its own read transaction
            with store.read_transaction():
                sessions = store.sessions()
                recent = store.crops_added_since(at - RATE_WINDOW_S)
                runtime = store.runtime()
            # Cluster figures are the newest session's: reading every session
            # would make status cost the whole season.
            newest = sessions[-1] if sessions else None
            sizes = np.zeros(0, dtype=np.int64)
            merges = 0
            if newest is not None:
                sizes = session_cluster_sizes(store, newest.id)
                merges = len(store.load_merges(session=newest.id))
        except (sqlite3.Error, ValueError) as exc:
            # ValueError: a runtime value that is not JSON.
            raise StateError(f"cannot read state database {store.path}: {exc}") from exc
        except IndexError:
            raise StateError(
                f"state database {db} is inconsistent: a cluster id is not a crop's number"
            ) from None
    pid = _integer(runtime.get("pid"))
    phase = _text(runtime.get("phase"))
    updated_at = _number(runtime.get("updated_at"))
    age = None if updated_at is None else max(0.0, at - updated_at)
    alive = (
        age is not None
        and age <= ALIVE_WITHIN_S
        and pid is not None
        and _pid_exists(pid)
        and phase != "stopped"
    )
    return StatusReport(
        state_folder=str(folder),
        at=at,
        crops=counts.crops,
        clusters=len(sizes),
        singletons=int(np.count_nonzero(sizes == 1)),
        skipped=counts.skipped,
        merges=merges,
        batches=counts.batches,
        session=None if newest is None else newest.id,
        session_open=newest is not None and newest.closed is None,
        session_crops=int(sizes.sum()),
        sessions=len(sessions),
        crops_per_s=recent / RATE_WINDOW_S,
        alive=alive,
        pid=pid,
        phase=phase,
        started_at=_number(runtime.get("started_at")),
        updated_at=updated_at,
        heartbeat_age_s=age,
        queue=_integer(runtime.get("queue")),
        last_snapshot_at=_number(runtime.get("last_snapshot_at")),
        snapshot_error=_text(runtime.get("snapshot_error")),
        state_error=_text(runtime.get("state_error")),
        watch_mode=_text(runtime.get("watch_mode")),
        state_free_mb=_integer(runtime.get("state_free_mb")),
        output_free_mb=_integer(runtime.get("output_free_mb")),
        min_free_mb=_integer(runtime.get("min_free_mb")),
        disk_low=_names(runtime.get("disk_low")),
    )


def _ago(seconds: float) -> str:
    """A duration as people read it: 12 s, 4 min, 3.2 h, 2.0 d."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _when(t: float, now: float) -> str:
    local = datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")
    return f"{local} ({_ago(max(0.0, now - t))} ago)"


def _mb(mb: int | None) -> str:
    return "? MB" if mb is None else f"{mb} MB"


def _disk_line(r: StatusReport) -> str:
    """``state 51200 MB free, output 51200 MB free (warns below 1024 MB)``; "" when
    the daemon never published the figures."""
    if r.state_free_mb is None and r.output_free_mb is None:
        return ""
    line = f"state {_mb(r.state_free_mb)} free, output {_mb(r.output_free_mb)} free"
    if r.min_free_mb:
        line += f" (warns below {r.min_free_mb} MB)"
    if not r.alive:
        line += ", at the last heartbeat"
    return line


def format_status(report: StatusReport) -> str:
    """Human-readable lines for a terminal (no trailing newline)."""
    r = report
    if r.alive:
        extra = f", watching with {r.watch_mode}" if r.watch_mode else ""
        daemon = f"running (pid {r.pid}, phase {r.phase or '?'}{extra})"
    elif r.updated_at is None:
        daemon = "not running (it never published a heartbeat)"
    else:
        why = "stopped" if r.phase == "stopped" else "no recent heartbeat"
        daemon = f"not running ({why}; last heartbeat {_when(r.updated_at, r.at)})"
    lines = [
        f"state:      {r.state_folder}",
        f"daemon:     {daemon}",
    ]
    if r.alive and r.started_at is not None:
        lines.append(f"started:    {_when(r.started_at, r.at)}")
    lines += [
        f"crops:      {r.crops} clustered, {r.crops_per_s:.1f}/s over the last minute",
    ]
    if r.session is not None:
        state = "open" if r.session_open else "closed"
        lines.append(
            f"session:    {r.session} ({state}; {r.session_crops} crops), "
            f"{r.sessions} session{'s' if r.sessions != 1 else ''} in all"
        )
    lines += [
        f"clusters:   {r.clusters} ({r.singletons} singletons), {r.merges} merges",
        f"skipped:    {r.skipped} files (errors.csv)",
    ]
    if r.alive and r.queue is not None:
        lines.append(f"queue:      {r.queue} files waiting")
    snapshot = "never" if r.last_snapshot_at is None else _when(r.last_snapshot_at, r.at)
    lines.append(f"snapshot:   {snapshot}")
    disk = _disk_line(r)
    if disk:
        lines.append(f"disk:       {disk}")
    if r.disk_low:
        free = {"state": r.state_free_mb, "output": r.output_free_mb}
        low = ", ".join(f"{role} {_mb(free.get(role))} free" for role in r.disk_low)
        lines.append(f"WARNING:    disk low: {low} (below {_mb(r.min_free_mb)})")
    if r.snapshot_error:
        lines.append(f"ERROR:      snapshot: {r.snapshot_error}")
    if r.state_error:
        lines.append(f"ERROR:      state: {r.state_error}")
    return "\n".join(lines)


def status_json(report: StatusReport) -> str:
    """The report as one JSON object (keys as in :class:`StatusReport`)."""
    return json.dumps(dataclasses.asdict(report), indent=2, sort_keys=True)


def main_status(state: Path, as_json: bool, out: TextIO, err: TextIO | None = None) -> int:
    """Run ``crop-clusterd status``: print the report; 0 when found, 1 when no state."""
    try:
        report = read_status(state)
    except StateError as exc:
        print(f"crop-clusterd status: {exc}", file=err if err is not None else sys.stderr)
        return 1
    print(status_json(report) if as_json else format_status(report), file=out)
    return 0
