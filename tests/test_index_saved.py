"""A stop writes no index below the index size, and then says none was saved.

Every stop used to log ``index_saved crops=0`` while no index file was written.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes import ColourEmbedder
from structlog.testing import capture_logs
from test_supervisor import crops_in, make_config, run_daemon, session

from crop_clusterd.embed import register, unregister
from crop_clusterd.store import index_path


@pytest.fixture(autouse=True)
def colour_embedder() -> Iterator[None]:
    register(ColourEmbedder)
    yield
    unregister(ColourEmbedder.name)


@pytest.mark.parametrize("method", ["cosine", "track"])
def test_stop_below_the_index_size_logs_no_index_saved(tmp_path: Path, method: str) -> None:
    watch = session(tmp_path, frames=3)
    config = make_config(tmp_path, watch, method)
    with capture_logs() as logs:
        summary = run_daemon(config)
    assert summary.crops == len(crops_in(watch)) > 0
    events = [e["event"] for e in logs]
    assert "daemon_started" in events  # the capture saw the run
    assert "index_saved" not in events
    assert not index_path(config.state.folder).exists()
