"""Hostile inputs: the real daemon over a watched folder full of bad and odd files.

One daemon run (module fixture) sees a simulated trap session plus every kind in
`CASES`, some there before start and some landing (or vanishing) while it runs.
Each kind then has its own test of the outcome: clustered (exactly once, and
where it matters into the same cluster as a plain reference image of what it
should decode to), recorded in ``errors.csv`` with a specific reason, or
ignored (never opened: not a regular file). The daemon must stay up and every
valid crop of the session must be clustered exactly once.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from fakes import ColourEmbedder
from PIL import Image
from test_supervisor import batch_partition, crops_in, make_config, partition, session, wait_for

from crop_clusterd.config import Config
from crop_clusterd.csvfiles import (
    escape_cell,
    read_clusters_csv,
    read_errors_csv,
    write_clusters_csv,
    write_errors_csv,
)
from crop_clusterd.embed import register, unregister
from crop_clusterd.records import Assignment, Skipped
from crop_clusterd.simulate import frame_name
from crop_clusterd.store import StateStore
from crop_clusterd.supervisor import Daemon, RunSummary

RGBt = tuple[int, int, int]
RED: RGBt = (230, 20, 20)
GREEN: RGBt = (20, 200, 30)
BLUE: RGBt = (20, 30, 220)
YELLOW: RGBt = (220, 210, 20)
GREY: RGBt = (128, 128, 128)  # the default background transparency is flattened onto
AS_ROOT = os.geteuid() == 0


# --- making files ----------------------------------------------------------------------


def halves(a: RGBt, b: RGBt, *, vertical: bool = False, size: int = 64) -> Image.Image:
    """Two flat colours side by side (or top and bottom): position matters to the embedder."""
    image = Image.new("RGB", (size, size), a)
    box = (0, size // 2, size, size) if vertical else (size // 2, 0, size, size)
    image.paste(b, box)
    return image


def save(image: Image.Image, path: Path, fmt: str = "PNG", **params: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **params)
    return path


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(image: Image.Image, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95, **params)
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height``: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    body = struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + body + end


# --- the table of kinds ----------------------------------------------------------------


@dataclass(frozen=True)
class Clustered:
    """Clustered exactly once, under ``name`` (default: the path as created)."""

    with_reference: bool = False  # same cluster as the kind's plain reference image
    not_with_decoy: bool = False  # and not with the decoy (what a wrong decode gives)
    name: Callable[[Path], str] | None = None
    no_box: bool = False  # stored without a box centre: linked on time only


@dataclass(frozen=True)
class Recorded:
    """Listed in ``errors.csv`` with a reason matching ``reason`` (regex), not clustered."""

    reason: str


@dataclass(frozen=True)
class Ignored:
    """In neither file: not a regular file, never opened (``why`` is for the table)."""

    why: str


Outcome = Clustered | Recorded | Ignored


@dataclass(frozen=True)
class Case:
    """A hostile kind: how to make it in a folder, and what the daemon must do with it.

    ``make`` returns the path whose outcome is checked. ``live`` kinds are made
    while the daemon runs (events, not the start-up scan). ``reference`` and
    ``decoy`` draw the plain RGB images a correct and a wrong decode would equal.
    """

    kind: str
    make: Callable[[Path], Path]
    outcome: Outcome
    live: bool = False
    reference: Callable[[Path], Path] | None = None
    decoy: Callable[[Path], Path] | None = None
    needs_non_root: bool = False


def _frame(i: int) -> str:
    # A capture time far from the simulated session's, so nothing is linked by time.
    return frame_name(datetime(2031, 1, 1, 3, 0, i))


def _flatbug(folder: Path, frame: str, index: int) -> Path:
    return folder / frame / "crops" / f"crop_{frame}_CROPNUMBER_{index}_UUID_h.png"


def _metadata(folder: Path, frame: str, text: str) -> None:
    write(folder / frame / f"metadata_{frame}_UUID_h.json", text.encode())


def make_meta_crop(i: int, meta: str | None, index: int = 0) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        frame = _frame(i)
        if meta is not None:
            _metadata(folder, frame, meta)
        return save(Image.new("RGB", (20, 16), YELLOW), _flatbug(folder, frame, index))

    return make


def pair_name(folder: Path, index: int, ext: str = "png") -> Path:
    """A flat-bug crop name in the case's own frame, a minute from any other case's.

    With metadata on, only crops with a capture time can link (``|dt| < 30 s``), so a
    kind and its reference share a frame; other kinds' frames are too far to link.
    """
    frame = frame_name(datetime(2031, 1, 2, 0, int(folder.name[1:]), 0))
    return folder / f"crop_{frame}_CROPNUMBER_{index}_UUID_h.{ext}"


def make_exif_rotated(folder: Path) -> Path:
    # Stored red-over-blue, tagged "rotate 180": shown (and embedded) blue over red.
    exif = Image.Exif()
    exif[0x0112] = 3
    data = jpeg_bytes(halves(RED, BLUE, vertical=True), exif=exif.tobytes())
    return write(pair_name(folder, 0, "jpg"), data)


def make_sixteen_bit(folder: Path) -> Path:
    values = np.full((64, 64), 60000, dtype=np.uint16)
    values[:, 32:] = 8000
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    return save(image, pair_name(folder, 0))


def make_palette_transparent(folder: Path) -> Path:
    image = Image.new("P", (64, 64), 0)
    image.putpalette([*RED, *GREEN] + [0] * 762)
    image.paste(1, (32, 0, 64, 64))
    return save(image, pair_name(folder, 0), transparency=1)


def make_la(folder: Path) -> Path:
    grey = Image.new("L", (64, 64), 220)
    grey.paste(30, (32, 0, 64, 64))
    alpha = Image.new("L", (64, 64), 255)
    alpha.paste(0, (32, 0, 64, 64))
    image = Image.merge("LA", (grey, alpha))
    return save(image, pair_name(folder, 0))


def make_cmyk(folder: Path) -> Path:
    image = halves(GREEN, YELLOW, vertical=True).convert("CMYK")
    return write(pair_name(folder, 0, "jpg"), jpeg_bytes(image))


def make_unreadable(folder: Path) -> Path:
    path = save(halves(RED, GREEN), folder / "unreadable.png")
    path.chmod(0)
    return path


def make_non_utf8(folder: Path) -> Path:
    raw = os.fsencode(folder) + b"/crop_\xff\xfe bytes.png"
    with open(raw, "wb") as fh:
        fh.write(png_bytes(Image.new("RGB", (8, 8), BLUE)))
    return Path(os.fsdecode(raw))


def escaped_name(path: Path) -> str:
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def make_fifo(folder: Path) -> Path:
    path = folder / "fifo.png"
    os.mkfifo(path)
    return path


def make_symlink(folder: Path) -> Path:
    outside = folder.parents[2] / "outside" / f"{folder.name}-target.png"
    save(halves(BLUE, GREEN), outside)
    link = folder / "link-outside.png"
    link.symlink_to(outside)
    return link


def make_directory(folder: Path) -> Path:
    path = folder / "x.png"
    path.mkdir()
    return path


def make_deleted(folder: Path) -> Path:
    path = save(halves(RED, YELLOW), folder / "deleted.png")
    time.sleep(0.02)  # long enough for the event, far shorter than settle_ms
    path.unlink()
    return path


def make_renamed(folder: Path) -> Path:
    first = save(halves(YELLOW, BLUE), folder / "renamed-before.png")
    time.sleep(0.02)
    os.rename(first, folder / "renamed-after.png")
    return first


def renamed_name(path: Path) -> str:
    return str(path.with_name("renamed-after.png"))


def solid(name: str, rgb: RGBt, size: tuple[int, int] = (12, 10)) -> Callable[[Path], Path]:
    return lambda folder: save(Image.new("RGB", size, rgb), folder / name)


def ref(index: int, image: Callable[[], Image.Image]) -> Callable[[Path], Path]:
    """A plain RGB PNG in the case's frame (crop ``index``): what a decode should equal."""
    return lambda folder: save(image(), pair_name(folder, index))


def jpeg_as_png(folder: Path) -> Path:
    return write(pair_name(folder, 0, "png"), JPEG())


def data(name: str, payload: Callable[[], bytes]) -> Callable[[Path], Path]:
    return lambda folder: write(folder / name, payload())


def PNG() -> bytes:
    return png_bytes(halves(GREEN, BLUE))


def JPEG() -> bytes:
    return jpeg_bytes(halves(BLUE, YELLOW))


CASES: tuple[Case, ...] = (
    Case("zero-byte file", data("empty.png", lambda: b""), Recorded(r"^empty file$")),
    Case(
        "truncated PNG",
        data("truncated.png", lambda: PNG()[: len(PNG()) // 2]),
        Recorded(r"^truncated image$"),
    ),
    Case(
        "truncated JPEG",
        data("truncated.jpg", lambda: JPEG()[: len(JPEG()) // 2]),
        Recorded(r"^truncated image$"),
    ),
    Case(
        "PNG signature only",
        data("signature-only.png", lambda: PNG()[:8]),
        Recorded(r"^truncated image$"),
    ),
    Case(
        "text file named .png",
        data("notes.png", lambda: b"these are field notes, not a crop\n"),
        Recorded(r"^not an image$"),
    ),
    Case(
        "random bytes named .jpg",
        data("noise.jpg", lambda: np.random.default_rng(1).bytes(4096)),
        Recorded(r"^not an image$"),
    ),
    Case(
        "decompression bomb (100000 x 100000 header)",
        data("bomb.png", lambda: png_header_only(100_000, 100_000)),
        Recorded(r"^too many pixels \(10000000000 > 40000000\)$"),
    ),
    Case(
        "JPEG named .png",
        jpeg_as_png,
        Clustered(with_reference=True),
        reference=ref(1, lambda: halves(BLUE, YELLOW)),
    ),
    Case("1x1 image", solid("one-pixel.png", GREEN, (1, 1)), Clustered()),
    Case(
        "16-bit greyscale PNG",
        make_sixteen_bit,
        Clustered(with_reference=True),
        reference=ref(1, lambda: halves((233, 233, 233), (31, 31, 31))),
    ),
    Case(
        "palette PNG with a transparent index",
        make_palette_transparent,
        Clustered(with_reference=True, not_with_decoy=True),
        reference=ref(1, lambda: halves(RED, GREY)),
        decoy=ref(2, lambda: halves(RED, GREEN)),
    ),
    Case(
        "greyscale + alpha (LA) PNG",
        make_la,
        Clustered(with_reference=True),
        reference=ref(1, lambda: halves((220, 220, 220), GREY)),
    ),
    Case(
        "CMYK JPEG",
        make_cmyk,
        Clustered(with_reference=True),
        reference=ref(1, lambda: halves(GREEN, YELLOW, vertical=True)),
    ),
    Case(
        "EXIF-rotated JPEG (orientation 3)",
        make_exif_rotated,
        Clustered(with_reference=True, not_with_decoy=True),
        reference=ref(1, lambda: halves(BLUE, RED, vertical=True)),
        decoy=ref(2, lambda: halves(RED, BLUE, vertical=True)),
    ),
    Case("name with spaces", solid("a crop with  spaces .png", RED), Clustered()),
    Case("name with commas", solid("a,b,,c.png", RED), Clustered()),
    Case("name with quotes", solid('say "cheese" it\'s.png', RED), Clustered()),
    Case("name with a newline", solid("line\nbreak.png", RED), Clustered()),
    Case("name with a carriage return", solid("carriage\rreturn.png", RED), Clustered()),
    Case(
        "name with non-UTF-8 bytes",
        make_non_utf8,
        Clustered(name=escaped_name),
    ),
    Case("255-byte name", solid("n" * 251 + ".png", RED), Clustered()),
    Case("255-byte UTF-8 name", solid("é" * 125 + "n.png", RED), Clustered()),
    Case("leading =", solid("=HYPERLINK(1+1).png", RED), Clustered()),
    Case("leading +", solid("+1+cmd|' calc'!A0.png", RED), Clustered()),
    Case("leading -", solid("-2+3.png", RED), Clustered()),
    Case("leading @", solid("@SUM(1+1).png", RED), Clustered()),
    Case("leading '", solid("'quoted.png", RED), Clustered()),
    Case("directory named x.png", make_directory, Ignored("a directory: not entered")),
    Case("FIFO named .png (pre-existing)", make_fifo, Ignored("not a regular file")),
    Case("FIFO named .png (live)", make_fifo, Ignored("not a regular file"), live=True),
    Case(
        "symlink to a file outside the watched folder (pre-existing)",
        make_symlink,
        Ignored("symlinks are never followed"),
    ),
    Case(
        "symlink to a file outside the watched folder (live)",
        make_symlink,
        Ignored("symlinks are never followed"),
        live=True,
    ),
    Case(
        "file without read permission",
        make_unreadable,
        Recorded(r"^permission denied$"),
        needs_non_root=True,
    ),
    Case(
        "deleted between event and processing",
        make_deleted,
        Ignored("gone before it settled"),
        live=True,
    ),
    Case(
        "renamed between event and processing",
        make_renamed,
        Clustered(name=renamed_name),
        live=True,
    ),
    Case(
        "metadata JSON malformed",
        make_meta_crop(1, "{not json"),
        Clustered(no_box=True),
    ),
    Case(
        "metadata JSON without boxes",
        make_meta_crop(2, '{"image_width": 100, "image_height": 100}'),
        Clustered(no_box=True),
    ),
    Case(
        "metadata JSON with too few boxes",
        make_meta_crop(3, '{"boxes": [[0, 0, 10, 10]]}', index=4),
        Clustered(no_box=True),
    ),
    Case("metadata JSON never arrives", make_meta_crop(4, None), Clustered(no_box=True)),
    Case(
        "metadata JSON valid (control)",
        make_meta_crop(5, '{"boxes": [[0, 0, 10, 10]]}'),
        Clustered(),
    ),
)


def active(case: Case) -> bool:
    return not (case.needs_non_root and AS_ROOT)


# --- the run ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """What one daemon run over the hostile corpus produced."""

    config: Config
    summary: RunSummary
    paths: dict[str, Path]
    references: dict[str, Path]
    decoys: dict[str, Path]
    session_crops: set[str]
    clusters: list[tuple[str, int]]
    errors: list[tuple[str, str]]
    centers: dict[str, tuple[float, float]]
    alive_before_stop: bool

    def cluster_of(self, name: str) -> int:
        found = [c for n, c in self.clusters if n == name]
        assert len(found) == 1, f"{name!r} is in clusters.csv {len(found)} times"
        return found[0]


def store_centers(config: Config) -> dict[str, tuple[float, float]]:
    with StateStore(config.state.folder, readonly=True) as store:
        crops = store.load_crops()
    return {p: (float(c[0]), float(c[1])) for p, c in zip(crops.paths, crops.centers, strict=True)}


def counts(config: Config) -> tuple[int, int]:
    try:
        with StateStore(config.state.folder, readonly=True) as store:
            c = store.counts()
    except Exception:
        return (0, 0)
    return (c.crops, c.skipped)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    register(ColourEmbedder)
    try:
        yield _run(tmp_path_factory.mktemp("hostile"))
    finally:
        unregister(ColourEmbedder.name)


def _run(tmp: Path) -> Run:
    watch = session(tmp, frames=6)
    session_crops = crops_in(watch)
    hostile = watch / "hostile"
    hostile.mkdir()
    base = make_config(tmp, watch, metadata=True)
    config = dataclasses.replace(
        base,
        watch=dataclasses.replace(base.watch, decode_retries=1, retry_backoff_s=0.05),
        metadata=dataclasses.replace(base.metadata, wait_s=0.5),
    )
    paths: dict[str, Path] = {}
    references: dict[str, Path] = {}
    decoys: dict[str, Path] = {}

    def make(case: Case, i: int) -> None:
        folder = hostile / f"k{i:02d}"
        folder.mkdir()
        paths[case.kind] = case.make(folder)
        if case.reference is not None:
            references[case.kind] = case.reference(folder)
        if case.decoy is not None:
            decoys[case.kind] = case.decoy(folder)

    numbered = [(i, c) for i, c in enumerate(CASES) if active(c)]
    for i, case in numbered:
        if not case.live:
            make(case, i)
    daemon = Daemon(config, exit_when_idle_s=None)
    result: list[RunSummary] = []
    runner = threading.Thread(target=lambda: result.append(daemon.run()))
    runner.start()
    try:
        wait_for(lambda: (config.state.folder / "state.sqlite3").exists())
        time.sleep(0.3)  # let the start-up scan go by, so live kinds arrive as events
        for i, case in numbered:
            if case.live:
                make(case, i)
        expected_crops = len(session_crops) + len(references) + len(decoys)
        expected_crops += sum(isinstance(c.outcome, Clustered) for _, c in numbered)
        expected_skips = sum(isinstance(c.outcome, Recorded) for _, c in numbered)
        want = (expected_crops, expected_skips)
        # Stop waiting at once if the daemon died: the assertion below says so.
        wait_for(lambda: not runner.is_alive() or counts(config) >= want, 40)
        assert runner.is_alive(), "the daemon stopped on a hostile input"
        time.sleep(1.5)  # one more rescan: nothing else may turn up
        alive = runner.is_alive()
    finally:
        daemon.request_stop()
        runner.join(60)
    assert result, "the daemon did not return a summary"
    return Run(
        config=config,
        summary=result[0],
        paths=paths,
        references=references,
        decoys=decoys,
        session_crops=session_crops,
        clusters=read_clusters_csv(config.output.folder / "clusters.csv"),
        errors=read_errors_csv(config.output.folder / "errors.csv"),
        centers=store_centers(config),
        alive_before_stop=alive,
    )


# --- the tests -------------------------------------------------------------------------


def test_the_daemon_survives_and_clusters_every_valid_crop_once(run: Run) -> None:
    assert run.alive_before_stop
    names = [n for n, _ in run.clusters]
    assert len(names) == len(set(names)), "a crop is in clusters.csv twice"
    assert run.session_crops <= set(names)
    assert len(run.session_crops) >= 10
    expected = run.session_crops | {
        str(p) for p in [*run.references.values(), *run.decoys.values()]
    }
    for case in CASES:
        if active(case) and isinstance(case.outcome, Clustered):
            path = run.paths[case.kind]
            expected.add(case.outcome.name(path) if case.outcome.name else str(path))
    assert set(names) == expected
    assert len(run.errors) == sum(isinstance(c.outcome, Recorded) for c in CASES if active(c)), (
        run.errors
    )
    assert run.summary.crops == len(names)


def test_no_csv_cell_is_a_live_spreadsheet_formula(run: Run) -> None:
    for name in ("clusters.csv", "errors.csv"):
        text = (run.config.output.folder / name).read_text(errors="surrogateescape")
        # Cells start at a line start or after a comma (quoted cells after the quote).
        cells = re.findall(r'(?:^|,)"?([^,\n"]?)', text, flags=re.MULTILINE)
        assert not [c for c in cells if c and c in "=+-@"], name


def test_hostile_inputs_do_not_change_how_the_session_clusters(run: Run, tmp_path: Path) -> None:
    """The same session alone, through the batch command, gives the same partition."""
    pristine = session(tmp_path, frames=6)  # same seed: the same crops and metadata
    config = make_config(tmp_path, pristine, metadata=True)
    alone = {
        frozenset(os.path.relpath(n, pristine) for n in g)
        for g in batch_partition(config, pristine, tmp_path)
    }
    root = run.config.watch.folder
    live = {
        frozenset(os.path.relpath(n, root) for n in group)
        for group in partition([r for r in run.clusters if r[0] in run.session_crops])
    }
    assert 1 < len(alone) < len(run.session_crops), "a trivial partition proves nothing"
    assert live == alone


@pytest.mark.parametrize("case", CASES, ids=[c.kind for c in CASES])
def test_kind(run: Run, case: Case) -> None:
    if not active(case):
        pytest.skip("running as root, which reads files whatever their permissions")
    path = run.paths[case.kind]
    names = {n for n, _ in run.clusters}
    errors = dict(run.errors)
    outcome = case.outcome
    if isinstance(outcome, Recorded):
        assert str(path) in errors, f"{case.kind}: not in errors.csv"
        assert re.search(outcome.reason, errors[str(path)]), errors[str(path)]
        assert str(path) not in names
    elif isinstance(outcome, Ignored):
        assert str(path) not in names and str(path) not in errors
        if path.is_symlink():
            assert str(path.resolve()) not in names  # the target was not read either
    else:
        name = outcome.name(path) if outcome.name else str(path)
        cluster = run.cluster_of(name)
        assert name not in errors
        if outcome.with_reference:
            assert cluster == run.cluster_of(str(run.references[case.kind]))
        if outcome.not_with_decoy:
            assert cluster != run.cluster_of(str(run.decoys[case.kind]))
        if outcome.no_box:
            assert all(math.isnan(v) for v in run.centers[name])
        elif case.kind.startswith("metadata"):
            assert not any(math.isnan(v) for v in run.centers[name])


# --- the CSV escaping, where names do start a cell -------------------------------------


FORMULA_NAMES = ("=1+1", "+1", "-x", "@SUM(A1)", "'plain", "\t=1", "-1", "ok", "''=x")


def test_csv_escaping_round_trips_and_leaves_no_formula(tmp_path: Path) -> None:
    rows = [Assignment(seq=i, name=n, cluster=i) for i, n in enumerate(FORMULA_NAMES)]
    write_clusters_csv(tmp_path / "c.csv", rows)
    write_errors_csv(tmp_path / "e.csv", [Skipped(n, "=bad") for n in FORMULA_NAMES])
    assert [n for n, _ in read_clusters_csv(tmp_path / "c.csv")] == list(FORMULA_NAMES)
    assert read_errors_csv(tmp_path / "e.csv") == [(n, "=bad") for n in FORMULA_NAMES]
    lines = (tmp_path / "c.csv").read_text().splitlines()[1:]
    # Only "+1" and "-1" start with a sign: plain numbers, not formulas.
    assert [line[0] for line in lines if line[0] in "=+-@\t"] == ["+", "-"]
    assert lines[0] == "'=1+1,0" and escape_cell("-1") == "-1"


def test_relative_watch_folder_names_are_escaped_live(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the watch folder "." the crop names start the cell: a live daemon escapes them."""
    watch = tmp_path / "w"
    watch.mkdir()
    names = ("=HYPERLINK(1).png", "@x.png", "plain.png")
    for n in names:
        save(Image.new("RGB", (8, 8), RED), watch / n)
    monkeypatch.chdir(watch)
    register(ColourEmbedder)
    try:
        config = make_config(tmp_path, Path("."))
        config = dataclasses.replace(
            config,
            state=dataclasses.replace(config.state, folder=tmp_path / "state"),
            output=dataclasses.replace(config.output, folder=tmp_path / "out"),
        )
        Daemon(config, exit_when_idle_s=1.0).run()
    finally:
        unregister(ColourEmbedder.name)
    text = (tmp_path / "out" / "clusters.csv").read_text()
    assert "'=HYPERLINK(1).png," in text and "'@x.png," in text
    assert {n for n, _ in read_clusters_csv(tmp_path / "out" / "clusters.csv")} == set(names)
