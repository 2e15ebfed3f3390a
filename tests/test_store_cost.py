"""What the state database costs must not grow with the season (issue 10).

Cost here is SQLite's own count of virtual-machine steps (a progress handler),
not time: deterministic on a shared machine, and a full scan of the crops table
shows up as steps in proportion to its rows.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from crop_clusterd.identity import Fingerprint
from crop_clusterd.records import CommittedCrop, Crop, Embedded, Merge
from crop_clusterd.store import StateStore
from crop_clusterd.storedfiles import StoredFiles

BATCH = 100


def committed(session: str, local: int, seq: int) -> CommittedCrop:
    """Crop ``local`` of ``session`` as a commit holds it (content: session and number)."""
    name = f"/crops/{session}/c{local}.png"
    crop = Crop(Path(name), name, size=100 + local, mtime_ns=local, inode=seq + 1)
    crop = dataclasses.replace(crop, content=f"{session}-{local:032d}")
    return CommittedCrop(Embedded(crop, np.full(4, 0.5, dtype=np.float32)), seq, local, local)


def fill(store: StateStore, sessions: list[str], per_session: int, *, start_batch: int = 0) -> None:
    """Commit ``per_session`` crops into each session, a merge per batch of ``BATCH``."""
    seq = store.next_seq()
    batch = start_batch
    for session in sessions:
        for first in range(0, per_session, BATCH):
            crops = [
                committed(session, local, seq + local - first)
                for local in range(first, first + BATCH)
            ]
            seq += BATCH
            store.commit_batch(batch, crops, [Merge(first + 1, first)], [], session=session)
            batch += 1


@contextmanager
def steps(db: sqlite3.Connection) -> Iterator[Callable[[], int]]:
    """Count the connection's VM steps, in hundreds, while the block runs."""
    count = [0]

    def tick() -> int:
        count[0] += 1
        return 0

    db.set_progress_handler(tick, 100)
    try:
        yield lambda: count[0]
    finally:
        db.set_progress_handler(None, 0)


def test_counts_read_no_crop_rows_and_stay_right(tmp_path: Path) -> None:
    small, big = tmp_path / "small", tmp_path / "big"
    with StateStore(small) as s, StateStore(big) as b:
        fill(s, ["2026-06-01"], 200)
        fill(b, [f"2026-06-{d:02d}" for d in range(1, 11)], 2_000)
        # A crop rewritten in place: its old row is retired, a new one committed.
        rewrite = committed("2026-06-01", 2_000, 20_000)
        rewrite = dataclasses.replace(rewrite, item=committed("2026-06-01", 0, 0).item)
        b.commit_batch(200, [rewrite], [], [], session="2026-06-01")
        with steps(s._db) as small_steps:
            small_counts = s.counts()
        with steps(b._db) as big_steps:
            big_counts = b.counts()
    assert (small_counts.crops, small_counts.merges, small_counts.batches) == (200, 2, 2)
    assert (big_counts.crops, big_counts.merges, big_counts.batches) == (20_000, 200, 201)
    # 100x the crops: the old count(*) over every row took ~100x the steps.
    assert big_steps() <= small_steps() + 5, (small_steps(), big_steps())


def test_a_content_lookup_finds_a_crop_of_any_session_and_costs_a_seek_per_session(
    tmp_path: Path,
) -> None:
    with StateStore(tmp_path) as store:
        fill(store, [f"2026-06-{d:02d}" for d in range(1, 6)], 1_000)
    files = StoredFiles(tmp_path)
    try:
        probe = Fingerprint(1, 1, 0)
        for day in (1, 3, 5):
            found = files.files_like(probe, f"2026-06-{day:02d}-{7:032d}")
            assert list(found) == [f"/crops/2026-06-{day:02d}/c7.png"]
        assert files.files_like(probe, "nowhere") == {}
        with steps(files._db) as few:
            files.files_like(probe, "nowhere")
        with StateStore(tmp_path) as store:
            fill(store, [f"2026-07-{d:02d}" for d in range(1, 6)], 1_000, start_batch=100)
        with steps(files._db) as more:
            files.files_like(probe, "nowhere")
    finally:
        files.close()
    # Twice the sessions, twice the crops: a few steps per session, not per crop.
    assert more() <= 2 * few() + 2, (few(), more())


def test_an_upgraded_state_drops_the_season_wide_content_index(tmp_path: Path) -> None:
    with StateStore(tmp_path) as store:
        fill(store, ["all"], 100)
        store._db.execute("CREATE INDEX crops_live_content ON crops(content) WHERE retired = 0")
    with StateStore(tmp_path) as store:
        names = {r[0] for r in store._db.execute("SELECT name FROM sqlite_master")}
    assert "crops_live_content" not in names
    assert {"crops_session_content", "crops_retired"} <= names
