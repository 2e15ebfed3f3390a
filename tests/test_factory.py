"""The one wiring path: a config setting reaches the batch command's and the daemon's linker.

Both runs build their linker through `crop_clusterd.factory.linker_from_config`,
which logs ``linker_built`` with the settings it built from. A path that built
its linker some other way would log nothing, or other values, and fail here.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from fakes import ColourEmbedder, write_png
from structlog.testing import capture_logs

from crop_clusterd import defaults
from crop_clusterd.batch import BatchRequest, run_batch
from crop_clusterd.config import Config, parse_config
from crop_clusterd.embed import register, unregister
from crop_clusterd.factory import linker_spec, state_settings
from crop_clusterd.supervisor import Daemon


@pytest.fixture(autouse=True)
def colour_embedder() -> Iterator[None]:
    register(ColourEmbedder)
    yield
    unregister(ColourEmbedder.name)


def changed_config(tmp: Path, watch: Path) -> Config:
    """Non-default linker settings, metadata on through ``input.meta_folder`` only."""
    return parse_config(
        {
            "input": {"recursive": True, "meta_folder": str(watch)},
            "embed": {"model": ColourEmbedder.name, "batch_size": 8, "max_wait_ms": 20},
            "link": {
                "threshold": 0.97,
                "near_window_s": 123.0,
                "track_memory": 5,
                "hnsw_ef_search": 77,
            },
            "watch": {"folder": str(watch), "settle_ms": 100, "rescan_s": 1.0},
            "metadata": {"wait_s": 0.2},
            "state": {"folder": str(tmp / "state")},
            "output": {"folder": str(tmp / "out")},
            "snapshot": {"interval_s": 0.5},
        }
    )


def built(logs: Sequence[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == "linker_built"]


def test_a_config_setting_reaches_the_batch_and_the_daemon_linker(tmp_path: Path) -> None:
    watch = tmp_path / "watch"
    for i, rgb in enumerate([(200, 20, 20), (205, 22, 18), (20, 20, 200)]):
        write_png(watch / f"f{i}" / f"crop_2024070122000{i}_CROPNUMBER_0_UUID_A.png", rgb)
    config = changed_config(tmp_path, watch)
    with capture_logs() as batch_logs:
        run_batch(BatchRequest(config, inputs=(str(watch),)))
    with capture_logs() as daemon_logs:
        Daemon(config, exit_when_idle_s=0.5).run()

    expected = {
        "method": "cosine",
        "threshold": 0.97,
        "metadata": True,  # from input.meta_folder alone: the one rule
        "gating": [100.0, 123.0, 30.0],
        "motion": None,
        "hnsw": [32, 100, 77],
        "track": [defaults.TRACK_IDLE_FRAMES, defaults.TRACK_IDLE_CAP_S, 5, defaults.TRACK_MARGIN],
    }
    for logs in (batch_logs, daemon_logs):
        events = built(logs)
        assert len(events) == 1, events
        assert {k: events[0][k] for k in expected} == expected


def test_state_settings_keep_their_keys_and_values() -> None:
    # Existing state folders compare against exactly these; a change refuses them all.
    assert state_settings(Config()) == {
        "embed.model": "efficientnet-lite0",
        "embed.from_pretrained": None,
        "embed.arch": None,
        "input.background": "#808080",
        "input.time_format": "%Y%m%d%H%M%S",
        "link.method": "cosine",
        "link.threshold": 0.9,
        "metadata.enabled": False,
        # Since issue 10; a state folder without them reads as split "none".
        "session.split": "night",
        "session.night_starts_h": 12.0,
    }
    gap = state_settings(parse_config({"session": {"split": "gap", "gap_s": 600.0}}))
    assert gap["session.gap_s"] == 600.0 and "session.night_starts_h" not in gap
    none = state_settings(parse_config({"session": {"split": "none"}}))
    assert none["session.split"] == "none" and "session.gap_s" not in none
    gated = state_settings(parse_config({"metadata": {"enabled": True}}))
    assert gated["metadata.enabled"] is True
    assert gated["link.gating"] == [100.0, 300.0, 30.0]
    track = state_settings(parse_config({"link": {"method": "track"}}))
    assert track["link.threshold"] == defaults.TRACK_THRESHOLDS["efficientnet-lite0"]
    assert track["link.track"] == [
        defaults.TRACK_IDLE_FRAMES,
        defaults.TRACK_IDLE_CAP_S,
        defaults.TRACK_MEMORY,
        defaults.TRACK_MAX_MOVE,
        defaults.TRACK_MOVE_PENALTY,
        defaults.TRACK_MARGIN,
    ]
    # Stitching needs positions: off without metadata, recorded with it.
    assert track["link.track_stitch"] is None
    placed = state_settings(
        parse_config({"link": {"method": "track"}, "metadata": {"enabled": True}})
    )
    assert placed["link.track_stitch"] == [
        defaults.STITCH_THRESHOLD,
        defaults.STITCH_GAP_FRAMES,
        defaults.STITCH_MAX_MOVE,
        defaults.STITCH_CAP_S,
    ]
    assert "link.gating" not in track
    assert "embed.preprocess" not in track


def test_a_dino_state_folder_records_its_square_padding() -> None:
    # dino pads crops to a square since issue 9; a folder built before lacks the
    # key, so it is refused instead of mixing centre-cropped and padded embeddings.
    dino = state_settings(parse_config({"embed": {"model": "dino"}}))
    assert dino["embed.preprocess"] == "pad-square"


def test_spec_resolves_auto_threshold_and_motion() -> None:
    spec = linker_spec(parse_config({"link": {"method": "track"}, "metadata": {"enabled": True}}))
    assert spec.threshold == defaults.TRACK_THRESHOLDS["efficientnet-lite0"]
    assert spec.gating is None
    assert spec.motion is not None and (spec.motion.max_move, spec.motion.penalty) == (
        defaults.TRACK_MAX_MOVE,
        defaults.TRACK_MOVE_PENALTY,
    )
    assert spec.stitch is not None and spec.stitch.threshold == defaults.STITCH_THRESHOLD
