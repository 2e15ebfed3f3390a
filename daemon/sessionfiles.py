"""A session's output folder: where it is, what it lists, and ``export``.

With ``[session] split = "none"`` the one session (``"all"``) writes straight
into the output folder, as before sessions; every other session writes into
``OUT/<session id>/``, and ``OUT/current`` links to the newest one. The
functions here read one session from the state database and turn it into
what its files list; :mod:`crop_clusterd.snapshot` writes them while the
daemon runs, and :func:`export_session` writes a session's ``embeddings.pkl``
on demand (``crop-clusterd export``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from .defaults import ALL_SESSION
from .embfile import write_embeddings_pickle
from .store import (
    StateError,
    StateStore,
    StoredCrops,
    StoredMerge,
    StoredSession,
    StoredSkip,
    current_clusters,
)

__all__ = [
    "CURRENT_LINK",
    "ExportError",
    "SessionRows",
    "check_locals",
    "export_session",
    "live_current",
    "read_session",
    "session_folder",
    "write_session_pickle",
]

CURRENT_LINK: Final = "current"
"""The link in the output folder to the newest session's folder (not with split "none")."""


def session_folder(out: Path, session: str) -> Path:
    """The output folder of ``session``: ``out`` itself for ``"all"``, else ``out/<id>``."""
    return out if session == ALL_SESSION else out / session


@dataclass(frozen=True, slots=True, eq=False)
class SessionRows:
    """Everything stored about one session, read in one transaction.

    ``crops`` holds every row in local order (retired ones too; without
    vectors, an n×0 array, when read with ``vectors=False``); ``retired`` the
    local numbers of retired crops.
    """

    session: StoredSession
    crops: StoredCrops
    merges: tuple[StoredMerge, ...]
    skipped: tuple[StoredSkip, ...]
    retired: frozenset[int]


def read_session(store: StateStore, session: StoredSession, *, vectors: bool) -> SessionRows:
    """Read one session whole; raises :class:`StateError` when it cannot be read.

    ``vectors=False`` reads no embeddings (a session whose vectors were dropped
    can still be listed). Raises when the local numbers are not 0..n-1.
    """
    try:
        with store.read_transaction():
            crops = store.load_crops(session=session.id, vectors=vectors)
            merges = tuple(store.load_merges(session=session.id))
            skipped = tuple(store.load_skipped(session=session.id))
            retired = store.retired_locals(session.id)
    except sqlite3.Error as exc:
        raise StateError(f"cannot read state database {store.path}: {exc}") from exc
    check_locals(store, session.id, crops.locals, 0)
    return SessionRows(session, crops, merges, skipped, retired)


def check_locals(
    store: StateStore, session: str, locals_: npt.NDArray[np.int64], first: int
) -> None:
    """Raise :class:`StateError` unless ``locals_`` is ``first, first+1, ...``."""
    expected = np.arange(first, first + len(locals_), dtype=np.int64)
    if not np.array_equal(locals_, expected):
        raise StateError(
            f"crop numbers of session {session} in {store.path} are not contiguous "
            f"(expected {first}.., got {locals_[:3].tolist()}..)"
        )


def live_current(
    stored: npt.NDArray[np.int64], merges: Sequence[StoredMerge], retired: frozenset[int]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The live local numbers of a session and their current cluster ids.

    ``stored[local]`` is each crop's cluster id at commit. Retired crops
    (rewritten since) keep their number but leave the outputs. Raises
    :class:`StateError` when a cluster id is not one of the session's crops.
    """
    try:
        current = current_clusters(stored, (m.merge for m in merges))
    except IndexError:
        raise StateError(
            "the state database is inconsistent: a cluster id is not a crop's local number"
        ) from None
    live = np.arange(len(stored), dtype=np.int64)
    if retired:
        gone = np.fromiter(retired, dtype=np.int64, count=len(retired))
        live = np.setdiff1d(live, gone, assume_unique=True)
    return live, current[live]


class ExportError(Exception):
    """A session cannot be exported (unknown, or its vectors were dropped)."""


def export_session(state_folder: Path, session: str, path: Path) -> int:
    """Write ``session``'s ``embeddings.pkl`` (the old tool's format) to ``path``.

    The live crops in local order, with their current paths, exactly as the
    daemon writes the file when the session closes. Opens the state read-only
    (safe while the daemon runs). Returns the number of crops written. Raises
    :class:`ExportError` for an unknown session or one whose vectors were
    dropped, :class:`StateError` when the state cannot be read, ``OSError``
    when ``path`` cannot be written.
    """
    with StateStore(Path(state_folder), readonly=True) as store:
        sessions = {s.id: s for s in store.sessions()}
        found = sessions.get(session)
        if found is None:
            known = ", ".join(sorted(sessions)[-10:]) or "none yet"
            raise ExportError(
                f"no session {session!r} in the state at {state_folder} (sessions: {known})"
            )
        if found.vectors_dropped:
            raise ExportError(
                f"the embeddings of session {session} were dropped from the state "
                f"(state.keep_sessions); its output folder keeps them in embeddings/ parts"
            )
        rows = read_session(store, found, vectors=True)
    live, _ = live_current(rows.crops.clusters, rows.merges, rows.retired)
    write_session_pickle(path, rows.crops, live)
    return len(live)


def write_session_pickle(path: Path, crops: StoredCrops, live: npt.NDArray[np.int64]) -> None:
    """``embeddings.pkl`` of a session's live crops (rows ``live`` of ``crops``)."""
    names = [crops.paths[i] for i in live.tolist()]
    vectors = crops.vectors if len(live) == len(crops) else crops.vectors[live]
    write_embeddings_pickle(path, names, vectors)
