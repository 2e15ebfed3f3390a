"""Tests for the append-only Parquet embedding parts."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt
import pandas as pd
import pytest

from crop_clusterd import atomic
from crop_clusterd.embparts import (
    last_written,
    list_parts,
    part_name,
    read_parts,
    remove_stale_parts,
    write_part,
)

DIM = 6


def rows(
    first: int, n: int, seed: int = 0
) -> tuple[list[str], npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    rng = np.random.default_rng(seed + first)
    locals_ = np.arange(first, first + n, dtype=np.int64)
    names = [f"night/frame{i // 4}/crop_{i}.png" for i in locals_.tolist()]
    return names, locals_, rng.normal(size=(n, DIM)).astype(np.float32)


def test_parts_append_and_read_back_as_one_table(tmp_path: Path) -> None:
    folder = tmp_path / "embeddings"
    assert last_written(folder) == -1
    assert read_parts(folder, dim=DIM).vectors.shape == (0, DIM)
    written = [rows(0, 5), rows(5, 1), rows(6, 7)]
    for names, locals_, vectors in written:
        path = write_part(folder, names, locals_, vectors)
        assert path.name == part_name(int(locals_[0]), int(locals_[-1]))
    assert [(p.first, p.last) for p in list_parts(folder)] == [(0, 4), (5, 5), (6, 12)]
    assert last_written(folder) == 12

    back = read_parts(folder)
    assert back.names == tuple(n for w in written for n in w[0])
    assert back.locals.tolist() == list(range(13))
    # Exactly the float32 values given: no renormalising, no rounding.
    np.testing.assert_array_equal(back.vectors, np.concatenate([w[2] for w in written]))

    # Readers open the folder as one table with the documented columns.
    frame = pd.read_parquet(folder).sort_values("local")
    assert frame["name"].tolist() == list(back.names)
    np.testing.assert_array_equal(np.stack(frame["embedding"].to_list()), back.vectors)


def test_a_part_holds_only_its_rows(tmp_path: Path) -> None:
    """The bytes of a new part depend on its rows, not on the parts before it."""
    folder = tmp_path / "embeddings"
    sizes = []
    for k in range(6):
        names, locals_, vectors = rows(k * 50, 50)
        sizes.append(write_part(folder, names, locals_, vectors).stat().st_size)
    assert max(sizes) - min(sizes) < 200  # name digits only
    assert min(sizes) >= 50 * DIM * 4  # embeddings are stored uncompressed, whole


def test_write_part_refuses_bad_ranges(tmp_path: Path) -> None:
    folder = tmp_path / "embeddings"
    write_part(folder, *rows(0, 4))
    with pytest.raises(ValueError, match="already in"):
        write_part(folder, *rows(3, 2))
    names, locals_, vectors = rows(4, 3)
    with pytest.raises(ValueError, match="contiguous"):
        write_part(folder, names, locals_[[0, 2, 1]], vectors)
    with pytest.raises(ValueError, match="names"):
        write_part(folder, names[:2], locals_, vectors)
    with pytest.raises(ValueError, match="at least one row"):
        write_part(folder, [], locals_[:0], vectors[:0])
    with pytest.raises(ValueError, match="2-D"):
        write_part(folder, names, locals_, vectors.reshape(-1))
    assert [p.first for p in list_parts(folder)] == [0]


def test_overlapping_parts_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "embeddings"
    write_part(folder, *rows(0, 4))
    # Another run's part with an overlapping range, copied in by hand.
    other = tmp_path / "other"
    write_part(other, *rows(0, 6))
    os.replace(other / part_name(0, 5), folder / part_name(2, 7))
    with pytest.raises(ValueError, match="overlap"):
        list_parts(folder)


def test_a_part_that_does_not_match_its_name_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "embeddings"
    write_part(folder, *rows(0, 4))
    os.replace(folder / part_name(0, 3), folder / part_name(0, 2))
    with pytest.raises(ValueError, match="do not match its name"):
        read_parts(folder)


def test_other_files_are_ignored(tmp_path: Path) -> None:
    folder = tmp_path / "embeddings"
    write_part(folder, *rows(0, 2))
    (folder / "notes.txt").write_text("mine")
    (folder / "part-1-2.parquet").write_text("short digits: not a part")
    assert [p.path.name for p in list_parts(folder)] == [part_name(0, 1)]
    assert len(read_parts(folder)) == 2


class Killed(BaseException):
    """Stands for the process being interrupted in the middle of a write."""


def test_an_interrupted_write_leaves_no_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "embeddings"
    write_part(folder, *rows(0, 3))
    real = atomic.atomic_write

    def interrupted(path: Path, write: Callable[[BinaryIO], None]) -> None:
        def partial(handle: BinaryIO) -> None:
            handle.write(b"PAR1 half a part")
            raise Killed

        real(path, partial)

    monkeypatch.setattr(atomic, "atomic_write", interrupted)
    with pytest.raises(Killed):
        write_part(folder, *rows(3, 2))
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir()) == [part_name(0, 2)]
    write_part(folder, *rows(3, 2))
    assert last_written(folder) == 4


def test_a_killed_writers_temp_file_is_ignored_then_removed(tmp_path: Path) -> None:
    folder = tmp_path / "embeddings"
    write_part(folder, *rows(0, 3))
    # What SIGKILL inside atomic_write leaves: the hidden temporary file, half written.
    stale = folder / (atomic.temp_prefix(part_name(3, 4)) + "k1ll3d")
    stale.write_bytes(b"PAR1 half a part")
    assert last_written(folder) == 2
    assert len(read_parts(folder)) == 3
    assert len(pd.read_parquet(folder)) == 3  # readers skip hidden files
    assert remove_stale_parts(folder) == 1
    assert sorted(p.name for p in folder.iterdir()) == [part_name(0, 2)]


def test_non_utf8_names_are_written(tmp_path: Path) -> None:
    folder = tmp_path / "embeddings"
    name = os.fsdecode(b"crop_\xff.png")  # a Linux name that is not UTF-8
    _, locals_, vectors = rows(0, 2)
    write_part(folder, [name, "ok.png"], locals_, vectors)
    back = read_parts(folder)
    assert back.names[1] == "ok.png"
    assert back.names[0].startswith("crop_") and back.names[0].endswith(".png")
