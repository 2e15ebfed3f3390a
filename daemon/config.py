"""Configuration: one TOML file read once at startup into frozen dataclasses.

The schema *is* the dataclasses below; :mod:`crop_clusterd.schema` walks their
fields and type hints, so adding a section means adding a dataclass and a field
on `Config`; nothing else needs to know. Each field's metadata gives its
one-line doc and, where the type is not enough, a named `Check` (`at_least`,
`above`, `within`, ...). Defaults shared with the engines come from
:mod:`crop_clusterd.defaults`. Errors read ``section.key: message``.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from . import defaults
from .schema import (
    Check,
    ConfigError,
    above,
    at_least,
    build_dataclass,
    did_you_mean,
    format_config,
    has_time_directive,
    is_colour,
    matches,
    non_empty,
    parse_colour,
    parse_dataclass,
    within,
)
from .schema import field_meta as _meta
from .textfiles import TextEncodingError, decode_text

__all__ = [
    "Check",
    "Config",
    "ConfigError",
    "EmbedConfig",
    "InputConfig",
    "LinkConfig",
    "LogConfig",
    "MetadataConfig",
    "OutputConfig",
    "ServiceConfig",
    "SessionConfig",
    "SnapshotConfig",
    "StateConfig",
    "WatchConfig",
    "above",
    "at_least",
    "format_config",
    "has_time_directive",
    "is_colour",
    "load_config",
    "matches",
    "non_empty",
    "parse_colour",
    "parse_config",
    "parse_dataclass",
    "read_toml",
    "within",
]

LogFormat = Literal["auto", "console", "json", "journald"]
LogLevel = Literal["debug", "info", "warning", "error"]
LinkMethod = Literal["cosine", "track"]
SessionSplit = Literal["night", "gap", "none"]


_DEVICE = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")


# --- schema -----------------------------------------------------------------


@dataclass(frozen=True)
class InputConfig:
    """Where crops come from and how they are decoded."""

    recursive: bool = field(default=False, metadata=_meta("scan directories recursively"))
    meta_folder: Path | None = field(
        default=None,
        metadata=_meta('batch: flat-bug metadata folder, turns metadata on; "" = none'),
    )
    time_format: str = field(
        default="%Y%m%d%H%M%S",
        metadata=_meta(
            "how frame names carry their capture time; strftime (%Y%m%d) or doubled (%YYYY) style",
            check=has_time_directive,
        ),
    )
    background: str = field(
        default="#808080",
        metadata=_meta(
            'colour transparent crop areas are composited onto, "#rrggbb" or "r,g,b"',
            check=is_colour,
        ),
    )
    max_pixels: int = field(
        default=40_000_000,
        metadata=_meta(
            "images with more pixels are refused (decompression bombs), pixels",
            check=at_least(1),
        ),
    )
    workers: int = field(
        default=2,
        metadata=_meta(
            "decode/preprocess threads",
            check=at_least(1),
        ),
    )

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        """The background colour as an RGB triple."""
        return parse_colour(self.background)


@dataclass(frozen=True)
class EmbedConfig:
    """Which vision model turns crops into vectors, and where it runs."""

    model: str = field(
        default=defaults.DEFAULT_EMBEDDER,
        metadata=_meta(
            "embedder: " + " | ".join(defaults.EMBEDDER_NAMES),
            check=non_empty(),
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
            check=matches(
                _DEVICE, "must be 'auto', 'cpu', 'mps', 'cuda', 'cuda:N', 'xpu' or 'xpu:N'"
            ),
        ),
    )
    batch_size: int = field(
        default=32,
        metadata=_meta(
            "crops per model call",
            check=at_least(1),
        ),
    )
    max_wait_ms: int = field(
        default=200,
        metadata=_meta(
            "run: a micro-batch goes to the model after this long even if not full, ms",
            check=at_least(0),
        ),
    )
    allow_download: bool = field(
        default=False,
        metadata=_meta("let dino fetch weights from the Hugging Face hub (needs network)"),
    )


@dataclass(frozen=True)
class LinkConfig:
    """How crops are linked into clusters."""

    method: LinkMethod = field(
        default=defaults.DEFAULT_METHOD, metadata=_meta(" | ".join(defaults.METHODS))
    )
    threshold: float | None = field(
        default=None,
        metadata=_meta(
            'cosine similarity to link, in [-1, 1]; "auto" = the method\'s default '
            f"(cosine: {defaults.COSINE_THRESHOLD:g}; track: per embedder)",
            check=within(-1.0, 1.0),
            none="auto",
        ),
    )
    max_center_dist_px: float = field(
        default=defaults.MAX_CENTER_DIST_PX,
        metadata=_meta(
            "gating: box centres closer than this (pixels) ...",
            check=above(0),
        ),
    )
    near_window_s: float = field(
        default=defaults.NEAR_WINDOW_S,
        metadata=_meta(
            "... and frames closer than this in time (seconds) link",
            check=at_least(0),
        ),
    )
    any_window_s: float = field(
        default=defaults.ANY_WINDOW_S,
        metadata=_meta(
            "gating: frames closer than this (seconds) link whatever the distance",
            check=at_least(0),
        ),
    )
    track_idle_frames: int = field(
        default=defaults.TRACK_IDLE_FRAMES,
        metadata=_meta(
            "track: a track stays matchable this many frames of its own trap after its last crop",
            check=at_least(0),
        ),
    )
    track_idle_cap_s: float = field(
        default=defaults.TRACK_IDLE_CAP_S,
        metadata=_meta(
            "track: ... and at most this long (capture time, when known), seconds",
            check=at_least(0),
        ),
    )
    track_memory: int = field(
        default=defaults.TRACK_MEMORY,
        metadata=_meta(
            "track: a crop is compared with this many of a track's latest crops",
            check=at_least(1),
        ),
    )
    track_margin: float = field(
        default=defaults.TRACK_MARGIN,
        metadata=_meta(
            "track: a match is made only when similarity - move penalty - margin > 0 "
            "(better than starting a new track)",
            check=at_least(0),
        ),
    )
    track_max_move: float = field(
        default=defaults.TRACK_MAX_MOVE,
        metadata=_meta(
            "track, with metadata: a track continues only within this fraction of the "
            "frame diagonal of its last box centre",
            check=within(1e-6, 1.0),
        ),
    )
    track_move_penalty: float = field(
        default=defaults.TRACK_MOVE_PENALTY,
        metadata=_meta(
            "track, with metadata: similarity taken off a match per max_move of distance, "
            "so near tracks are preferred",
            check=at_least(0),
        ),
    )
    track_stitch: bool = field(
        default=True,
        metadata=_meta("track, with metadata: join tracklets in a second pass (merges)"),
    )
    track_stitch_threshold: float = field(
        default=defaults.STITCH_THRESHOLD,
        metadata=_meta(
            "track: two tracklets join when their mean embeddings are at least this similar",
            check=within(-1.0, 1.0),
        ),
    )
    track_stitch_gap_frames: int = field(
        default=defaults.STITCH_GAP_FRAMES,
        metadata=_meta(
            "track: a tracklet may continue one that ended at most this many frames "
            "of its trap before",
            check=at_least(0),
        ),
    )
    track_stitch_cap_s: float = field(
        default=defaults.STITCH_CAP_S,
        metadata=_meta("track: ... and at most this long before, seconds", check=at_least(0)),
    )
    track_stitch_max_move: float = field(
        default=defaults.STITCH_MAX_MOVE,
        metadata=_meta(
            "track: ... and within this fraction of the frame diagonal of where it ended",
            check=within(1e-6, 1.0),
        ),
    )
    hnsw_m: int = field(
        default=defaults.HNSW_M,
        metadata=_meta(
            "HNSW graph degree (links per node)",
            check=at_least(2),
        ),
    )
    hnsw_ef_construction: int = field(
        default=defaults.HNSW_EF_CONSTRUCTION,
        metadata=_meta(
            "HNSW build-time candidate list size",
            check=at_least(1),
        ),
    )
    hnsw_ef_search: int = field(
        default=defaults.HNSW_EF_SEARCH,
        metadata=_meta(
            "HNSW query candidate list size (ef)",
            check=at_least(1),
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
    save_embeddings: bool = field(
        default=True,
        metadata=_meta(
            "write the embeddings: embeddings.pkl (the daemon: at session close and stop) "
            "and, from the daemon, appended embeddings/ Parquet parts"
        ),
    )
    save_labels: bool = field(default=False, metadata=_meta("write labels alongside clusters"))
    gallery: bool = field(
        default=True,
        metadata=_meta(
            "the daemon: write each session's cluster gallery (index.html, gallery/, "
            "thumbs/) with its snapshots; the batch command writes it with --gallery"
        ),
    )


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
            check=above(0),
        ),
    )
    settle_ms: int = field(
        default=500,
        metadata=_meta(
            "a file is ready once its size and mtime are unchanged this long, ms",
            check=at_least(0),
        ),
    )
    rescan_s: float = field(
        default=60.0,
        metadata=_meta(
            "rescan interval, catching events the observer dropped (lists only folders "
            "whose mtime changed), seconds",
            check=above(0),
        ),
    )
    freeze_after_s: float = field(
        default=defaults.FREEZE_AFTER_S,
        metadata=_meta(
            "rescans and the first scan after a start skip folders in which nothing "
            "changed for this long (old nights); events and the verify walk still see "
            "them, seconds",
            check=above(0),
        ),
    )
    decode_retries: int = field(
        default=3,
        metadata=_meta(
            "retries of a crop that does not decode before it is recorded in errors.csv",
            check=at_least(0),
        ),
    )
    retry_backoff_s: float = field(
        default=1.0,
        metadata=_meta(
            "wait before the first decode retry, doubled for each further one, seconds",
            check=at_least(0),
        ),
    )


@dataclass(frozen=True)
class MetadataConfig:
    """run: flat-bug metadata JSON in the watched tree (box positions)."""

    enabled: bool = field(
        default=False,
        metadata=_meta(
            "metadata on (also when input.meta_folder is set): gating (cosine) or motion "
            "(track); run reads each frame's JSON from the watched tree"
        ),
    )
    wait_s: float = field(
        default=10.0,
        metadata=_meta(
            "a crop waits this long for its frame's JSON, then links without a box, seconds",
            check=at_least(0),
        ),
    )


@dataclass(frozen=True)
class SnapshotConfig:
    """run: how often the open session's output files are written."""

    interval_s: float = field(
        default=10.0,
        metadata=_meta(
            "snapshot interval when something changed, seconds",
            check=above(0),
        ),
    )


@dataclass(frozen=True)
class StateConfig:
    """run: the durable state that lets the daemon resume."""

    folder: Path = field(
        default=Path("/var/lib/crop-clusterd"),
        metadata=_meta(
            "state folder (SQLite database, saved index, daemon.lock: one daemon per folder)"
        ),
    )
    index_save_s: float = field(
        default=300.0,
        metadata=_meta(
            "how often the HNSW index (cosine) or the checkpoint (track) is saved "
            "when it grew, seconds",
            check=above(0),
        ),
    )
    min_free_mb: int = field(
        default=1024,
        metadata=_meta(
            "below this much free space in the state or output folder the daemon warns "
            "(log disk_low, STATUS= DISK LOW), MB",
            check=at_least(0),
        ),
    )
    keep_sessions: int = field(
        default=0,
        metadata=_meta(
            "stored vectors are kept for the newest this many closed sessions and dropped "
            "for older ones (their outputs stay); 0 keeps all",
            check=at_least(0),
        ),
    )


@dataclass(frozen=True)
class SessionConfig:
    """Sessions: the unit of the outputs (a night, by default). Clusters never span two."""

    split: SessionSplit | None = field(
        default=None,
        metadata=_meta(
            'night | gap | none; "auto" = night for run, none for cluster '
            "(old command lines give old results)",
            none="auto",
        ),
    )
    night_starts_h: float = field(
        default=defaults.NIGHT_STARTS_H,
        metadata=_meta(
            "night: a night runs from this local hour of the frames' capture time to the "
            "same hour the next day, hours",
            check=within(0.0, 23.999),
        ),
    )
    gap_s: float = field(
        default=defaults.SESSION_GAP_S,
        metadata=_meta(
            "gap: a new session starts after this long without crops (capture time), seconds",
            check=above(0),
        ),
    )
    close_after_s: float = field(
        default=defaults.SESSION_CLOSE_AFTER_S,
        metadata=_meta(
            "run: the open session is closed (final files, summary.json) after this long "
            "without new crops, seconds",
            check=above(0),
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
            check=above(0),
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
    session: SessionConfig = field(default_factory=SessionConfig)

    @property
    def with_metadata(self) -> bool:
        """Whether crops carry flat-bug box positions: gating (cosine), motion (track).

        The one rule for the batch command and the daemon: on when
        ``metadata.enabled`` is true or ``input.meta_folder`` is set.
        """
        return self.metadata.enabled or self.input.meta_folder is not None


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
    data = _without_replaced_keys(data, errors)
    result = build_dataclass(Config, data, "", errors)
    model: Any = EmbedConfig().model
    embed = data.get("embed")
    if isinstance(embed, Mapping):
        model = embed.get("model", model)
    if embedders is not None and isinstance(model, str) and model and model not in embedders:
        choices = ", ".join(repr(e) for e in sorted(embedders))
        errors.append(
            f"embed.model: unknown embedder {model!r}; choose one of {choices}"
            f"{did_you_mean(model, embedders)}"
        )
    if result is None or errors:
        raise ConfigError(errors, source)
    return result


# Keys replaced in issue 11, and what replaced them: refused with that message,
# since reading them the old way would silently change what a track is.
REPLACED_KEYS: Final = {
    "track_gap_s": "link.track_idle_cap_s (seconds) with link.track_idle_frames",
    "track_gap_frames": "link.track_idle_frames (frames of the track's own trap)",
    "track_max_move_px": "link.track_max_move (a fraction of the frame diagonal)",
}


def _without_replaced_keys(data: Mapping[str, Any], errors: list[str]) -> Mapping[str, Any]:
    """``data`` without replaced ``link`` keys, each reported in ``errors``."""
    link = data.get("link")
    if not isinstance(link, Mapping) or not REPLACED_KEYS.keys() & link.keys():
        return data
    for key in sorted(REPLACED_KEYS.keys() & link.keys()):
        errors.append(f"link.{key}: no longer a setting; use {REPLACED_KEYS[key]}")
    kept = {k: v for k, v in link.items() if k not in REPLACED_KEYS}
    return {**data, "link": kept}


def read_toml(path: Path | str) -> dict[str, Any]:
    """The TOML file at ``path`` as a plain mapping, not validated yet.

    A byte-order mark and CRLF line ends are accepted (`textfiles.decode_text`).
    Raises `ConfigError` for an unreadable file, text that is not UTF-8 (or
    UTF-16 with a BOM) or a TOML syntax error (with its line and column).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file: {exc.strerror}"], str(path)) from exc
    try:
        return tomllib.loads(decode_text(raw, path))
    except TextEncodingError as exc:
        raise ConfigError([str(exc)], str(path)) from exc
    except tomllib.TOMLDecodeError as exc:
        # The message already ends "(at line N, column M)".
        raise ConfigError([f"{path}: invalid TOML: {exc}"], str(path)) from exc


def load_config(path: Path | str | None, *, embedders: Collection[str] | None = None) -> Config:
    """Read the TOML file at ``path`` into a `Config`; ``None`` gives the defaults.

    Raises `ConfigError` as `read_toml` does, or listing every invalid value.
    """
    if path is None:
        return parse_config({}, "<defaults>", embedders=embedders)
    return parse_config(read_toml(path), str(path), embedders=embedders)
