"""The one wiring path from a `Config` to the engines.

The batch command, the daemon and the benchmark scripts all build their linker
with `linker_from_config` and their embedder with `embedder_from_config`, so a
setting in the config means the same thing everywhere. `state_settings` is
what a daemon's state folder records and must match on the next start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import defaults
from .config import Config
from .defaults import default_threshold
from .linking import Gating, HnswParams, Linker, Motion, Stitch, make_linker
from .log import get_logger
from .sessions import session_rule

if TYPE_CHECKING:
    from .embed import Embedder

__all__ = [
    "LinkerSpec",
    "embedder_from_config",
    "linker_from_config",
    "linker_spec",
    "state_settings",
]

log = get_logger(__name__)


@dataclass(frozen=True)
class LinkerSpec:
    """What a linker is built from, every default and ``auto`` resolved.

    ``threshold`` is a cosine similarity in [-1, 1]; ``metadata`` is
    `Config.with_metadata`; ``gating`` is set only for ``cosine`` with
    metadata, ``motion`` and ``stitch`` only for ``track`` with metadata
    (stitching needs positions). ``idle_frames``, ``idle_cap_s`` (seconds),
    ``memory`` (crops) and ``margin`` apply to ``track``, ``hnsw`` to ungated
    ``cosine``.
    """

    method: str
    threshold: float
    metadata: bool
    gating: Gating | None
    motion: Motion | None
    stitch: Stitch | None
    hnsw: HnswParams
    idle_frames: int
    idle_cap_s: float
    memory: int
    margin: float


def linker_spec(config: Config) -> LinkerSpec:
    """Resolve the linker settings of ``config`` (no engine is built)."""
    link = config.link
    threshold = link.threshold
    if threshold is None:
        threshold = default_threshold(link.method, config.embed.model)
    metadata = config.with_metadata
    gating = None
    motion = None
    stitch = None
    if metadata and link.method == "cosine":
        gating = Gating(link.max_center_dist_px, link.near_window_s, link.any_window_s)
    if metadata and link.method == "track":
        motion = Motion(link.track_max_move, link.track_move_penalty)
        if link.track_stitch:
            stitch = Stitch(
                link.track_stitch_threshold,
                link.track_stitch_gap_frames,
                link.track_stitch_max_move,
                link.track_stitch_cap_s,
            )
    return LinkerSpec(
        method=link.method,
        threshold=threshold,
        metadata=metadata,
        gating=gating,
        motion=motion,
        stitch=stitch,
        hnsw=HnswParams(
            m=link.hnsw_m,
            ef_construction=link.hnsw_ef_construction,
            ef_search=link.hnsw_ef_search,
        ),
        idle_frames=link.track_idle_frames,
        idle_cap_s=link.track_idle_cap_s,
        memory=link.track_memory,
        margin=link.track_margin,
    )


def linker_from_config(config: Config) -> Linker:
    """The empty linker ``config`` asks for; logs ``linker_built`` with its settings.

    Raises `ValueError` for an unknown method (the config loader refuses one first).
    """
    spec = linker_spec(config)
    linker = make_linker(
        spec.method,
        spec.threshold,
        spec.gating,
        idle_frames=spec.idle_frames,
        idle_cap_s=spec.idle_cap_s,
        memory=spec.memory,
        margin=spec.margin,
        motion=spec.motion,
        stitch=spec.stitch,
        hnsw=spec.hnsw,
    )
    log.info(
        "linker_built",
        method=spec.method,
        threshold=spec.threshold,
        metadata=spec.metadata,
        gating=None if spec.gating is None else _gating_list(spec.gating),
        motion=None if spec.motion is None else [spec.motion.max_move, spec.motion.penalty],
        stitch=None if spec.stitch is None else _stitch_list(spec.stitch),
        hnsw=[spec.hnsw.m, spec.hnsw.ef_construction, spec.hnsw.ef_search],
        track=[spec.idle_frames, spec.idle_cap_s, spec.memory, spec.margin],
    )
    return linker


def state_settings(config: Config) -> dict[str, object]:
    """The settings a daemon's state folder records and must match on restart.

    Keys are ``section.key`` names; the values are JSON-able. A change here
    makes every existing state folder refuse to start, so keys and values stay
    as they are.
    """
    spec = linker_spec(config)
    link = config.link
    settings: dict[str, object] = {
        "embed.model": config.embed.model,
        "embed.from_pretrained": config.embed.from_pretrained,
        "embed.arch": config.embed.arch,
        "input.background": config.input.background,
        "input.time_format": config.input.time_format,
        "link.method": spec.method,
        "link.threshold": spec.threshold,
        "metadata.enabled": spec.metadata,
    }
    if spec.gating is not None:
        settings["link.gating"] = _gating_list(spec.gating)
    rule = session_rule(config, "run")
    # Where sessions split decides every id in the state; a state from before
    # sessions reads as "none" (StateStore.check_settings).
    settings["session.split"] = rule.split
    if rule.split == "night":
        settings["session.night_starts_h"] = rule.night_starts_h
    elif rule.split == "gap":
        settings["session.gap_s"] = rule.gap_s
    if config.embed.model == "dino":
        # Only dino's preparation changed; other state folders keep their keys.
        settings["embed.preprocess"] = defaults.DINO_PREPROCESS
    if spec.method == "track":
        # Issue 11 replaced the gap and pixel limits: a state folder written
        # before holds other values here and refuses to resume with these.
        settings["link.track"] = [
            link.track_idle_frames,
            link.track_idle_cap_s,
            link.track_memory,
            link.track_max_move,
            link.track_move_penalty,
            link.track_margin,
        ]
        settings["link.track_stitch"] = None if spec.stitch is None else _stitch_list(spec.stitch)
    return settings


def embedder_from_config(config: Config) -> Embedder:
    """The embedder ``config`` names, not loaded yet (``load()`` is lazy).

    Raises `ValueError` for a name the embed registry does not know.
    """
    # Imported here: torch takes seconds to import and --from-embeddings needs none of it.
    from .embed import EmbedderOptions, create_embedder

    return create_embedder(
        config.embed.model,
        EmbedderOptions(
            model=config.embed.from_pretrained,
            arch=config.embed.arch,
            device=config.embed.device,
            allow_download=config.embed.allow_download,
            background=config.input.background_rgb,
        ),
    )


def _stitch_list(stitch: Stitch) -> list[float]:
    return [stitch.threshold, stitch.gap_frames, stitch.max_move, stitch.cap_s]


def _gating_list(gating: Gating) -> list[float]:
    return [gating.max_center_dist_px, gating.near_window_s, gating.any_window_s]
