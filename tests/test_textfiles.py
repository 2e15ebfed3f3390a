"""Text saved on Windows (issue 9, case 7): BOM and CRLF in every text input.

A ``.txt`` input list saved with a UTF-8 byte-order mark and CRLF line ends gave
"input not found" for a file that exists. Every text file the project reads from
people or from the detector now goes through ``textfiles``: input lists, labels CSV,
config TOML, metadata JSON and the CSVs it writes (when a person re-saves them).
UTF-16/32 with a BOM (PowerShell's ``>``) is decoded; other non-UTF-8 text is a
clear error naming the file.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest
from fakes import ColourEmbedder
from test_supervisor import batch_partition, make_config, partition, run_daemon, session

from crop_clusterd.batch import BatchRequest, run_batch
from crop_clusterd.config import ConfigError, load_config
from crop_clusterd.csvfiles import read_clusters_csv, read_errors_csv
from crop_clusterd.embed import register, unregister
from crop_clusterd.evaluate import load_labels_csv
from crop_clusterd.flatbug import MetadataIndex, frame_of_path
from crop_clusterd.inputs import InputError, resolve_inputs
from crop_clusterd.textfiles import TextEncodingError, decode_text, read_lines


@pytest.fixture(autouse=True)
def colour_embedder() -> Iterator[None]:
    register(ColourEmbedder)
    yield
    unregister(ColourEmbedder.name)


def utf8_bom_crlf(text: str) -> bytes:
    return codecs.BOM_UTF8 + text.replace("\n", "\r\n").encode("utf-8")


def utf16_bom_crlf(text: str) -> bytes:
    # What Windows PowerShell 5's ``>`` and Notepad's "Unicode" write.
    return text.replace("\n", "\r\n").encode("utf-16")


def lone_cr(text: str) -> bytes:
    return text.replace("\n", "\r").encode("utf-8")


SAVERS: dict[str, Callable[[str], bytes]] = {
    "utf8-bom-crlf": utf8_bom_crlf,
    "utf16-bom-crlf": utf16_bom_crlf,
    "utf8-cr": lone_cr,
}


# --- the helper -----------------------------------------------------------------------


@pytest.mark.parametrize("save", SAVERS.values(), ids=SAVERS.keys())
def test_decode_text_drops_the_bom_and_normalises_line_ends(save: Callable[[str], bytes]) -> None:
    assert decode_text(save("a é\nb\n")) == "a é\nb\n"


def test_utf32_with_bom_is_decoded() -> None:
    assert decode_text("x\r\ny".encode("utf-32")) == "x\ny"


def test_latin1_without_bom_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "list.txt"
    path.write_bytes("caf\xe9.png\n".encode("latin-1"))
    with pytest.raises(TextEncodingError, match=r"list\.txt: not UTF-8 text .*save it as UTF-8"):
        read_lines(path)


def test_read_lines_splits_only_on_line_ends(tmp_path: Path) -> None:
    path = tmp_path / "list.txt"
    path.write_bytes(utf8_bom_crlf("a\x0cb.png\nc\u2028d.png\n\nlast"))
    assert read_lines(path) == ["a\x0cb.png", "c\u2028d.png", "", "last"]


# --- .txt input lists (the case) ------------------------------------------------------


@pytest.mark.parametrize("save", SAVERS.values(), ids=SAVERS.keys())
def test_input_list_saved_on_windows_resolves(tmp_path: Path, save: Callable[[str], bytes]) -> None:
    crops = session(tmp_path, frames=2)
    files = sorted(crops.rglob("*.png"))
    listing = tmp_path / "list.txt"
    listing.write_bytes(save("".join(f"{p}\n" for p in files)))
    assert resolve_inputs([str(listing)]) == files


def test_nested_lists_with_bom_and_relative_paths(tmp_path: Path) -> None:
    crops = session(tmp_path, frames=2)
    files = sorted(crops.rglob("*.png"))
    inner = crops / "inner.txt"
    inner.write_bytes(utf16_bom_crlf("\n".join(str(p.relative_to(crops)) for p in files[1:])))
    outer = tmp_path / "outer.txt"
    outer.write_bytes(utf8_bom_crlf(f"# comment\n{files[0]}\n{inner}\n"))
    assert resolve_inputs([str(outer)]) == files


def test_undecodable_input_list_is_an_input_error(tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"\xff\xfe\xfd not text, no BOM either"[2:])
    with pytest.raises(InputError, match=r"cannot read input list .*not UTF-8 text"):
        resolve_inputs([str(listing)])


def test_batch_command_on_a_windows_list_equals_the_folder(tmp_path: Path) -> None:
    crops = session(tmp_path, frames=3)
    listing = tmp_path / "list.txt"
    listing.write_bytes(utf8_bom_crlf("".join(f"{p}\n" for p in sorted(crops.rglob("*.png")))))
    config = make_config(tmp_path, crops)
    via_list = dataclasses.replace(
        config, output=dataclasses.replace(config.output, folder=tmp_path / "l")
    )
    run_batch(BatchRequest(via_list, inputs=(str(listing),)))
    rows = read_clusters_csv(tmp_path / "l" / "clusters.csv")
    assert partition(rows) == batch_partition(config, crops, tmp_path)


# --- labels CSV, config TOML, our own CSVs --------------------------------------------


@pytest.mark.parametrize("save", SAVERS.values(), ids=SAVERS.keys())
def test_labels_csv_saved_on_windows(tmp_path: Path, save: Callable[[str], bytes]) -> None:
    path = tmp_path / "labels.csv"
    path.write_bytes(save('filename,label\na.png,moth\n"b,1.png",beetle\n'))
    assert load_labels_csv(path) == {"a.png": "moth", "b,1.png": "beetle"}


@pytest.mark.parametrize("save", SAVERS.values(), ids=SAVERS.keys())
def test_config_toml_saved_on_windows(tmp_path: Path, save: Callable[[str], bytes]) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(save('[link]\nmethod = "cosine"\nthreshold = 0.81\n'))
    assert load_config(path).link.threshold == 0.81


def test_config_toml_in_latin1_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes("# caf\xe9\n[link]\nthreshold = 0.8\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(path)


@pytest.mark.parametrize("save", SAVERS.values(), ids=SAVERS.keys())
def test_our_csvs_re_saved_on_windows_read_back(
    tmp_path: Path, save: Callable[[str], bytes]
) -> None:
    clusters = tmp_path / "clusters.csv"
    clusters.write_bytes(save('filename,cluster\na.png,0\n"x,y.png",1\n'))
    assert read_clusters_csv(clusters) == [("a.png", 0), ("x,y.png", 1)]
    errors = tmp_path / "errors.csv"
    errors.write_bytes(save("filename,reason\nz.png,empty file\n"))
    assert read_errors_csv(errors) == [("z.png", "empty file")]


# --- metadata JSON from the detector --------------------------------------------------


def rewrite_metadata(folder: Path, save: Callable[[str], bytes]) -> int:
    count = 0
    for path in folder.rglob("metadata_*.json"):
        path.write_bytes(save(json.dumps(json.loads(path.read_text()), indent=1)))
        count += 1
    return count


@pytest.mark.parametrize("save", SAVERS.values(), ids=SAVERS.keys())
def test_metadata_json_with_bom_gives_its_boxes(
    tmp_path: Path, save: Callable[[str], bytes]
) -> None:
    src = session(tmp_path, frames=2)
    plain = MetadataIndex.scan(src)
    # One frame (name, identifier, place) per crop folder; each crop's own frame.
    frames = list(dict.fromkeys(filter(None, map(frame_of_path, sorted(src.rglob("*.png"))))))
    expected = [plain.center(f, 0) for f in frames]
    assert all(where is not None and problem is None for where, problem in expected)
    assert rewrite_metadata(src, save) == len(frames)
    saved = MetadataIndex.scan(src)
    assert [saved.center(f, 0) for f in frames] == expected


def test_daemon_with_bom_metadata_equals_batch_on_the_original(tmp_path: Path) -> None:
    src = session(tmp_path, frames=8)
    watch = tmp_path / "watch"
    shutil.copytree(src, watch)
    assert rewrite_metadata(watch, utf8_bom_crlf) > 0
    config = make_config(tmp_path, watch, "track", metadata=True)
    run_daemon(config)
    rows = read_clusters_csv(config.output.folder / "clusters.csv")
    # Every crop was linked with its box: a BOM would have made the JSON "malformed".
    with closing(sqlite3.connect(config.state.folder / "state.sqlite3")) as db:
        boxes = db.execute("SELECT count(*), count(cx) FROM crops").fetchone()
    assert boxes == (len(rows), len(rows))
    original = dataclasses.replace(config, input=dataclasses.replace(config.input, meta_folder=src))
    expected = batch_partition(original, src, tmp_path)
    # Same crops by name in both trees; compare partitions of names relative to the root.
    live = {frozenset(str(Path(n).relative_to(watch)) for n in g) for g in partition(rows)}
    assert live == {frozenset(str(Path(n).relative_to(src)) for n in g) for g in expected}


def test_broken_utf16_names_the_encoding_it_claimed() -> None:
    with pytest.raises(TextEncodingError, match=r"list\.txt: not utf-16-le text .*truncated"):
        decode_text("ab".encode("utf-16") + b"x", "list.txt")
