"""The state database keeps each crop's frame size (schema 4, issue 11)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np

from crop_clusterd.records import CommittedCrop, Crop, Embedded
from crop_clusterd.store import StateStore
from crop_clusterd.storeschema import SCHEMA_VERSION


def crop(seq: int, size: tuple[float, float] | None) -> CommittedCrop:
    name = f"/w/{seq}.png"
    item = Embedded(Crop(Path(name), name, frame_size=size), np.full(4, 0.5, np.float32))
    return CommittedCrop(item, seq, seq)


def test_the_frame_size_is_stored_and_read_back(tmp_path: Path) -> None:
    with StateStore(tmp_path) as store:
        store.commit_batch(0, [crop(0, (4000.0, 3000.0)), crop(1, None)], [], [])
        sizes = store.load_crops().sizes
    assert sizes[0].tolist() == [4000.0, 3000.0]
    assert np.isnan(sizes[1]).all()


def test_a_schema_3_state_opens_with_unknown_frame_sizes(tmp_path: Path) -> None:
    with StateStore(tmp_path) as store:
        store.commit_batch(0, [crop(0, None)], [], [])
    # Take the database back to schema 3: no size columns.
    con = sqlite3.connect(tmp_path / "state.sqlite3")
    con.executescript(
        "ALTER TABLE crops DROP COLUMN fw; ALTER TABLE crops DROP COLUMN fh;"
        "UPDATE meta SET value = '3' WHERE key = 'schema';"
    )
    con.close()
    with StateStore(tmp_path) as store:
        assert store.get_meta("schema") == str(SCHEMA_VERSION) == "4"
        store.commit_batch(1, [crop(1, (1920.0, 1080.0))], [], [])
        sizes = store.load_crops().sizes
    assert np.isnan(sizes[0]).all()  # the old row: NULL, unknown
    assert sizes[1].tolist() == [1920.0, 1080.0]
