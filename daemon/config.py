"""Configuration: one TOML file read once at startup into frozen dataclasses.

The schema *is* the dataclasses below. The loader walks their fields and type
hints, so adding a section means adding a dataclass and a field on `Config`;
nothing else needs to know. Per-field metadata:

- ``doc``: one-line meaning (with unit), used as the comment by `format_config`;
- ``check`` / ``help``: a predicate on the converted value and the requirement
  it expresses (``"must be >= 1"``), reported when the predicate fails;
- ``none``: the TOML spelling of ``None`` for an optional field (default ``""``).

Unknown sections and keys are errors (a typo must not silently fall back to a
default), and every problem is collected before `ConfigError` is raised, so one
run shows them all. Each message reads ``section.key: message``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import tomllib
import types
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

__all__ = [
    "Config",
    "ConfigError",
    "EmbedConfig",
    "InputConfig",
    "LinkConfig",
    "LogConfig",
    "MetadataConfig",
    "OutputConfig",
    "ServiceConfig",
    "SnapshotConfig",
    "StateConfig",
    "WatchConfig",
    "format_config",
    "load_config",
    "parse_colour",
    "parse_config",
    "parse_dataclass",
]

T = TypeVar("T")

LogFormat = Literal["auto", "console", "json", "journald"]
LogLevel = Literal["debug", "info", "warning", "error"]
LinkMethod = Literal["cosine", "track"]


class ConfigError(Exception):
    """Invalid configuration; ``errors`` holds every problem as ``section.key: message``."""

    def __init__(self, errors: list[str], source: str = "") -> None:
        super().__init__("\n".join(errors))
        self.errors = list(errors)
        self.source = source

    def __str__(self) -> str:
        return "\n".join(self.errors)


def _meta(
    doc: str,
    *,
    check: Callable[[Any], bool] | None = None,
    help: str = "",
    none: str = "",
) -> dict[str, Any]:
    """Field metadata for the loader (see the module docstring)."""
    meta: dict[str, Any] = {"doc": doc, "none": none}
    if check is not None:
        meta["check"] = check
        meta["help"] = help
    return meta


# --- value checks -----------------------------------------------------------

_HEX_COLOUR = re.compile(r"#([0-9a-fA-F]{6})")
_RGB_COLOUR = re.compile(r"\s*(\d{1,3})\s*,\s*(\d{1,3})\s*,\s*(\d{1,3})\s*")


def parse_colour(text: str) -> tuple[int, int, int]:
    """Parse ``"#rrggbb"`` or ``"r,g,b"`` (each 0..255) into an RGB triple.

    Raises `ValueError` with the reason when the text is neither.
    """
    if m := _HEX_COLOUR.fullmatch(text):
        h = m.group(1)
        return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)
    if m := _RGB_COLOUR.fullmatch(text):
        r, g, b = (int(x) for x in m.groups())
        if max(r, g, b) > 255:
            raise ValueError(f"colour components must be 0..255, got {text!r}")
        return r, g, b
    raise ValueError(f"expected a colour as '#rrggbb' or 'r,g,b', got {text!r}")


def _is_colour(text: str) -> bool:
    try:
        parse_colour(text)
    except ValueError:
        return False
    return True


def _has_time_directive(text: str) -> bool:
    # Both the strftime style (%Y) and the old doubled style (%YYYY) start with '%'.
    return re.search(r"%[A-Za-z]", text) is not None


_DEVICE = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")


# --- schema -----------------------------------------------------------------


@dataclass(frozen=True)
class InputConfig:
    """Where crops come from and how they are decoded."""

    recursive: bool = field(default=False, metadata=_meta("scan directories recursively"))
    meta_folder: Path | None = field(
        default=None, metadata=_meta('flat-bug metadata folder; "" = no spatio-temporal gating')
    )
    time_format: str = field(
        default="%Y%m%d%H%M%S",
        metadata=_meta(
            "how frame names carry their capture time; strftime (%Y%m%d) or doubled (%YYYY) style",
            check=_has_time_directive,
            help="must contain a % time directive such as %Y",
        ),
    )
    background: str = field(
        default="#808080",
        metadata=_meta(
            'colour transparent crop areas are composited onto, "#rrggbb" or "r,g,b"',
            check=_is_colour,
            help="must be a colour as '#rrggbb' or 'r,g,b' with components 0..255",
        ),
    )
    max_pixels: int = field(
        default=40_000_000,
        metadata=_meta(
            "images with more pixels are refused (decompression bombs), pixels",
            check=lambda v: v >= 1,
            help="must be >= 1",
        ),
    )
    workers: int = field(
        default=2,
        metadata=_meta("decode/preprocess threads", check=lambda v: v >= 1, help="must be >= 1"),
    )

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        """The background colour as an RGB triple."""
        return parse_colour(self.background)


@dataclass(frozen=True)
class EmbedConfig:
    """Which vision model turns crops into vectors, and where it runs."""

    model: str = field(
        default="efficientnet-lite0",
        metadata=_meta(
            "embedder: efficientnet-lite0 | dino | hierarchical",
            check=lambda v: v != "",
            help="must not be empty",
        ),
    )
    from_pretrained: str | None = field(
        default=None,
        metadata=_meta(
            'dino: hub id or folder; hierarchical: TorchScript or state-dict file; "" = default',
        ),
    )
    arch: str | None = field(
        default=None,
        metadata=_meta('hierarchical: architecture name for a state-dict file; "" = none'),
    )
    device: str = field(
        default="auto",
        metadata=_meta(
            "torch device; auto = cuda:0 when available, else cpu",
            check=lambda v: _DEVICE.fullmatch(v) is not None,
            help="must be 'auto', 'cpu', 'mps', 'cuda', 'cuda:N', 'xpu' or 'xpu:N'",
        ),
    )
    batch_size: int = field(
        default=32,
        metadata=_meta("crops per model call", check=lambda v: v >= 1, help="must be >= 1"),
    )
    max_wait_ms: int = field(
        default=200,
        metadata=_meta(
            "run: a micro-batch goes to the model after this long even if not full, ms",
            check=lambda v: v >= 0,
            help="must be >= 0",
        ),
    )
    allow_download: bool = field(
        default=False,
        metadata=_meta("let dino fetch weights from the Hugging Face hub (needs network)"),
    )


@dataclass(frozen=True)
class LinkConfig:
    """How crops are linked into clusters."""

    method: LinkMethod = field(default="cosine", metadata=_meta("cosine | track"))
    threshold: float | None = field(
        default=None,
        metadata=_meta(
            'cosine similarity to link, in [-1, 1]; "auto" = the method\'s default '
            "(cosine: 0.9; track: per embedder)",
            check=lambda v: -1.0 <= v <= 1.0,
            help="must be in [-1, 1]",
            none="auto",
        ),
    )
    max_center_dist_px: float = field(
        default=100.0,
        metadata=_meta(
            "gating: box centres closer than this (pixels) ...",
            check=lambda v: v > 0,
            help="must be > 0",
        ),
    )
    near_window_s: float = field(
        default=300.0,
        metadata=_meta(
            "... and frames closer than this in time (seconds) link",
            check=lambda v: v >= 0,
            help="must be >= 0",
        ),
    )
    any_window_s: float = field(
        default=30.0,
        metadata=_meta(
            "gating: frames closer than this (seconds) link whatever the distance",
            check=lambda v: v >= 0,
            help="must be >= 0",
        ),
    )
    track_gap_s: float = field(
        default=300.0,
        metadata=_meta(
            "track: a cluster stays matchable this long after its last crop, seconds",
            check=lambda v: v >= 0,
            help="must be >= 0",
        ),
    )
    track_gap_frames: int = field(
        default=150,
        metadata=_meta(
            "track: the same in frames, for crops without a time",
            check=lambda v: v >= 0,
            help="must be >= 0",
        ),
    )
    track_memory: int = field(
        default=3,
        metadata=_meta(
            "track: a crop is compared with this many of a cluster's latest crops",
            check=lambda v: v >= 1,
            help="must be >= 1",
        ),
    )
    track_max_move_px: float = field(
        default=300.0,
        metadata=_meta(
            "track, with metadata: a cluster continues only within this distance "
            "of its last box centre, pixels",
            check=lambda v: v > 0,
            help="must be > 0",
        ),
    )
    track_move_penalty: float = field(
        default=0.3,
        metadata=_meta(
            "track, with metadata: similarity taken off a match per max_move of distance, "
            "so near clusters are preferred",
            check=lambda v: v >= 0,
            help="must be >= 0",
        ),
    )
    hnsw_m: int = field(
        default=32,
        metadata=_meta(
            "HNSW graph degree (links per node)", check=lambda v: v >= 2, help="must be >= 2"
        ),
    )
    hnsw_ef_construction: int = field(
        default=100,
        metadata=_meta(
            "HNSW build-time candidate list size",
            check=lambda v: v >= 1,
            help="must be >= 1",
        ),
    )
    hnsw_ef_search: int = field(
        default=128,
        metadata=_meta(
            "HNSW query candidate list size (ef)",
            check=lambda v: v >= 1,
            help="must be >= 1",
        ),
    )


@dataclass(frozen=True)
class OutputConfig:
    """What is written, and where."""

    folder: Path = field(default=Path("out"), metadata=_meta("output folder"))
    gen_cluster_dirs: bool = field(
        default=False, metadata=_meta("copy crops into clusters/<id>/ folders")
    )
    dedup: bool = field(default=False, metadata=_meta("copy one representative crop per cluster"))
    save_embeddings: bool = field(default=True, metadata=_meta("write the embeddings file"))
    save_labels: bool = field(default=False, metadata=_meta("write labels alongside clusters"))


@dataclass(frozen=True)
class LogConfig:
    """Log output."""

    format: LogFormat = field(
        default="auto",
        metadata=_meta(
            "auto | console | json | journald; auto = journald under systemd, else console"
        ),
    )
    level: LogLevel = field(default="info", metadata=_meta("debug | info | warning | error"))


def _positive(v: float) -> bool:
    return v > 0


def _non_negative(v: float) -> bool:
    return v >= 0


@dataclass(frozen=True)
class WatchConfig:
    """run: the crop folder the daemon watches, and when a file counts as ready."""

    folder: Path = field(default=Path("crops"), metadata=_meta("crop folder to watch"))
    recursive: bool = field(
        default=True, metadata=_meta("watch sub-folders too (flat-bug makes one per frame)")
    )
    polling: bool = field(
        default=False,
        metadata=_meta("poll instead of inotify (network, FUSE and SMB mounts send no events)"),
    )
    poll_interval_s: float = field(
        default=2.0,
        metadata=_meta(
            "how often the polling observer looks, seconds",
            check=_positive,
            help="must be > 0",
        ),
    )
    settle_ms: int = field(
        default=500,
        metadata=_meta(
            "a file is ready once its size and mtime are unchanged this long, ms",
            check=_non_negative,
            help="must be >= 0",
        ),
    )
    rescan_s: float = field(
        default=60.0,
        metadata=_meta(
            "full rescan interval, catching events the observer dropped, seconds",
            check=_positive,
            help="must be > 0",
        ),
    )
    decode_retries: int = field(
        default=3,
        metadata=_meta(
            "retries of a crop that does not decode before it is recorded in errors.csv",
            check=_non_negative,
            help="must be >= 0",
        ),
    )
    retry_backoff_s: float = field(
        default=1.0,
        metadata=_meta(
            "wait before the first decode retry, doubled for each further one, seconds",
            check=_non_negative,
            help="must be >= 0",
        ),
    )


@dataclass(frozen=True)
class MetadataConfig:
    """run: flat-bug metadata JSON in the watched tree (box positions)."""

    enabled: bool = field(
        default=False,
        metadata=_meta(
            "read each frame's metadata JSON from the watched tree: gating (cosine) or "
            "motion (track), as -mf does for the batch command"
        ),
    )
    wait_s: float = field(
        default=10.0,
        metadata=_meta(
            "a crop waits this long for its frame's JSON, then links without a box, seconds",
            check=_non_negative,
            help="must be >= 0",
        ),
    )


@dataclass(frozen=True)
class SnapshotConfig:
    """run: how often the output files are rewritten."""

    interval_s: float = field(
        default=10.0,
        metadata=_meta(
            "snapshot interval when something changed, seconds",
            check=_positive,
            help="must be > 0",
        ),
    )


@dataclass(frozen=True)
class StateConfig:
    """run: the durable state that lets the daemon resume."""

    folder: Path = field(
        default=Path("/var/lib/crop-clusterd"),
        metadata=_meta("state folder (SQLite database and the saved index)"),
    )
    index_save_s: float = field(
        default=300.0,
        metadata=_meta(
            "how often the HNSW index is saved when it grew, seconds",
            check=_positive,
            help="must be > 0",
        ),
    )


@dataclass(frozen=True)
class ServiceConfig:
    """run: health checks for systemd."""

    stall_s: float = field(
        default=120.0,
        metadata=_meta(
            "a stage busy on one unit of work longer than this counts as hung and the "
            "systemd watchdog is no longer fed, seconds",
            check=_positive,
            help="must be > 0",
        ),
    )


@dataclass(frozen=True)
class Config:
    """The whole configuration; one field per TOML section."""

    input: InputConfig = field(default_factory=InputConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    link: LinkConfig = field(default_factory=LinkConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    log: LogConfig = field(default_factory=LogConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    metadata: MetadataConfig = field(default_factory=MetadataConfig)
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)
    state: StateConfig = field(default_factory=StateConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)


# --- loading ----------------------------------------------------------------


class _Invalid(Exception):
    """One bad value; the caller prefixes the key.

    A type mismatch carries ``expected`` and ``got`` separately so that an
    optional field can widen ``expected`` with its ``None`` spelling.
    """

    def __init__(self, message: str = "", *, expected: str = "", got: str = "") -> None:
        self.expected = expected
        self.got = got
        super().__init__(message or f"expected {expected}, {got}")


def _toml_repr(value: Any) -> str:
    """Render a value the way TOML would spell it (for messages and output)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str | Path):
        # JSON string escapes are a subset of TOML basic-string escapes.
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_repr(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "a table"
    return repr(value)


def _kind(value: Any) -> str:
    """Name a TOML value's type for messages."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, Mapping):
        return "a table"
    return f"a {type(value).__name__}"


def _got(value: Any) -> str:
    if isinstance(value, Mapping):
        return "got a table"
    return f"got {_kind(value)} ({_toml_repr(value)})"


def _convert(tp: Any, value: Any, none: str) -> Any:
    """Convert one TOML value to the field type ``tp`` or raise `_Invalid`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1 or len(args) != 2:
            raise TypeError(f"unsupported union type {tp!r}; only X | None")
        if value == none and isinstance(value, str):
            return None
        try:
            return _convert(inner[0], value, none)
        except _Invalid as exc:
            if not exc.expected:
                raise
            raise _Invalid(expected=f"{exc.expected} or {json.dumps(none)}", got=exc.got) from None
    if origin is Literal:
        choices = ", ".join(repr(a) for a in args)
        # type() too: TOML true must not match a Literal[1], nor 1 a Literal[True].
        if not any(value == a and type(value) is type(a) for a in args):
            hint = ""
            if isinstance(value, str):
                close = difflib.get_close_matches(value, [str(a) for a in args], n=1)
                if close:
                    hint = f"; did you mean {close[0]!r}?"
            raise _Invalid(f"must be one of {choices}; {_got(value)}{hint}")
        return value
    if origin is tuple:
        if args[-1:] != (Ellipsis,) or len(args) != 2:
            raise TypeError(f"unsupported tuple type {tp!r}; only tuple[X, ...]")
        if not isinstance(value, list):
            raise _Invalid(expected="an array", got=_got(value))
        out = []
        for i, item in enumerate(value):
            try:
                out.append(_convert(args[0], item, none))
            except _Invalid as exc:
                raise _Invalid(f"item {i}: {exc}") from None
        return tuple(out)
    if tp is bool:
        if not isinstance(value, bool):
            raise _Invalid(expected="a boolean (true or false)", got=_got(value))
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(expected="an integer", got=_got(value))
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Invalid(expected="a number", got=_got(value))
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _Invalid(expected="a string", got=_got(value))
        return value
    if tp is Path:
        if not isinstance(value, str):
            raise _Invalid(expected="a path string", got=_got(value))
        if value == "":
            raise _Invalid("expected a path, got an empty string")
        return Path(value).expanduser()
    raise TypeError(f"unsupported config field type {tp!r}")


def _did_you_mean(name: str, candidates: Collection[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _build(cls: type[T], data: Mapping[str, Any], prefix: str, errors: list[str]) -> T | None:
    """Build dataclass ``cls`` from a TOML table; append problems to ``errors``.

    Returns ``None`` when any error was found inside this table.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    before = len(errors)
    what = "section" if prefix == "" else "key"
    for key in data:
        if key not in fields:
            errors.append(f"{prefix}{key}: unknown {what}{_did_you_mean(key, fields)}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            continue
        value, tp, where = data[name], hints[name], f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                errors.append(f"{where}: expected a table ([{where}]), {_got(value)}")
                continue
            sub = _build(typing.cast(type[Any], tp), value, f"{where}.", errors)
            if sub is not None:
                kwargs[name] = sub
            continue
        none = f.metadata.get("none", "")
        try:
            converted = _convert(tp, value, none)
        except _Invalid as exc:
            errors.append(f"{where}: {exc}")
            continue
        check = f.metadata.get("check")
        if converted is not None and check is not None and not check(converted):
            errors.append(f"{where}: {f.metadata['help']}, {_got(value)}")
            continue
        kwargs[name] = converted
    if len(errors) > before:
        return None
    return cls(**kwargs)


def parse_dataclass(cls: type[T], data: Mapping[str, Any], source: str = "<config>") -> T:
    """Build any schema dataclass ``cls`` from parsed TOML ``data``.

    Missing keys take their defaults. Raises `ConfigError` listing every problem.
    """
    errors: list[str] = []
    result = _build(cls, data, "", errors)
    if result is None or errors:
        raise ConfigError(errors, source)
    return result


def parse_config(
    data: Mapping[str, Any],
    source: str = "<config>",
    *,
    embedders: Collection[str] | None = None,
) -> Config:
    """Build a `Config` from parsed TOML ``data`` (``source`` names it in errors).

    When ``embedders`` is given (the embed registry's names), ``embed.model`` must
    be one of them; the list is passed in so importing this module never imports
    torch. Raises `ConfigError` listing every problem.
    """
    errors: list[str] = []
    result = _build(Config, data, "", errors)
    model: Any = EmbedConfig().model
    embed = data.get("embed")
    if isinstance(embed, Mapping):
        model = embed.get("model", model)
    if embedders is not None and isinstance(model, str) and model and model not in embedders:
        choices = ", ".join(repr(e) for e in sorted(embedders))
        errors.append(
            f"embed.model: unknown embedder {model!r}; choose one of {choices}"
            f"{_did_you_mean(model, embedders)}"
        )
    if result is None or errors:
        raise ConfigError(errors, source)
    return result


def load_config(path: Path | str | None, *, embedders: Collection[str] | None = None) -> Config:
    """Read the TOML file at ``path`` into a `Config`; ``None`` gives the defaults.

    Raises `ConfigError` for an unreadable file, a TOML syntax error (with its
    line and column) or any invalid value.
    """
    if path is None:
        return parse_config({}, "<defaults>", embedders=embedders)
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file: {exc.strerror}"], str(path)) from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text: {exc}"], str(path)) from exc
    except tomllib.TOMLDecodeError as exc:
        # The message already ends "(at line N, column M)".
        raise ConfigError([f"{path}: invalid TOML: {exc}"], str(path)) from exc
    return parse_config(data, str(path), embedders=embedders)


# --- rendering --------------------------------------------------------------


def _render_value(value: Any, none: str) -> str:
    if value is None:
        return json.dumps(none)
    if isinstance(value, Path):
        return _toml_repr(value.as_posix())
    return _toml_repr(value)


def format_config(config: Any) -> str:
    """Render a `Config` (or any schema dataclass of sections) as commented TOML.

    ``load``-ing the result gives back an equal config.
    """
    hints = typing.get_type_hints(type(config))
    blocks: list[str] = []
    for section in dataclasses.fields(config):
        value = getattr(config, section.name)
        if not dataclasses.is_dataclass(hints[section.name]):
            raise TypeError(f"{section.name}: top-level config fields must be sections")
        lines = [f"[{section.name}]"]
        for f in dataclasses.fields(value):
            rendered = _render_value(getattr(value, f.name), f.metadata.get("none", ""))
            if doc := f.metadata.get("doc", ""):
                lines.append(f"# {doc}")
            lines.append(f"{f.name} = {rendered}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"
