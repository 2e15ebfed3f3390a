"""A stop writes no index below the index size, and then says none was saved.

Every stop used to log ``index_saved crops=0`` while no index file was written.
``track`` writes its checkpoint instead, and says so.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes import ColourEmbedder
from structlog.testing import capture_logs
from test_supervisor import crops_in, make_config, run_daemon, session

from crop_clusterd.embed import register, unregister
from crop_clusterd.linking.trackstate import checkpoint_path
from crop_clusterd.store import index_path


@pytest.fixture(autouse=True)
def colour_embedder() -> Iterator[None]:
    register(ColourEmbedder)
    yield
    unregister(ColourEmbedder.name)


def test_stop_below_the_index_size_logs_no_index_saved(tmp_path: Path) -> None:
    watch = session(tmp_path, frames=3)
    config = make_config(tmp_path, watch, "cosine")
    with capture_logs() as logs:
        summary = run_daemon(config)
    assert summary.crops == len(crops_in(watch)) > 0
    events = [e["event"] for e in logs]
    assert "daemon_started" in events  # the capture saw the run
    assert "index_saved" not in events
    assert not index_path(config.state.folder).exists()


def test_track_saves_its_checkpoint_at_stop_and_resumes_from_it(tmp_path: Path) -> None:
    """``track`` keeps no HNSW index but a checkpoint of its own, which the next
    start uses instead of replaying every stored micro-batch."""
    watch = session(tmp_path, frames=3)
    config = make_config(tmp_path, watch, "track")
    with capture_logs() as logs:
        summary = run_daemon(config)
    saved = [e for e in logs if e["event"] == "index_saved"]
    assert len(saved) == 1 and saved[0]["crops"] == summary.crops > 0
    (night,) = summary.sessions  # each session has its own checkpoint
    assert not index_path(config.state.folder, night).exists()
    assert checkpoint_path(index_path(config.state.folder, night)).is_file()
    with capture_logs() as logs:
        again = run_daemon(config)
    (restored,) = [e for e in logs if e["event"] == "state_restored"]
    assert restored["saved_index"] is True and restored["crops"] == summary.crops
    assert not [e for e in logs if e["event"] in ("track_checkpoint_unused", "replay_differs")]
    assert again.crops == summary.crops and again.new_crops == 0
