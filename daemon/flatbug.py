"""What flat-bug's file names and metadata JSON tell about a crop.

flat-bug names crops ``crop_<frame>_CROPNUMBER_<i>_UUID_<id>.<ext>`` and writes one
``metadata_<frame>_UUID_<id>.json`` per frame whose ``boxes[i]`` is the crop's box.
The frame name carries the capture time. Everything here is tolerant: a crop whose
name, time or box cannot be read still gets a ``Crop``, with the problems listed.

A frame is what flat-bug means by one: its name, in one trap (:class:`FrameId`).
A trap is the folder that holds its frames plus the identifier in the names
(:class:`TrapId`); :func:`frame_place` finds that folder for flat-bug's
per-frame layout (``<trap>/<frame>/crops/crop_...``, ``<trap>/<frame>/metadata_...``)
and for the flat one (``<trap>/crops/``, ``<trap>/metadata/``) alike. Every
lookup by frame (metadata, ``track``, gating, the intake's frame grouping) goes
through these, so two traps with the same frame names never mix.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from .records import Crop, FrameId, TrapId
from .textfiles import open_text

# Problem codes, short and stable so they can also go into errors/log files.
NOT_FLATBUG_NAME = "not_flatbug_name"
TIME_UNPARSED = "time_unparsed"
METADATA_MISSING = "metadata_missing"
METADATA_MALFORMED = "metadata_malformed"
BOX_MISSING = "box_missing"
METADATA_AMBIGUOUS = "metadata_ambiguous"

PROBLEM_DESCRIPTIONS: dict[str, str] = {
    NOT_FLATBUG_NAME: "name is not flat-bug's crop_<frame>_CROPNUMBER_<i>_... form "
    "(no frame, time or box known)",
    TIME_UNPARSED: "no timestamp matching the time format in their frame name",
    METADATA_MISSING: "metadata missing for their frame",
    METADATA_MALFORMED: "metadata JSON of their frame unreadable or malformed",
    BOX_MISSING: "crop number beyond the boxes in their frame's metadata",
    METADATA_AMBIGUOUS: "several metadata JSON in the metadata folder name their frame "
    "and identifier and none is nearer to the crop's folder than the others",
}

_CROP_RE = re.compile(
    r"^crop_(?P<frame>.+)_CROPNUMBER_(?P<index>\d+)_(?:UUID_(?P<identifier>.*?))?"
    r"\.(?P<ext>[A-Za-z0-9]+)$"
)
_METADATA_RE = re.compile(r"^metadata_(?P<frame>.+?)_UUID_(?P<identifier>.*)\.json$", re.I)


@dataclass(frozen=True)
class CropName:
    """The parts of a flat-bug crop file name; ``identifier`` is None when absent."""

    frame: str
    index: int
    identifier: str | None


def parse_crop_name(filename: str) -> CropName | None:
    """Parse a flat-bug crop name (a basename or a path); None if it is not one."""
    match = _CROP_RE.match(os.path.basename(filename))
    if match is None:
        return None
    identifier = match["identifier"]
    # flat-bug writes str(None) when no identifier was set; treat it as absent.
    if identifier in ("", "None"):
        identifier = None
    return CropName(frame=match["frame"], index=int(match["index"]), identifier=identifier)


def parse_metadata_name(filename: str) -> str | None:
    """Return the frame of a flat-bug ``metadata_<frame>_UUID_<id>.json`` name, else None."""
    match = _METADATA_RE.match(os.path.basename(filename))
    return None if match is None else match["frame"]


def _identifier(text: str | None) -> str:
    # flat-bug writes str(None) when no identifier was set; treat it as absent.
    return "" if text is None or text == "None" else text


# Folders flat-bug (or its flat layout) puts between a trap folder and the files.
_HOLDERS = ("crops", "metadata")


def frame_place(path: Path, frame: str) -> str:
    """The trap folder of a file of frame ``frame``, as an absolute path string.

    That is the file's folder, less one trailing ``crops`` or ``metadata`` folder,
    less then one folder named exactly like the frame: ``W/T/F/crops/crop_F_...``,
    ``W/T/F/metadata_F_...``, ``W/T/crops/crop_F_...`` and ``W/T/metadata/...``
    all give ``W/T``. Only the path text is used (no file system access); bytes
    that are not UTF-8 are written as ``\\xNN``, as in the crop's record name, so
    the place read back from a stored name is the same.
    """
    folder = Path(os.path.abspath(path)).parent
    if folder.name in _HOLDERS:
        folder = folder.parent
    if folder.name == frame:
        folder = folder.parent
    text = str(folder)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    return text


def frame_of_crop(path: Path, parsed: CropName) -> FrameId:
    """The frame of a crop file whose name parsed as ``parsed``."""
    trap = TrapId(frame_place(path, parsed.frame), _identifier(parsed.identifier))
    return FrameId(parsed.frame, trap)


def frame_of_path(path: Path) -> FrameId | None:
    """The frame of a crop path, or None when its name is not flat-bug's."""
    parsed = parse_crop_name(path.name)
    return None if parsed is None else frame_of_crop(path, parsed)


def frames_of_names(names: Sequence[str]) -> tuple[FrameId | None, ...]:
    """The frame of each crop path in ``names`` (None for a name not flat-bug's).

    Crops of one frame share one record, so this costs little memory for a
    million names.
    """
    # Names differing only in their crop number have one frame: the regex runs once
    # per frame, not once per crop (it dominates at a million names).
    known: dict[tuple[str, str, str], FrameId | None] = {}
    frames: list[FrameId | None] = []
    for name in names:
        folder, base = os.path.split(name)
        head, sep, tail = base.rpartition("_CROPNUMBER_")
        number, _, rest = tail.partition("_")
        if not sep or not number.isdigit():
            frames.append(_frame_of_name(name))
            continue
        key = (folder, head, rest)
        if key not in known:
            known[key] = _frame_of_name(name)
        frames.append(known[key])
    return tuple(frames)


def _frame_of_name(name: str) -> FrameId | None:
    parsed = parse_crop_name(name)
    return None if parsed is None else frame_of_crop(Path(name), parsed)


def frame_of_metadata(path: Path) -> FrameId | None:
    """The frame a ``metadata_<frame>_UUID_<id>.json`` file describes, else None."""
    match = _METADATA_RE.match(path.name)
    if match is None:
        return None
    trap = TrapId(frame_place(path, match["frame"]), _identifier(match["identifier"]))
    return FrameId(match["frame"], trap)


# --- time ------------------------------------------------------------------------------

# directive -> (regex for its digits, length of the old tool's doubled spelling)
_DIRECTIVES: dict[str, tuple[str, int]] = {
    "Y": (r"\d{4}", 4),
    "m": (r"\d{2}", 2),
    "d": (r"\d{2}", 2),
    "H": (r"\d{2}", 2),
    "M": (r"\d{2}", 2),
    "S": (r"\d{2}", 2),
    "y": (r"\d{2}", 2),
    "j": (r"\d{3}", 3),
    "f": (r"\d{1,6}", 0),  # no doubled spelling: a run of f would be ambiguous
}
# Fixed widths, not strptime's 1-2 digits: frame names pack fields without separators.


@dataclass(frozen=True)
class TimeFormat:
    """A compiled frame-name time format; build it with ``TimeFormat.compile``."""

    source: str
    strftime: str
    pattern: re.Pattern[str]

    @classmethod
    def compile(cls, fmt: str) -> TimeFormat:
        """Compile strftime style (``%Y%m%d``) or doubled style (``%YYYY-%mm-%dd``).

        Raises ``ValueError`` for an unsupported directive, a trailing ``%`` or a
        format without any date/time field.
        """
        canonical: list[str] = []
        regex: list[str] = []
        fields = 0
        i = 0
        while i < len(fmt):
            char = fmt[i]
            if char != "%":
                canonical.append(char)
                regex.append(re.escape(char))
                i += 1
                continue
            if i + 1 >= len(fmt):
                raise ValueError(f"time format {fmt!r} ends with a lone '%'")
            directive = fmt[i + 1]
            if directive == "%":
                canonical.append("%%")
                regex.append("%")
                i += 2
                continue
            if directive not in _DIRECTIVES:
                supported = " ".join(f"%{d}" for d in _DIRECTIVES)
                raise ValueError(
                    f"time format {fmt!r}: unsupported directive %{directive} "
                    f"(supported: {supported}, or doubled like %YYYY-%mm-%dd_%HH-%MM-%SS)"
                )
            digits, doubled = _DIRECTIVES[directive]
            i += 2
            run = doubled - 1
            if run > 0 and fmt[i : i + run] == directive * run:
                i += run
            canonical.append(f"%{directive}")
            regex.append(f"(?:{digits})")
            fields += 1
        if fields == 0:
            raise ValueError(f"time format {fmt!r} has no date/time field such as %Y or %H")
        body = "".join(regex)
        # Digit fields must not bite into a longer run of digits: '%H%M%S' must not read
        # the start of '20230908001617' as 20:23:09.
        if canonical[0].startswith("%") and canonical[0] != "%%":
            body = r"(?<!\d)" + body
        if canonical[-1].startswith("%") and canonical[-1] != "%%":
            body = body + r"(?!\d)"
        return cls(source=fmt, strftime="".join(canonical), pattern=re.compile(body))

    def parse(self, text: str) -> float | None:
        """Seconds since the epoch of the first valid timestamp in ``text``, else None.

        The time is read as UTC: only differences between crops matter, and UTC has
        no daylight-saving jumps.
        """
        pos = 0
        while True:
            match = self.pattern.search(text, pos)
            if match is None:
                return None
            try:
                when = datetime.strptime(match.group(0), self.strftime)
            except ValueError:
                pos = match.start() + 1  # e.g. month 13: try a later position
                continue
            return when.replace(tzinfo=UTC).timestamp()


# --- metadata --------------------------------------------------------------------------

_Centers = tuple[tuple[float, float] | None, ...]


@dataclass(frozen=True, slots=True)
class _Frame:
    """What one metadata JSON tells: box centres (None for a malformed box) and
    the frame's (width, height) in pixels, None when absent or not positive."""

    centers: _Centers
    size: tuple[float, float] | None


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _frame_size(data: dict[str, object]) -> tuple[float, float] | None:
    width, height = data.get("image_width"), data.get("image_height")
    if _is_number(width) and _is_number(height):
        assert isinstance(width, int | float) and isinstance(height, int | float)
        if width > 0 and height > 0:
            return float(width), float(height)
    return None


def _load_frame(path: Path) -> _Frame | str:
    """Box centres and frame size of one metadata JSON, or a problem code."""
    try:
        with open_text(path) as handle:  # a BOM is not "malformed"
            data = json.load(handle)
    except FileNotFoundError:
        return METADATA_MISSING
    except (OSError, ValueError):
        return METADATA_MALFORMED
    if not isinstance(data, dict):
        return METADATA_MALFORMED
    boxes = data.get("boxes")
    if not isinstance(boxes, list):
        return METADATA_MALFORMED
    centers: list[tuple[float, float] | None] = []
    for box in boxes:
        if isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box):
            x1, y1, x2, y2 = (float(v) for v in box)
            centers.append(((x1 + x2) / 2.0, (y1 + y2) / 2.0))
        else:
            centers.append(None)
    return _Frame(tuple(centers), _frame_size(data))


# Frames whose parsed boxes stay cached (a frame's crops arrive together, so a
# small window serves them; the batch command reads frames in name order).
METADATA_CACHE_FRAMES = 1024
# Frames whose JSON path the daemon's index remembers. Older frames are found
# again on disk (`MetadataIndex._probe`), so memory does not grow all season.
METADATA_INDEX_FRAMES = 16384


class MetadataIndex:
    """Frame -> metadata JSON path, with each JSON loaded on first use and cached.

    A crop's metadata is the JSON of its own frame: same frame name, same
    identifier, same trap folder (:class:`FrameId`). With ``loose`` (the batch
    command's ``-mf`` folder, which may be kept apart from the crops) a frame
    without a JSON in its own trap folder takes the JSON of the same name and
    identifier whose trap folder ends in the most path components equal to the
    crop's; a tie is ``metadata_ambiguous`` and no JSON is used.

    Without ``loose`` (the daemon) only the :data:`METADATA_INDEX_FRAMES` most
    recently registered frames are held; a frame not held is looked for where
    flat-bug writes its JSON (:meth:`_probe`: a few ``stat`` calls), so the
    crops of an old frame, rewritten or moved weeks later, or seen after a
    restart whose first scan did not list the old folders, still find it.

    Safe to share between the watcher thread (``add``/``invalidate``) and a worker
    (``center``). When several files name the same frame, the last registered wins.
    """

    def __init__(self, *, loose: bool = False) -> None:
        self.loose = loose
        self._paths: OrderedDict[FrameId, Path] = OrderedDict()
        self._by_name: dict[tuple[str, str], set[FrameId]] = {}
        # Parsed boxes of the most recently used frames only: a season's frames
        # would otherwise all stay in memory; a frame read again is re-parsed.
        self._cache: OrderedDict[FrameId, _Frame | str] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def scan(cls, folder: Path, *, loose: bool = False) -> MetadataIndex:
        """Index every ``metadata_*.json`` under ``folder``, recursively.

        Raises ``FileNotFoundError`` if ``folder`` is not a directory.
        """
        if not folder.is_dir():
            raise FileNotFoundError(f"metadata folder not found or not a directory: {folder}")
        index = cls(loose=loose)
        for root, dirs, files in os.walk(folder):
            dirs.sort()
            for name in sorted(files):
                if parse_metadata_name(name) is not None:
                    index.add(Path(root, name))
        return index

    def add(self, path: Path) -> FrameId | None:
        """Register one metadata file (new or rewritten); return its frame, or None."""
        frame = frame_of_metadata(path)
        if frame is None:
            return None
        with self._lock:
            self._paths[frame] = path
            self._paths.move_to_end(frame)
            self._cache.pop(frame, None)
            if self.loose:
                self._by_name.setdefault((frame.name, frame.trap.identifier), set()).add(frame)
            elif len(self._paths) > METADATA_INDEX_FRAMES:
                self._paths.popitem(last=False)
        return frame

    def invalidate(self, frame: FrameId) -> None:
        """Forget the cached contents of a frame's JSON so the next lookup re-reads it."""
        with self._lock:
            self._cache.pop(frame, None)

    def has(self, frame: FrameId) -> bool:
        """Whether a metadata file is registered for ``frame`` (by the rule above)."""
        self._recall(frame)
        with self._lock:
            return isinstance(self._resolve(frame), FrameId)

    def _recall(self, frame: FrameId) -> None:
        """Register ``frame``'s JSON from disk when the daemon's index no longer holds it."""
        if self.loose:
            return
        with self._lock:
            if frame in self._paths:
                return
        found = self._probe(frame)
        if found is not None:
            self.add(found)

    @staticmethod
    def _probe(frame: FrameId) -> Path | None:
        """Where flat-bug writes ``frame``'s JSON (see :func:`frame_place`): in the
        frame's folder, the trap folder, or a ``metadata`` folder in either; the
        identifier as named or, when there is none, ``None`` or empty."""
        place = Path(frame.trap.place)
        folders = (place / frame.name, place, place / "metadata", place / frame.name / "metadata")
        identifiers = [frame.trap.identifier] if frame.trap.identifier else ["None", ""]
        for folder in folders:
            for identifier in identifiers:
                for ext in ("json", "JSON"):
                    path = folder / f"metadata_{frame.name}_UUID_{identifier}.{ext}"
                    if path.is_file() and frame_of_metadata(path) == frame:
                        return path
        return None

    def __len__(self) -> int:
        with self._lock:
            return len(self._paths)

    def _resolve(self, frame: FrameId) -> FrameId | str:
        """The registered frame whose JSON ``frame`` uses, or a problem code (lock held)."""
        if frame in self._paths:
            return frame
        others = self._by_name.get((frame.name, frame.trap.identifier))
        if not self.loose or not others:
            return METADATA_MISSING
        mine = Path(frame.trap.place).parts[::-1]
        scored = sorted(
            ((_common_prefix(mine, Path(o.trap.place).parts[::-1]), o) for o in others),
            reverse=True,
        )
        if len(scored) > 1 and scored[0][0] == scored[1][0]:
            return METADATA_AMBIGUOUS
        return scored[0][1]

    def center(self, frame: FrameId, index: int) -> tuple[tuple[float, float] | None, str | None]:
        """Return (centre of box ``index`` of ``frame``, None) or (None, problem code)."""
        center, _, problem = self.box(frame, index)
        return center, problem

    def box(
        self, frame: FrameId, index: int
    ) -> tuple[tuple[float, float] | None, tuple[float, float] | None, str | None]:
        """(centre of box ``index``, frame (width, height), None), or with a
        problem code: (None, frame size or None, code)."""
        self._recall(frame)
        with self._lock:
            found = self._resolve(frame)
            if isinstance(found, str):
                return None, None, found
            path = self._paths[found]
            cached = self._cache.get(found)
            if cached is not None:
                self._cache.move_to_end(found)
        if cached is None:
            # Read outside the lock: a slow disk must not block the watcher thread.
            cached = _load_frame(path)
            with self._lock:
                if self._paths.get(found) == path:
                    self._cache[found] = cached
                    while len(self._cache) > METADATA_CACHE_FRAMES:
                        self._cache.popitem(last=False)
        if isinstance(cached, str):
            return None, None, cached
        if index < 0 or index >= len(cached.centers):
            return None, cached.size, BOX_MISSING
        center = cached.centers[index]
        if center is None:
            return None, cached.size, METADATA_MALFORMED
        return center, cached.size, None


def _common_prefix(a: Sequence[str], b: Sequence[str]) -> int:
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count


# --- crops -----------------------------------------------------------------------------


def describe_crop(
    path: Path,
    name: str,
    *,
    time_format: TimeFormat | None,
    metadata: MetadataIndex | None,
) -> tuple[Crop, tuple[str, ...]]:
    """Build the ``Crop`` for one file and list the problems met reading it.

    Time is looked for only with a ``time_format`` and the box only with ``metadata``
    (the JSON of the crop's own frame, see :class:`MetadataIndex`); their problems
    are reported only then. A non-flat-bug name gives a bare ``Crop`` (no frame).
    """
    parsed = parse_crop_name(path.name)
    if parsed is None:
        return Crop(path=path, name=name), (NOT_FLATBUG_NAME,)
    frame = frame_of_crop(path, parsed)
    problems: list[str] = []
    time: float | None = None
    if time_format is not None:
        time = time_format.parse(parsed.frame)
        if time is None:
            problems.append(TIME_UNPARSED)
    center: tuple[float, float] | None = None
    size: tuple[float, float] | None = None
    if metadata is not None:
        center, size, problem = metadata.box(frame, parsed.index)
        if problem is not None:
            problems.append(problem)
    crop = Crop(
        path=path,
        name=name,
        frame=frame,
        crop_index=parsed.index,
        time=time,
        center=center,
        frame_size=size,
    )
    return crop, tuple(problems)


class ProblemTally:
    """Counts problems over many crops and keeps a few example names of each."""

    MAX_EXAMPLES = 3

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._examples: dict[str, list[str]] = {}

    def add(self, name: str, problems: Iterable[str]) -> None:
        """Record the problems of one crop (an empty ``problems`` records nothing)."""
        for problem in problems:
            self._counts[problem] = self._counts.get(problem, 0) + 1
            examples = self._examples.setdefault(problem, [])
            if len(examples) < self.MAX_EXAMPLES:
                examples.append(name)

    def counts(self) -> dict[str, int]:
        """Problem code -> number of crops with it (a copy)."""
        return dict(self._counts)

    def examples(self, problem: str) -> list[str]:
        """The first few crop names recorded with ``problem``."""
        return list(self._examples.get(problem, []))

    def summary_lines(self) -> list[str]:
        """One human-readable line per problem, known problems in a fixed order."""
        order: Sequence[str] = [p for p in PROBLEM_DESCRIPTIONS if p in self._counts]
        order = [*order, *sorted(p for p in self._counts if p not in PROBLEM_DESCRIPTIONS)]
        lines = []
        for problem in order:
            count = self._counts[problem]
            examples = self._examples[problem]
            shown = ", ".join(examples) + (", ..." if count > len(examples) else "")
            noun = "crop" if count == 1 else "crops"
            what = PROBLEM_DESCRIPTIONS.get(problem, problem)
            lines.append(f"{count} {noun}: {what} (e.g. {shown})")
        return lines
