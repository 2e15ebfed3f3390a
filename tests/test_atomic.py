"""Tests for the atomic symlink replacement behind OUT/current."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from crop_clusterd import atomic
from crop_clusterd.atomic import remove_stale_temp_files, replace_symlink


def test_replace_symlink_points_at_the_new_target(tmp_path: Path) -> None:
    for name in ("2024-06-01", "2024-06-02"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "clusters.csv").write_text(name)
    link = tmp_path / "current"
    assert replace_symlink(link, "2024-06-01") is True
    assert (link / "clusters.csv").read_text() == "2024-06-01"
    inode = os.lstat(link).st_ino
    # Already pointing there: nothing is written (the link's inode stays).
    assert replace_symlink(link, "2024-06-01") is False
    assert os.lstat(link).st_ino == inode
    assert replace_symlink(link, "2024-06-02") is True
    assert os.readlink(link) == "2024-06-02"  # relative: survives moving OUT
    assert (link / "clusters.csv").read_text() == "2024-06-02"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2024-06-01", "2024-06-02", "current"]


def test_replace_symlink_never_removes_a_real_folder_or_file(tmp_path: Path) -> None:
    folder = tmp_path / "current"
    folder.mkdir()
    (folder / "mine.txt").write_text("a person's file")
    with pytest.raises(FileExistsError, match="not a symbolic link"):
        replace_symlink(folder, "2024-06-01")
    assert (folder / "mine.txt").read_text() == "a person's file"
    file = tmp_path / "latest"
    file.write_text("x")
    with pytest.raises(FileExistsError):
        replace_symlink(file, "2024-06-01")
    assert file.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "latest"]


def test_a_failed_rename_leaves_the_old_link_and_no_temporary_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    link = tmp_path / "current"
    replace_symlink(link, "a")

    def failing_replace(src: str, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space"):
        replace_symlink(link, "b")
    monkeypatch.undo()
    assert os.readlink(link) == "a"
    assert [p.name for p in tmp_path.iterdir()] == ["current"]


def test_a_killed_replace_leaves_a_link_that_is_cleaned_up(tmp_path: Path) -> None:
    link = tmp_path / "current"
    replace_symlink(link, "a")
    # What SIGKILL between symlink() and rename() leaves behind.
    os.symlink("b", tmp_path / (atomic.temp_prefix("current") + "k1ll3d"))
    assert remove_stale_temp_files(link) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["current"]
    assert os.readlink(link) == "a"
