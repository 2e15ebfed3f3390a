"""Tests for flat-bug crop names, frame times, metadata boxes and problem tallies."""

from __future__ import annotations

import itertools
import json
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from crop_clusterd import flatbug
from crop_clusterd.flatbug import (
    BOX_MISSING,
    METADATA_MALFORMED,
    METADATA_MISSING,
    NOT_FLATBUG_NAME,
    TIME_UNPARSED,
    CropName,
    MetadataIndex,
    ProblemTally,
    TimeFormat,
    describe_crop,
    parse_crop_name,
    parse_metadata_name,
)
from crop_clusterd.records import FrameId, TrapId

SEED = Path(__file__).resolve().parents[1].parent / "shared" / "seed-example"
FRAME = "20230908001617-00-06"


def fid(place: Path, name: str, identifier: str = "abc") -> FrameId:
    """Frame ``name`` of the trap folder ``place`` (as ``write_meta`` lays it out)."""
    return FrameId(name, TrapId(str(place), identifier))


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()


# --- names -----------------------------------------------------------------------------


def test_crop_name_with_identifier() -> None:
    parsed = parse_crop_name(f"crop_{FRAME}_CROPNUMBER_7_UUID_ChangeThisTEMPORARY.png")
    assert parsed == CropName(frame=FRAME, index=7, identifier="ChangeThisTEMPORARY")


def test_crop_name_without_identifier() -> None:
    assert parse_crop_name(f"crop_{FRAME}_CROPNUMBER_12_.jpg") == CropName(FRAME, 12, None)


def test_crop_name_from_a_path_uses_the_basename() -> None:
    parsed = parse_crop_name(f"/data/crop_x/{FRAME}/crops/crop_{FRAME}_CROPNUMBER_3_UUID_a.png")
    assert parsed == CropName(FRAME, 3, "a")


def test_crop_name_with_underscores_in_frame_and_identifier() -> None:
    parsed = parse_crop_name("crop_cam_2_2023-09-08_00-16-17_CROPNUMBER_0_UUID_trap_A.PNG")
    assert parsed == CropName("cam_2_2023-09-08_00-16-17", 0, "trap_A")


def test_crop_name_uuid_none_means_no_identifier() -> None:
    assert parse_crop_name("crop_f_CROPNUMBER_1_UUID_None.png") == CropName("f", 1, None)


@pytest.mark.parametrize(
    "name",
    [
        "IMG_0001.png",
        f"{FRAME}.jpg",
        f"crop_{FRAME}_CROPNUMBER_x_UUID_a.png",  # index not a number
        f"crop_{FRAME}_CROPNUMBER_1_UUID_a",  # no extension
        "crop__CROPNUMBER_1_.png",  # empty frame
        f"crop_{FRAME}_CROPNUMBER_1.png",  # missing separator after the index
        f"crop_{FRAME}_CROPNUMBER_1_junk.png",  # neither UUID_ nor nothing
        f"metadata_{FRAME}_UUID_a.json",
        "",
    ],
)
def test_non_flatbug_crop_names_give_none(name: str) -> None:
    assert parse_crop_name(name) is None


def test_metadata_name() -> None:
    assert parse_metadata_name(f"metadata_{FRAME}_UUID_ChangeThisTEMPORARY.json") == FRAME
    assert parse_metadata_name(f"/x/y/metadata_{FRAME}_UUID_None.json") == FRAME
    assert parse_metadata_name(f"metadata_{FRAME}_UUID_a.md") is None
    assert parse_metadata_name(f"crop_{FRAME}_CROPNUMBER_0_UUID_a.json") is None
    assert parse_metadata_name(f"metadata_{FRAME}.json") is None


# --- time ------------------------------------------------------------------------------


def test_strftime_style_found_inside_frame_name() -> None:
    fmt = TimeFormat.compile("%Y%m%d%H%M%S")
    assert fmt.parse(FRAME) == utc(2023, 9, 8, 0, 16, 17)
    assert fmt.parse(f"cam3_{FRAME}_x") == utc(2023, 9, 8, 0, 16, 17)


def test_doubled_style_means_the_same_as_strftime_style() -> None:
    doubled = TimeFormat.compile("%YYYY-%mm-%dd_%HH-%MM-%SS")
    plain = TimeFormat.compile("%Y-%m-%d_%H-%M-%S")
    assert doubled.strftime == plain.strftime == "%Y-%m-%d_%H-%M-%S"
    frame = "trap1_2023-09-08_23-59-58_b"
    assert doubled.parse(frame) == plain.parse(frame) == utc(2023, 9, 8, 23, 59, 58)


def test_times_are_utc_seconds_without_dst_jumps() -> None:
    fmt = TimeFormat.compile("%Y%m%d%H%M%S")
    # 2023-03-26 02:30 does not exist in central European summer time; as UTC it is fine.
    before = fmt.parse("20230326015959")
    after = fmt.parse("20230326030000")
    assert before is not None and after is not None
    assert after - before == 3601.0


def test_fraction_day_of_year_and_two_digit_year() -> None:
    assert TimeFormat.compile("%Y%m%d%H%M%S.%f").parse("a20230908001617.25z") == (
        utc(2023, 9, 8, 0, 16, 17) + 0.25
    )
    assert TimeFormat.compile("%Y-%j").parse("x2023-251") == utc(2023, 9, 8)
    assert TimeFormat.compile("%y%m%d").parse("230908") == utc(2023, 9, 8)


def test_literal_text_and_percent_in_format() -> None:
    fmt = TimeFormat.compile("T%H.%M%%")
    assert fmt.parse("frame T10.05% end") == utc(1900, 1, 1, 10, 5)
    assert fmt.parse("frame T10x05% end") is None  # '.' is literal, not a regex wildcard


def test_digit_fields_do_not_bite_into_longer_digit_runs() -> None:
    # %H%M%S must not read the date part of a packed timestamp as a time of day.
    assert TimeFormat.compile("%H%M%S").parse("20230908001617") is None
    assert TimeFormat.compile("%H%M%S").parse("20230908_001617") == utc(1900, 1, 1, 0, 16, 17)


def test_invalid_first_match_falls_through_to_a_later_valid_one() -> None:
    fmt = TimeFormat.compile("%Y-%m-%d")
    assert fmt.parse("2023-13-01 then 2023-09-08") == utc(2023, 9, 8)


@pytest.mark.parametrize("text", ["", "IMG_0001", "2023090800161", "20231308001617", "abc"])
def test_unparseable_text_gives_none(text: str) -> None:
    assert TimeFormat.compile("%Y%m%d%H%M%S").parse(text) is None


@pytest.mark.parametrize(
    ("fmt", "message"),
    [
        ("%Y%m%d%Q", "unsupported directive %Q"),
        ("%Y%", "lone '%'"),
        ("frame-", "no date/time field"),
        ("", "no date/time field"),
    ],
)
def test_invalid_format_raises_a_clear_value_error(fmt: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TimeFormat.compile(fmt)


# --- metadata --------------------------------------------------------------------------


def write_meta(folder: Path, frame: str, boxes: object, identifier: str = "abc") -> Path:
    sub = folder / frame
    sub.mkdir(parents=True, exist_ok=True)
    path = sub / f"metadata_{frame}_UUID_{identifier}.json"
    path.write_text(json.dumps({"boxes": boxes, "confs": [0.9], "identifier": identifier}))
    return path


def test_metadata_index_finds_per_frame_subfolders(tmp_path: Path) -> None:
    write_meta(tmp_path, "f1", [[0, 0, 10, 20], [100, 50, 110, 70.5]])
    write_meta(tmp_path, "f2", [[2, 2, 4, 4]], identifier="None")
    (tmp_path / "f2" / "crops").mkdir()
    (tmp_path / "f2" / "crops" / "notes.json").write_text("{}")
    index = MetadataIndex.scan(tmp_path)
    assert len(index) == 2
    assert index.has(fid(tmp_path, "f1")) and index.has(fid(tmp_path, "f2", ""))
    assert not index.has(fid(tmp_path, "f3"))
    assert index.center(fid(tmp_path, "f1", "abc"), 0) == ((5.0, 10.0), None)
    assert index.center(fid(tmp_path, "f1", "abc"), 1) == ((105.0, 60.25), None)
    assert index.center(fid(tmp_path, "f2", ""), 0) == ((3.0, 3.0), None)


def test_metadata_problems(tmp_path: Path) -> None:
    write_meta(tmp_path, "few", [[0, 0, 2, 2]])
    write_meta(tmp_path, "noboxes", None)
    write_meta(tmp_path, "badbox", [[0, 0, 2], [0, 0, 2, 2], [0, "a", 1, 1], [0, True, 1, 1]])
    write_meta(tmp_path, "nan", [[0, 0, float("nan"), 1]])
    broken = tmp_path / "broken" / "metadata_broken_UUID_x.json"
    broken.parent.mkdir()
    broken.write_text('{"boxes": [[0, 0, 1')  # half-written
    (tmp_path / "metadata_list_UUID_x.json").write_text("[1, 2]")
    index = MetadataIndex.scan(tmp_path)
    assert index.center(fid(tmp_path, "absent", "abc"), 0) == (None, METADATA_MISSING)
    assert index.center(fid(tmp_path, "few", "abc"), 1) == (None, BOX_MISSING)
    assert index.center(fid(tmp_path, "noboxes", "abc"), 0) == (None, METADATA_MALFORMED)
    assert index.center(fid(tmp_path, "broken", "x"), 0) == (None, METADATA_MALFORMED)
    assert index.center(fid(tmp_path, "list", "x"), 0) == (None, METADATA_MALFORMED)
    assert index.center(fid(tmp_path, "nan", "abc"), 0) == (None, METADATA_MALFORMED)
    assert index.center(fid(tmp_path, "badbox", "abc"), 0) == (None, METADATA_MALFORMED)
    assert index.center(fid(tmp_path, "badbox", "abc"), 1) == ((1.0, 1.0), None)
    assert index.center(fid(tmp_path, "badbox", "abc"), 2) == (None, METADATA_MALFORMED)
    assert index.center(fid(tmp_path, "badbox", "abc"), 3) == (None, METADATA_MALFORMED)
    assert index.center(fid(tmp_path, "badbox", "abc"), 4) == (None, BOX_MISSING)


def test_metadata_file_deleted_after_scan_counts_as_missing(tmp_path: Path) -> None:
    path = write_meta(tmp_path, "f", [[0, 0, 2, 2]])
    index = MetadataIndex.scan(tmp_path)
    path.unlink()
    assert index.center(fid(tmp_path, "f", "abc"), 0) == (None, METADATA_MISSING)


def test_late_json_is_added_and_rewritten_json_reread(tmp_path: Path) -> None:
    index = MetadataIndex.scan(tmp_path)
    assert index.center(fid(tmp_path, "f", "a"), 0) == (None, METADATA_MISSING)
    path = tmp_path / "f" / "metadata_f_UUID_a.json"
    path.parent.mkdir()
    path.write_text('{"boxes": [[0, 0')  # the watcher saw it half-written
    assert index.add(path) == fid(tmp_path, "f", "a")
    assert index.center(fid(tmp_path, "f", "a"), 0) == (None, METADATA_MALFORMED)
    path.write_text(json.dumps({"boxes": [[0, 0, 4, 4]]}))
    # cached until told
    assert index.center(fid(tmp_path, "f", "a"), 0) == (None, METADATA_MALFORMED)
    index.invalidate(fid(tmp_path, "f", "a"))
    assert index.center(fid(tmp_path, "f", "a"), 0) == ((2.0, 2.0), None)
    path.write_text(json.dumps({"boxes": [[0, 0, 8, 8]]}))
    index.add(path)  # re-adding the same file also drops the cache
    assert index.center(fid(tmp_path, "f", "a"), 0) == ((4.0, 4.0), None)


def test_metadata_is_loaded_lazily_and_cached(tmp_path: Path) -> None:
    path = write_meta(tmp_path, "f", [[0, 0, 2, 2]])
    index = MetadataIndex.scan(tmp_path)
    path.write_text(json.dumps({"boxes": [[0, 0, 6, 6]]}))  # before first use: seen
    assert index.center(fid(tmp_path, "f", "abc"), 0) == ((3.0, 3.0), None)
    path.unlink()  # after first use: served from the cache
    assert index.center(fid(tmp_path, "f", "abc"), 0) == ((3.0, 3.0), None)


def test_add_ignores_non_metadata_names(tmp_path: Path) -> None:
    index = MetadataIndex()
    assert index.add(tmp_path / "crop_f_CROPNUMBER_0_.png") is None
    assert len(index) == 0


def test_scan_of_missing_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="metadata folder"):
        MetadataIndex.scan(tmp_path / "nope")


def test_concurrent_lookups_and_adds_do_not_break(tmp_path: Path) -> None:
    paths = [write_meta(tmp_path, f"f{i}", [[0, 0, 2 * i, 2 * i]]) for i in range(20)]
    index = MetadataIndex()
    errors: list[BaseException] = []

    def adder() -> None:
        for path in paths:
            index.add(path)

    def reader() -> None:
        try:
            for _ in range(5):
                for i in range(20):
                    center, problem = index.center(fid(tmp_path, f"f{i}"), 0)
                    assert problem in (None, METADATA_MISSING)
                    assert center in (None, (float(i), float(i)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=adder), *(threading.Thread(target=reader) for _ in range(3))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert index.center(fid(tmp_path, "f19"), 0) == ((19.0, 19.0), None)


# --- describe_crop and tally -------------------------------------------------------------


def test_describe_crop_with_everything(tmp_path: Path) -> None:
    write_meta(tmp_path / "meta", FRAME, [[0, 0, 10, 10], [20, 40, 30, 60]])
    path = tmp_path / f"crop_{FRAME}_CROPNUMBER_1_UUID_abc.png"
    crop, problems = describe_crop(
        path,
        "sub/" + path.name,
        time_format=TimeFormat.compile("%Y%m%d%H%M%S"),
        metadata=MetadataIndex.scan(tmp_path / "meta", loose=True),
    )
    assert problems == ()
    assert crop.path == path and crop.name == "sub/" + path.name
    assert (crop.frame, crop.crop_index) == (fid(tmp_path, FRAME), 1)
    assert crop.time == utc(2023, 9, 8, 0, 16, 17)
    assert crop.center == (25.0, 50.0)


def test_describe_crop_reports_problems_only_for_what_was_asked(tmp_path: Path) -> None:
    path = tmp_path / "crop_nodate_CROPNUMBER_0_.png"
    crop, problems = describe_crop(path, path.name, time_format=None, metadata=None)
    assert problems == ()
    assert (crop.frame, crop.crop_index, crop.time, crop.center) == (
        fid(tmp_path, "nodate", ""),
        0,
        None,
        None,
    )
    crop, problems = describe_crop(
        path, path.name, time_format=TimeFormat.compile("%Y%m%d"), metadata=MetadataIndex()
    )
    assert problems == (TIME_UNPARSED, METADATA_MISSING)
    assert crop.time is None and crop.center is None


def test_describe_non_flatbug_crop(tmp_path: Path) -> None:
    path = tmp_path / "IMG_20230908001617.png"
    crop, problems = describe_crop(
        path, path.name, time_format=TimeFormat.compile("%Y%m%d%H%M%S"), metadata=MetadataIndex()
    )
    assert problems == (NOT_FLATBUG_NAME,)
    assert crop.frame is None and crop.crop_index is None and crop.center is None


def test_describe_seed_crops_frames_two_seconds_apart() -> None:
    crops_dir = SEED / "crops"
    if not crops_dir.is_dir():
        pytest.skip(f"seed example not available at {crops_dir}")
    fmt = TimeFormat.compile("%Y%m%d%H%M%S")
    times: dict[FrameId, float] = {}
    for path in sorted(crops_dir.glob("*.png")):
        crop, problems = describe_crop(path, path.name, time_format=fmt, metadata=None)
        assert problems == ()
        assert crop.frame is not None and crop.time is not None
        assert times.setdefault(crop.frame, crop.time) == crop.time
    assert len(times) == 5
    ordered = sorted(times.values())
    assert [b - a for a, b in itertools.pairwise(ordered)] == [2.0] * 4


def test_problem_tally_counts_examples_and_summary() -> None:
    tally = ProblemTally()
    for i in range(5):
        tally.add(f"crop_{i}.png", (METADATA_MISSING, TIME_UNPARSED) if i < 4 else ())
    tally.add("odd.png", (NOT_FLATBUG_NAME,))
    tally.add("x.png", ("custom_problem",))
    assert tally.counts() == {
        METADATA_MISSING: 4,
        TIME_UNPARSED: 4,
        NOT_FLATBUG_NAME: 1,
        "custom_problem": 1,
    }
    assert tally.examples(METADATA_MISSING) == ["crop_0.png", "crop_1.png", "crop_2.png"]
    assert tally.examples(BOX_MISSING) == []
    lines = tally.summary_lines()
    assert lines[0].startswith("1 crop: name is not flat-bug's")
    assert "(e.g. odd.png)" in lines[0]
    assert lines[2] == (
        "4 crops: metadata missing for their frame (e.g. crop_0.png, crop_1.png, crop_2.png, ...)"
    )
    assert lines[-1] == "1 crop: custom_problem (e.g. x.png)"
    assert len(lines) == 4


def test_problem_tally_copies_are_independent() -> None:
    tally = ProblemTally()
    tally.add("a.png", (BOX_MISSING,))
    tally.counts()[BOX_MISSING] = 99
    tally.examples(BOX_MISSING).append("b.png")
    assert tally.counts() == {BOX_MISSING: 1}
    assert tally.examples(BOX_MISSING) == ["a.png"]
    assert ProblemTally().summary_lines() == []


def test_parsed_boxes_stay_cached_for_recent_frames_only(tmp_path: Path) -> None:
    """A season's frames do not all stay parsed in memory (issue 10); an evicted
    frame is read again from its JSON and gives the same centre."""
    n = flatbug.METADATA_CACHE_FRAMES + 50
    for i in range(n):
        write_meta(tmp_path, f"f{i:05d}", [[i, 0, i + 2, 4]])
    index = MetadataIndex.scan(tmp_path)
    for i in range(n):
        assert index.center(fid(tmp_path, f"f{i:05d}", "abc"), 0) == ((i + 1.0, 2.0), None)
    assert len(index._cache) == flatbug.METADATA_CACHE_FRAMES
    assert index.center(fid(tmp_path, "f00000", "abc"), 0) == ((1.0, 2.0), None)


def test_the_daemons_index_holds_recent_frames_and_finds_older_ones_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's frame -> JSON index is bounded (issue 10); a frame it dropped, or
    one it never saw (a restart's first scan skips unchanged folders), is found
    where flat-bug writes it: the frame folder, the trap folder, a metadata folder."""
    monkeypatch.setattr(flatbug, "METADATA_INDEX_FRAMES", 3)
    index = MetadataIndex()
    for i in range(6):
        index.add(write_meta(tmp_path, f"f{i}", [[i, 0, i + 2, 4]]))
    assert len(index) == 3
    for i in range(6):
        assert index.center(fid(tmp_path, f"f{i}"), 0) == ((i + 1.0, 2.0), None)
    (tmp_path / "metadata").mkdir()
    flat = tmp_path / "metadata" / "metadata_g_UUID_None.json"
    flat.write_text(json.dumps({"boxes": [[0, 0, 4, 8]]}))
    assert index.has(fid(tmp_path, "g", ""))
    assert index.center(fid(tmp_path, "g", ""), 0) == ((2.0, 4.0), None)
    assert index.center(fid(tmp_path, "g", "other"), 0) == (None, METADATA_MISSING)
    assert not index.has(fid(tmp_path, "h"))
    assert len(index) == 3


def test_the_batch_commands_loose_index_keeps_every_frame(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(flatbug, "METADATA_INDEX_FRAMES", 3)
    for i in range(6):
        write_meta(tmp_path / "meta", f"f{i}", [[i, 0, i + 2, 4]])
    index = MetadataIndex.scan(tmp_path / "meta", loose=True)
    assert len(index) == 6
    # A crop kept apart from the JSONs: matched by name and identifier.
    assert index.center(fid(tmp_path / "crops", "f0"), 0) == ((1.0, 2.0), None)
