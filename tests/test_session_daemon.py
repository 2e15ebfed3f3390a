"""Sessions through the daemon (issue 10): two nights of simulated frames.

Live equals batch per session (``cosine`` and ``track``), across a night boundary
and across a restart inside a night; each crop is in exactly one night's
``clusters.csv``; a closed night's files are final and carry ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from fakes import ColourEmbedder
from test_supervisor import crops_in, frame_dirs, make_config, partition

from crop_clusterd.batch import BatchRequest, run_batch
from crop_clusterd.config import Config, SessionConfig
from crop_clusterd.csvfiles import read_clusters_csv
from crop_clusterd.embed import register, unregister
from crop_clusterd.simulate import SimConfig, simulate
from crop_clusterd.store import StateStore
from crop_clusterd.supervisor import Daemon

NIGHTS = ("2024-07-01", "2024-07-02")


@pytest.fixture(autouse=True)
def colour_embedder() -> Iterator[None]:
    register(ColourEmbedder)
    yield
    unregister(ColourEmbedder.name)


def two_nights(tmp: Path, frames: int = 10) -> list[Path]:
    """Frames of two nights (22:00 on, every 2 s), the second night's after the first's."""
    out: list[Path] = []
    for k, night in enumerate(NIGHTS):
        start = datetime.fromisoformat(f"{night}T22:00:00")
        src = tmp / f"src{k}"
        simulate(
            SimConfig(
                seed=11 + k, frames=frames, mean_present=5.0, start=start, behaviour="classic"
            ),
            src,
        )
        out += frame_dirs(src)
    return out


def night_config(tmp: Path, watch: Path, method: str) -> Config:
    c = make_config(tmp, watch, method, metadata=True)
    return dataclasses.replace(c, session=SessionConfig(split="night"))


def night_rows(config: Config, night: str) -> list[tuple[str, int]]:
    return read_clusters_csv(config.output.folder / night / "clusters.csv")


def batch_nights(config: Config, watch: Path, tmp: Path) -> dict[str, set[frozenset[str]]]:
    out = tmp / "batch-out"
    batch = dataclasses.replace(config, output=dataclasses.replace(config.output, folder=out))
    run_batch(BatchRequest(batch, inputs=(str(watch),)))
    return {
        n: partition(read_clusters_csv(out / n / "clusters.csv"))
        for n in NIGHTS
        if (out / n).is_dir()
    }


def copy_frames(frames: list[Path], watch: Path) -> None:
    for frame in frames:
        shutil.copytree(frame, watch / frame.name)


def daemon_over_two_nights(tmp: Path) -> Config:
    """Two short nights run through a daemon (``cosine``) until idle; its config."""
    frames = two_nights(tmp, frames=4)
    watch = tmp / "watch"
    watch.mkdir()
    config = night_config(tmp, watch, "cosine")
    copy_frames(frames, watch)
    Daemon(config, exit_when_idle_s=1.0).run()
    return config


@pytest.mark.parametrize("method", ["cosine", "track"])
def test_live_equals_batch_per_night_across_the_boundary_and_a_restart(
    tmp_path: Path, method: str
) -> None:
    frames = two_nights(tmp_path)
    watch = tmp_path / "watch"
    watch.mkdir()
    config = night_config(tmp_path, watch, method)
    # Night 1 in two runs (a restart inside the night), then night 2.
    first_night = [f for f in frames if f.name.startswith("20240701")]
    copy_frames(first_night[:5], watch)
    Daemon(config, exit_when_idle_s=1.0).run()
    copy_frames(first_night[5:], watch)
    Daemon(config, exit_when_idle_s=1.0).run()
    copy_frames([f for f in frames if f not in first_night], watch)
    summary = Daemon(config, exit_when_idle_s=1.0).run()
    assert summary.sessions == NIGHTS  # night 1 was open at start, night 2 opened

    live = {n: night_rows(config, n) for n in NIGHTS}
    names = [name for rows in live.values() for name, _ in rows]
    assert sorted(names) == sorted(crops_in(watch)), "each crop in one night, once"
    for night, rows in live.items():
        assert {n.split("/")[-3][:8] for n, _ in rows} == {night.replace("-", "")}
    assert {n: partition(r) for n, r in live.items()} == batch_nights(config, watch, tmp_path)
    with StateStore(config.state.folder, readonly=True) as store:
        sessions = {s.id: s for s in store.sessions()}
    assert sessions[NIGHTS[0]].closed is not None and sessions[NIGHTS[1]].closed is None


def test_a_closed_night_is_final_and_summarised(tmp_path: Path) -> None:
    frames = two_nights(tmp_path, frames=6)
    watch = tmp_path / "watch"
    watch.mkdir()
    config = night_config(tmp_path, watch, "cosine")
    copy_frames([f for f in frames if f.name.startswith("20240701")], watch)
    Daemon(config, exit_when_idle_s=1.0).run()
    copy_frames([f for f in frames if f.name.startswith("20240702")], watch)
    Daemon(config, exit_when_idle_s=1.0).run()
    night1 = config.output.folder / NIGHTS[0]
    summary = night1 / "summary.json"
    assert summary.exists()
    before = {p.name: p.stat().st_mtime_ns for p in night1.iterdir() if p.is_file()}
    # A third run that adds nothing to night 1 leaves its files alone.
    Daemon(config, exit_when_idle_s=1.0).run()
    after = {p.name: p.stat().st_mtime_ns for p in night1.iterdir() if p.is_file()}
    assert after == before
    current = config.output.folder / "current"
    assert current.is_symlink() and current.resolve() == (config.output.folder / NIGHTS[1])


def test_track_stitches_live_equal_batch_across_a_restart(tmp_path: Path) -> None:
    """Short idle limit and stitch window: tracklets close and stitch (merges)
    before and after a restart inside the night; live still equals batch, and
    the stitches are in the store's merges (merges.csv)."""
    src = tmp_path / "src"
    start = datetime.fromisoformat(f"{NIGHTS[0]}T22:00:00")
    simulate(SimConfig(seed=3, frames=40, mean_present=5.0, start=start), src)
    frames = frame_dirs(src)
    watch = tmp_path / "watch"
    watch.mkdir()
    config = night_config(tmp_path, watch, "track")
    link = dataclasses.replace(
        config.link,
        threshold=0.95,
        track_idle_frames=1,
        track_stitch_gap_frames=3,
        track_stitch_threshold=0.9,
        track_stitch_max_move=0.3,
    )
    config = dataclasses.replace(config, link=link)
    copy_frames(frames[:20], watch)
    Daemon(config, exit_when_idle_s=1.0).run()
    with StateStore(config.state.folder, readonly=True) as store:
        before = len(store.load_merges())
    copy_frames(frames[20:], watch)
    Daemon(config, exit_when_idle_s=1.0).run()
    with StateStore(config.state.folder, readonly=True) as store:
        after = len(store.load_merges())
        sizes = store.load_crops().sizes
    assert 0 < before < after, "stitches on both sides of the restart"
    # The frame size reached the state (the simulator's metadata has it), so a
    # restart's linker sees the move limits the first one used.
    assert (sizes == [4000.0, 3000.0]).all()
    live = partition(night_rows(config, NIGHTS[0]))
    assert live == batch_nights(config, watch, tmp_path)[NIGHTS[0]]
