"""Tests for resolving -i specs into image files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from crop_clusterd import inputs
from crop_clusterd.inputs import InputError, resolve_inputs


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A folder with images, junk, hidden/temp names and a nested sub-folder."""
    root = tmp_path / "crops"
    touch(root / "a.png")
    touch(root / "b.JPG")
    touch(root / "c.Jpeg")
    touch(root / "d.tif")
    touch(root / "notes.txt")
    touch(root / "readme.md")
    touch(root / ".hidden.png")
    touch(root / "e.png.tmp")
    touch(root / "f.png.part")
    touch(root / "g.png~")
    (root / "folder.png").mkdir()
    touch(root / "folder.png" / "inside.png")
    touch(root / "sub" / "deep.webp")
    touch(root / "sub" / "deeper" / "deepest.bmp")
    touch(root / ".cache" / "cached.png")
    return root


def names(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def test_directory_lists_direct_image_children_only(tree: Path) -> None:
    found = resolve_inputs([str(tree)])
    assert names(found) == ["a.png", "b.JPG", "c.Jpeg", "d.tif"]
    assert all(p.parent == tree for p in found)


def test_directory_recursive_walks_tree_but_skips_hidden(tree: Path) -> None:
    found = resolve_inputs([str(tree)], recursive=True)
    assert sorted(names(found)) == sorted(
        ["a.png", "b.JPG", "c.Jpeg", "d.tif", "inside.png", "deep.webp", "deepest.bmp"]
    )


def test_recursive_does_not_follow_symlinked_directories(tmp_path: Path) -> None:
    touch(tmp_path / "root" / "a.png")
    touch(tmp_path / "elsewhere" / "b.png")
    os.symlink(tmp_path / "elsewhere", tmp_path / "root" / "link")
    os.symlink(tmp_path / "root", tmp_path / "root" / "loop")
    found = resolve_inputs([str(tmp_path / "root")], recursive=True)
    assert names(found) == ["a.png"]


def test_symlinked_file_is_returned_unresolved(tmp_path: Path) -> None:
    real = touch(tmp_path / "real" / "a.png")
    link = tmp_path / "link.png"
    os.symlink(real, link)
    assert resolve_inputs([str(link)]) == [link]


def test_glob_with_double_star_filters_like_a_scan(tree: Path) -> None:
    found = resolve_inputs([str(tree / "**" / "*")])
    assert sorted(names(found)) == sorted(
        ["a.png", "b.JPG", "c.Jpeg", "d.tif", "inside.png", "deep.webp", "deepest.bmp"]
    )


def test_glob_skips_directory_named_like_an_image_and_temp_files(tree: Path) -> None:
    found = resolve_inputs([str(tree / "*.png*")])
    assert names(found) == ["a.png"]


def test_glob_matching_nothing_is_not_an_error_when_others_match(tree: Path) -> None:
    found = resolve_inputs([str(tree / "*.nothing"), str(tree / "a.png")])
    assert names(found) == ["a.png"]


def test_literal_path_with_glob_characters_is_taken_literally(tmp_path: Path) -> None:
    odd = touch(tmp_path / "img[1].png")
    touch(tmp_path / "img1.png")
    assert resolve_inputs([str(odd)]) == [odd]


def test_explicit_image_keeps_relative_form(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    touch(tmp_path / "x" / "a.PNG")
    monkeypatch.chdir(tmp_path)
    assert resolve_inputs(["x/a.PNG"]) == [Path("x/a.PNG")]


def test_explicit_hidden_file_is_accepted(tmp_path: Path) -> None:
    hidden = touch(tmp_path / ".a.png")
    assert resolve_inputs([str(hidden)]) == [hidden]


def test_missing_path_is_an_error_naming_it(tmp_path: Path) -> None:
    touch(tmp_path / "a.png")
    missing = tmp_path / "nope.png"
    with pytest.raises(InputError, match="not found") as info:
        resolve_inputs([str(tmp_path / "a.png"), str(missing)])
    assert str(missing) in str(info.value)


def test_explicit_non_image_file_is_an_error(tmp_path: Path) -> None:
    doc = touch(tmp_path / "notes.md")
    with pytest.raises(InputError, match="not a supported image") as info:
        resolve_inputs([str(doc)])
    assert str(doc) in str(info.value)


def test_nothing_found_lists_the_specs(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    pattern = str(tmp_path / "*.jpg")
    with pytest.raises(InputError, match="no image files") as info:
        resolve_inputs([str(tmp_path / "empty"), pattern])
    assert str(tmp_path / "empty") in str(info.value)
    assert pattern in str(info.value)


def test_duplicates_are_returned_once(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tree.parent)
    specs = [str(tree), str(tree / "a.png"), "crops/a.png", str(tree / "*.png")]
    found = resolve_inputs([*specs, "crops/./a.png", "crops/sub/../a.png"])
    assert names(found).count("a.png") == 1
    assert len(found) == 4


def test_result_is_sorted_by_string(tmp_path: Path) -> None:
    for name in ["b.png", "a.png", "C.png", "a10.png", "a2.png"]:
        touch(tmp_path / name)
    found = resolve_inputs([str(tmp_path / "b.png"), str(tmp_path)])
    assert [str(p) for p in found] == sorted(str(p) for p in found)
    assert len(found) == 5


def test_txt_list_with_relative_lines_comments_and_nesting(tmp_path: Path) -> None:
    touch(tmp_path / "data" / "one.png")
    touch(tmp_path / "data" / "two.jpg")
    touch(tmp_path / "more" / "three.png")
    touch(tmp_path / "more" / "skip.md")
    absolute = touch(tmp_path / "abs" / "four.png")
    touch(tmp_path / "globbed" / "five.png")
    touch(tmp_path / "globbed" / "six.png")
    (tmp_path / "lists" / "inner").mkdir(parents=True)
    # The inner list's relative lines are relative to its own folder, not the outer's.
    (tmp_path / "lists" / "inner" / "inner.txt").write_text("../../more\n../../globbed/f*.png\n")
    (tmp_path / "lists" / "outer.txt").write_text(
        "# a comment\n\n   ../data/one.png  \n../data/two.jpg\n"
        f"{absolute}\ninner/inner.txt\n  # indented comment\n"
    )
    found = resolve_inputs([str(tmp_path / "lists" / "outer.txt")])
    assert sorted(names(found)) == ["five.png", "four.png", "one.png", "three.png", "two.jpg"]
    assert absolute in found


def test_txt_list_missing_entry_names_the_list(tmp_path: Path) -> None:
    (tmp_path / "list.txt").write_text("gone.png\n")
    with pytest.raises(InputError, match=r"gone\.png") as info:
        resolve_inputs([str(tmp_path / "list.txt")])
    assert f"listed in {tmp_path}" in str(info.value)


def test_txt_list_cycle_is_detected(tmp_path: Path) -> None:
    touch(tmp_path / "a.png")
    (tmp_path / "one.txt").write_text("a.png\ntwo.txt\n")
    (tmp_path / "two.txt").write_text("one.txt\n")
    with pytest.raises(InputError, match="cycle"):
        resolve_inputs([str(tmp_path / "one.txt")])


def test_txt_list_self_cycle_is_detected(tmp_path: Path) -> None:
    (tmp_path / "self.txt").write_text("./self.txt\n")
    with pytest.raises(InputError, match="cycle"):
        resolve_inputs([str(tmp_path / "self.txt")])


def test_same_list_twice_is_not_a_cycle(tmp_path: Path) -> None:
    touch(tmp_path / "a.png")
    (tmp_path / "leaf.txt").write_text("a.png\n")
    (tmp_path / "top.txt").write_text("leaf.txt\nleaf.txt\n")
    assert names(resolve_inputs([str(tmp_path / "top.txt")])) == ["a.png"]


def test_dng_without_rawpy_is_an_error_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = touch(tmp_path / "frame.DNG")
    monkeypatch.setattr(inputs, "_rawpy_available", lambda: False)
    with pytest.raises(InputError) as info:
        resolve_inputs([str(tmp_path)])
    message = str(info.value)
    assert str(raw) in message
    assert "pip install 'crop-clusterd[dng]'" in message


def test_dng_with_rawpy_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = touch(tmp_path / "frame.dng")
    monkeypatch.setattr(inputs, "_rawpy_available", lambda: True)
    assert resolve_inputs([str(raw)]) == [raw]


def test_mixed_spec_kinds_together(tree: Path, tmp_path: Path) -> None:
    extra = touch(tmp_path / "extra" / "z.png")
    (tmp_path / "list.txt").write_text(f"{extra}\n")
    found = resolve_inputs([str(tree), str(tree / "sub" / "*.webp"), str(tmp_path / "list.txt")])
    assert sorted(names(found)) == ["a.png", "b.JPG", "c.Jpeg", "d.tif", "deep.webp", "z.png"]
