"""The daemon end to end: real observer, real state folder, real snapshots.

The embedder is the colour fake (deterministic and instant), so what is tested
is the service: live results equal the batch command's, restarts resume, a
SIGKILL loses and duplicates nothing.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fakes import ColourEmbedder

from crop_clusterd.batch import BatchRequest, run_batch
from crop_clusterd.config import Config
from crop_clusterd.csvfiles import read_clusters_csv
from crop_clusterd.embed import EmbedderOptions, register, unregister
from crop_clusterd.simulate import SimConfig, simulate
from crop_clusterd.store import StateStore
from crop_clusterd.supervisor import Daemon, RunSummary

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def colour_embedder() -> Iterator[None]:
    register(ColourEmbedder)
    yield
    unregister(ColourEmbedder.name)


def make_config(
    tmp: Path, watch: Path, method: str = "cosine", *, metadata: bool = False
) -> Config:
    """A fast daemon config on tmp folders; the same settings serve the batch run."""
    c = Config()
    threshold = 0.98 if method == "cosine" else 0.9
    return dataclasses.replace(
        c,
        input=dataclasses.replace(c.input, recursive=True, meta_folder=watch if metadata else None),
        embed=dataclasses.replace(c.embed, model="colour-test", batch_size=8, max_wait_ms=50),
        link=dataclasses.replace(c.link, method=method, threshold=threshold),  # type: ignore[arg-type]
        watch=dataclasses.replace(c.watch, folder=watch, settle_ms=150, rescan_s=1.0),
        metadata=dataclasses.replace(c.metadata, enabled=metadata, wait_s=3.0),
        state=dataclasses.replace(c.state, folder=tmp / "state"),
        output=dataclasses.replace(c.output, folder=tmp / "out"),
        snapshot=dataclasses.replace(c.snapshot, interval_s=0.5),
        # Outputs directly in the output folder; tests of sessions ask for nights.
        session=dataclasses.replace(c.session, split="none"),
    )


def partition(rows: list[tuple[str, int]]) -> set[frozenset[str]]:
    groups: dict[int, set[str]] = {}
    for name, cluster in rows:
        groups.setdefault(cluster, set()).add(name)
    return {frozenset(g) for g in groups.values()}


def batch_partition(config: Config, watch: Path, tmp: Path) -> set[frozenset[str]]:
    out = tmp / "batch-out"
    batch_config = dataclasses.replace(
        config, output=dataclasses.replace(config.output, folder=out)
    )
    run_batch(BatchRequest(batch_config, inputs=(str(watch),)))
    return partition(read_clusters_csv(out / "clusters.csv"))


def session(tmp: Path, frames: int = 12, seed: int = 5) -> Path:
    """A simulated trap session (flat-bug layout: one folder per frame)."""
    src = tmp / "session"
    simulate(SimConfig(seed=seed, frames=frames, mean_present=6.0), src)
    return src


def frame_dirs(src: Path) -> list[Path]:
    return sorted(p for p in src.iterdir() if p.is_dir())


def run_daemon(config: Config, idle_s: float = 1.0) -> RunSummary:
    return Daemon(config, exit_when_idle_s=idle_s).run()


def wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def crops_in(folder: Path) -> set[str]:
    return {str(p) for p in folder.rglob("*.png")}


@pytest.mark.parametrize("method", ["cosine", "track"])
def test_files_present_before_start_equal_the_batch_result(tmp_path: Path, method: str) -> None:
    watch = session(tmp_path)
    config = make_config(tmp_path, watch, method, metadata=True)
    summary = run_daemon(config)
    rows = read_clusters_csv(config.output.folder / "clusters.csv")
    assert sorted(n for n, _ in rows) == sorted(crops_in(watch))
    live = partition(rows)
    assert 1 < len(live) < len(rows), "a trivial partition would prove nothing"
    assert live == batch_partition(config, watch, tmp_path)
    assert summary.crops == len(rows) and summary.new_crops == len(rows)


@pytest.mark.parametrize("method", ["cosine", "track"])
def test_frames_landing_live_equal_the_batch_result(tmp_path: Path, method: str) -> None:
    """Frames arrive one by one in time order, each in a new sub-folder, the JSON
    after its crops; the observer (not the start-up scan) finds them."""
    src = session(tmp_path, frames=10, seed=7)
    watch = tmp_path / "watch"
    watch.mkdir()
    config = make_config(tmp_path, watch, method, metadata=True)
    daemon = Daemon(config, exit_when_idle_s=None)
    result: list[RunSummary] = []
    runner = threading.Thread(target=lambda: result.append(daemon.run()))
    runner.start()
    try:
        wait_for(lambda: (config.state.folder / "state.sqlite3").exists())
        for frame in frame_dirs(src):
            dest = watch / frame.name
            crops = sorted((frame / "crops").glob("*.png"))
            (dest / "crops").mkdir(parents=True)
            for crop in crops:
                shutil.copy(crop, dest / "crops" / crop.name)
            for meta in frame.glob("metadata_*.json"):
                shutil.copy(meta, dest / meta.name)
            # The next frame lands once this one is assigned (frames in time order).
            expected = len(crops_in(watch))
            wait_for(committed_at_least(config, expected))
    finally:
        daemon.request_stop()
        runner.join(60)
    rows = read_clusters_csv(config.output.folder / "clusters.csv")
    assert sorted(n for n, _ in rows) == sorted(crops_in(watch))
    assert partition(rows) == batch_partition(config, watch, tmp_path)


def committed_at_least(config: Config, n: int) -> Callable[[], bool]:
    """A condition for `wait_for`: at least ``n`` crops are committed."""
    return lambda: committed(config) >= n


def committed(config: Config) -> int:
    try:
        with StateStore(config.state.folder, readonly=True) as store:
            return store.counts().crops
    except Exception:
        return 0


def test_half_written_crop_waits_until_complete(tmp_path: Path) -> None:
    src = session(tmp_path, frames=2)
    watch = tmp_path / "watch"
    (watch / "f").mkdir(parents=True)
    crop = sorted(src.rglob("*.png"))[0]
    data = crop.read_bytes()
    config = make_config(tmp_path, watch)
    daemon = Daemon(config)
    runner = threading.Thread(target=daemon.run)
    runner.start()
    try:
        wait_for(lambda: (config.state.folder / "state.sqlite3").exists())
        target = watch / "f" / crop.name
        with open(target, "wb") as fh:
            # Written in chunks slower than nothing but faster than settle_ms.
            for start in range(0, len(data), max(1, len(data) // 6)):
                fh.write(data[start : start + max(1, len(data) // 6)])
                fh.flush()
                time.sleep(0.05)
        wait_for(lambda: committed(config) == 1)
    finally:
        daemon.request_stop()
        runner.join(60)
    rows = read_clusters_csv(config.output.folder / "clusters.csv")
    assert [n for n, _ in rows] == [str(target)]
    errors = (config.output.folder / "errors.csv").read_text().splitlines()
    assert errors == ["filename,reason"]


class CountingEmbedder(ColourEmbedder):
    """Counts how many crops go through the model."""

    name = "colour-count"
    embedded = 0

    def embed(self, batch):  # type: ignore[no-untyped-def]
        type(self).embedded += len(batch)
        return super().embed(batch)


def test_restart_resumes_without_re_embedding(tmp_path: Path) -> None:
    src = session(tmp_path, frames=12)
    watch = tmp_path / "watch"
    watch.mkdir()
    frames = frame_dirs(src)
    for frame in frames[:6]:
        shutil.copytree(frame, watch / frame.name)
    config = make_config(tmp_path, watch, "cosine")
    first_half = len(crops_in(watch))
    CountingEmbedder.embedded = 0
    Daemon(config, embedder=CountingEmbedder(EmbedderOptions()), exit_when_idle_s=1.0).run()
    assert CountingEmbedder.embedded == first_half
    for frame in frames[6:]:
        shutil.copytree(frame, watch / frame.name)
    CountingEmbedder.embedded = 0
    summary = Daemon(
        config, embedder=CountingEmbedder(EmbedderOptions()), exit_when_idle_s=1.0
    ).run()
    assert CountingEmbedder.embedded == len(crops_in(watch)) - first_half
    assert summary.new_crops == len(crops_in(watch)) - first_half
    rows = read_clusters_csv(config.output.folder / "clusters.csv")
    assert sorted(n for n, _ in rows) == sorted(crops_in(watch))
    assert partition(rows) == batch_partition(config, watch, tmp_path)


def test_state_built_with_other_settings_is_refused(tmp_path: Path) -> None:
    watch = session(tmp_path, frames=2)
    config = make_config(tmp_path, watch, "cosine")
    run_daemon(config)
    other = dataclasses.replace(config, link=dataclasses.replace(config.link, threshold=0.5))
    from crop_clusterd.store import StateError

    with pytest.raises(StateError, match=r"link\.threshold"):
        Daemon(other).run()


CHILD = """
import sys
sys.path.insert(0, {tests!r})
from fakes import ColourEmbedder
from crop_clusterd.embed import register
register(ColourEmbedder)
import test_supervisor as t
from pathlib import Path
from crop_clusterd.log import configure_logging
configure_logging("json", "info")
config = t.make_config(Path({tmp!r}), Path({watch!r}), {method!r})
summary = t.Daemon(config, exit_when_idle_s={idle!r}).run()
print("SUMMARY", summary.crops, summary.new_crops)
"""


def start_child(tmp: Path, watch: Path, method: str, idle: float | None) -> subprocess.Popen[str]:
    code = CHILD.format(
        tests=str(REPO / "tests"), tmp=str(tmp), watch=str(watch), method=method, idle=idle
    )
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "tests")},
    )


@pytest.mark.parametrize("method", ["cosine", "track"])
def test_sigkill_mid_stream_loses_and_duplicates_nothing(tmp_path: Path, method: str) -> None:
    src = session(tmp_path, frames=24, seed=11)
    watch = tmp_path / "watch"
    watch.mkdir()
    config = make_config(tmp_path, watch, method)
    frames = frame_dirs(src)
    child = start_child(tmp_path, watch, method, None)
    kills = 0
    try:
        for i, frame in enumerate(frames):
            shutil.copytree(frame, watch / frame.name)
            expected = len(crops_in(watch))
            if i in (6, 14):
                # Kill once some of what has landed is committed, mid-stream.
                wait_for(committed_at_least(config, expected // 2), 60)
                child.send_signal(signal.SIGKILL)
                child.wait(30)
                kills += 1
                child = start_child(tmp_path, watch, method, None)
            else:
                wait_for(committed_at_least(config, expected), 60)
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert kills == 2
    assert child.returncode == 0, out
    rows = read_clusters_csv(config.output.folder / "clusters.csv")
    names = [n for n, _ in rows]
    assert len(names) == len(set(names)), "a crop is in clusters.csv twice"
    assert set(names) == crops_in(watch)
    assert partition(rows) == batch_partition(config, watch, tmp_path)
