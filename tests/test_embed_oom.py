"""Out of device memory in the model's forward: the batch is halved and retried.

The error is simulated through the embedder seam: :class:`OomEmbedder`, a real
:class:`~crop_clusterd.embed.Embedder` subclass, raises
``torch.cuda.OutOfMemoryError`` for any forward of more than ``limit`` crops and
for any forward holding the one ``poison`` crop, and records every forward.
Every other crop must be embedded and clustered exactly once, the poisoned one
recorded as skipped with the reason, the daemon must keep running, and each
call that needed a split must log ``embed_oom_split`` once.
"""

from __future__ import annotations

import dataclasses
import io
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from fakes import ColourEmbedder
from test_faults import Running
from test_notify import named
from test_supervisor import (
    committed,
    crops_in,
    frame_dirs,
    make_config,
    partition,
    session,
    wait_for,
)

from crop_clusterd import oomsplit
from crop_clusterd.batch import BatchRequest, run_batch
from crop_clusterd.config import Config
from crop_clusterd.csvfiles import read_clusters_csv, read_errors_csv
from crop_clusterd.embed import EmbedderOptions, register, unregister
from crop_clusterd.images import load_rgb
from crop_clusterd.log import configure_logging
from crop_clusterd.oomsplit import OomSplitter, is_out_of_memory
from crop_clusterd.store import StateStore
from crop_clusterd.supervisor import Daemon

pytestmark = pytest.mark.usefixtures("restore_logging")


class OomEmbedder(ColourEmbedder):
    """The colour fake, out of memory above ``limit`` crops or with ``poison`` in
    the batch; ``forwards`` records (size, ran out) for every forward."""

    name: ClassVar[str] = "oom-test"
    limit: ClassVar[int] = 3
    poison: ClassVar[torch.Tensor | None] = None
    forwards: ClassVar[list[tuple[int, bool]]] = []

    def _features(self, batch: torch.Tensor) -> torch.Tensor:
        poisoned = self.poison is not None and any(torch.equal(r, self.poison) for r in batch)
        ran_out = batch.shape[0] > self.limit or poisoned
        type(self).forwards.append((int(batch.shape[0]), ran_out))
        if ran_out:
            raise torch.cuda.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 139.8 GiB total)"
            )
        return super()._features(batch)


@pytest.fixture(autouse=True)
def oom_embedder() -> Iterator[type[OomEmbedder]]:
    register(OomEmbedder)
    OomEmbedder.forwards = []
    OomEmbedder.poison = None
    yield OomEmbedder
    unregister(OomEmbedder.name)
    OomEmbedder.poison = None


@pytest.fixture
def log_lines() -> io.StringIO:
    out = io.StringIO()
    configure_logging("json", "debug", out, environ={})
    return out


def raises() -> list[int]:
    """Sizes of the forwards that ran out, in order."""
    return [size for size, ran_out in OomEmbedder.forwards if ran_out]


def assert_logged_once_per_episode(log_lines: io.StringIO) -> list[dict[str, Any]]:
    """Every forward that ran out is in exactly one ``embed_oom_split`` event."""
    events = named(log_lines, "embed_oom_split")
    assert events, "no out-of-memory episode was logged"
    assert [s for e in events for s in e["ran_out_at"]] == raises()
    assert all(e["level"] == "warning" for e in events)
    return events


def tensors_of(paths: list[Path]) -> list[torch.Tensor]:
    embedder = OomEmbedder(EmbedderOptions())
    return [embedder.preprocess(load_rgb(p, background=embedder.options.background)) for p in paths]


def poison_one(paths: list[Path], index: int) -> str:
    """Make ``paths[index]`` the poisoned crop; its tensor must be unique."""
    tensors = tensors_of(paths)
    target = tensors[index]
    assert sum(torch.equal(t, target) for t in tensors) == 1, "poison would hit other crops"
    OomEmbedder.poison = target
    return str(paths[index])


# --- the splitter itself -----------------------------------------------------------------


def colour_batch(n: int) -> list[torch.Tensor]:
    """n distinct preprocessed crops (random colours, fixed seed)."""
    rng = np.random.default_rng(n)
    pixels = rng.uniform(-0.5, 0.5, size=(n, 3, 4, 4)).astype(np.float32)
    return [torch.from_numpy(p) for p in pixels]


def test_split_halves_down_to_one_crop_and_skips_only_the_poisoned_one(
    log_lines: io.StringIO,
) -> None:
    tensors = colour_batch(11)
    OomEmbedder.poison = tensors[6]
    embedder = OomEmbedder(EmbedderOptions())
    expected = ColourEmbedder(EmbedderOptions()).embed(torch.stack(tensors))

    result = OomSplitter(embedder).embed(tensors)

    assert result.rows == tuple(i for i in range(11) if i != 6)
    np.testing.assert_allclose(result.vectors, expected[list(result.rows)], atol=1e-6)
    assert [row for row, _ in result.failed] == [6]
    assert "out of memory" in result.failed[0][1] and "Tried to allocate" in result.failed[0][1]
    sizes = [size for size, _ in OomEmbedder.forwards]
    # Each forward after running out is at most half the one that ran out, never smaller
    # than needed: the size only shrinks at an out-of-memory error.
    for (before, ran_out), after in zip(OomEmbedder.forwards, sizes[1:], strict=False):
        assert after <= (max(1, before // 2) if ran_out else before)
    assert min(raises()) == 1  # the poisoned crop was tried alone
    assert list(result.ran_out_at) == raises()
    assert all(s <= OomEmbedder.limit for s, ran_out in OomEmbedder.forwards if not ran_out)
    events = assert_logged_once_per_episode(log_lines)
    assert len(events) == 1 and events[0]["skipped"] == 1 and events[0]["crops"] == 11


def test_the_reduced_size_stays_then_doubles_back(log_lines: io.StringIO) -> None:
    embedder = OomEmbedder(EmbedderOptions())
    splitter = OomSplitter(embedder, recover_after=2)
    splitter.embed(colour_batch(16))
    cap = splitter.cap
    assert cap is not None and cap <= OomEmbedder.limit
    assert len(named(log_lines, "embed_oom_split")) == 1

    # While capped, no forward is larger than the cap: no new out-of-memory error.
    OomEmbedder.forwards = []
    splitter.embed(colour_batch(16))
    assert raises() == [] and max(s for s, _ in OomEmbedder.forwards) == cap
    splitter.embed(colour_batch(16))  # the second call in a row without running out
    raised = named(log_lines, "embed_batch_cap_raised")
    assert [e["batch_size"] for e in raised] == [cap * 2]
    assert splitter.cap == cap * 2

    # The doubled cap runs out again (above the limit): a second episode, logged once.
    OomEmbedder.forwards = []
    result = splitter.embed(colour_batch(16))
    assert result.rows == tuple(range(16)) and result.failed == ()
    assert raises() == [cap * 2]
    assert len(named(log_lines, "embed_oom_split")) == 2


def test_cap_is_dropped_once_it_would_limit_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(OomEmbedder, "limit", 100)  # only the poison runs out here
    splitter = OomSplitter(OomEmbedder(EmbedderOptions()), recover_after=1)
    tensors = colour_batch(8)
    OomEmbedder.poison = tensors[0]
    splitter.embed(tensors)
    assert splitter.cap == 1
    OomEmbedder.poison = None
    for expected in (2, 4, None):
        splitter.embed(colour_batch(8))
        assert splitter.cap == expected


def test_other_errors_propagate_and_oom_is_recognised() -> None:
    class Broken(ColourEmbedder):
        name: ClassVar[str] = "broken-test"

        def _features(self, batch: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        OomSplitter(Broken(EmbedderOptions())).embed(colour_batch(4))
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("anything"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 9 GB)"))
    assert not is_out_of_memory(RuntimeError("CUDA error: device-side assert triggered"))
    assert not is_out_of_memory(MemoryError("out of memory"))


def test_the_cache_is_emptied_after_each_oom_when_cuda_is_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    emptied: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    embedder = OomEmbedder(EmbedderOptions(device="cpu"))
    OomSplitter(embedder).embed(colour_batch(8))
    assert len(emptied) == len(raises()) >= 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    oomsplit.free_device_cache()
    assert len(emptied) == len(raises())


# --- the batch command and the daemon -------------------------------------------------


def oom_config(tmp: Path, watch: Path) -> Config:
    c = make_config(tmp, watch)
    return dataclasses.replace(c, embed=dataclasses.replace(c.embed, model=OomEmbedder.name))


def test_batch_command_skips_the_poisoned_crop_and_clusters_the_rest(
    tmp_path: Path, log_lines: io.StringIO
) -> None:
    watch = session(tmp_path, frames=6, seed=11)
    crops = sorted(crops_in(watch))
    poisoned = poison_one([Path(c) for c in crops], len(crops) // 2)
    config = oom_config(tmp_path, watch)
    assert config.embed.batch_size > 2 * OomEmbedder.limit  # a split needs two halvings

    run_batch(BatchRequest(config, inputs=(str(watch),)))

    names = [n for n, _ in read_clusters_csv(config.output.folder / "clusters.csv")]
    assert sorted(names) == sorted(set(crops) - {poisoned})
    errors = read_errors_csv(config.output.folder / "errors.csv")
    assert [n for n, _ in errors] == [poisoned]
    assert "out of memory embedding this crop alone" in errors[0][1]
    events = assert_logged_once_per_episode(log_lines)
    assert sum(e["skipped"] for e in events) == 1
    # Logged per episode, not per error: the first episode halved more than once.
    assert len(events) < len(raises()) and len(events[0]["ran_out_at"]) > 1


@pytest.mark.slow
def test_daemon_keeps_running_through_oom_and_equals_the_batch_result(
    tmp_path: Path, log_lines: io.StringIO
) -> None:
    src = session(tmp_path, frames=10, seed=7)
    frames = frame_dirs(src)
    first = sorted(crops_in(frames[0]) | crops_in(frames[1]))
    poison_path = Path(first[len(first) // 2])
    every = sorted(crops_in(src))
    poison_one([Path(p) for p in every], every.index(str(poison_path)))
    watch = tmp_path / "watch"
    watch.mkdir()
    config = oom_config(tmp_path, watch)
    poisoned = str(watch / poison_path.relative_to(src))
    run = Running(Daemon(config, exit_when_idle_s=None))
    try:
        for frame in frames[:5]:
            shutil.copytree(frame, watch / frame.name)
        wait_for(lambda: committed(config) == len(crops_in(watch)) - 1)
        episodes = len(named(log_lines, "embed_oom_split"))
        assert episodes >= 1
        # After the out-of-memory errors the daemon still takes new frames.
        for frame in frames[5:]:
            shutil.copytree(frame, watch / frame.name)
        everything = crops_in(watch)
        wait_for(lambda: committed(config) == len(everything) - 1)
    finally:
        run.stop()
    assert run.error is None and run.summary is not None
    assert run.summary.skipped == 1

    rows = read_clusters_csv(config.output.folder / "clusters.csv")
    names = [n for n, _ in rows]
    assert len(names) == len(set(names)) and set(names) == everything - {poisoned}
    with StateStore(config.state.folder, readonly=True) as store:
        skipped = store.load_skipped()
    assert [s.path for s in skipped] == [poisoned]
    assert "out of memory embedding this crop alone" in skipped[0].reason
    errors = read_errors_csv(config.output.folder / "errors.csv")
    assert [n for n, _ in errors] == [poisoned]
    events = assert_logged_once_per_episode(log_lines)
    assert sum(e["skipped"] for e in events) == 1

    batch_out = tmp_path / "batch-out"
    batch = dataclasses.replace(config, output=dataclasses.replace(config.output, folder=batch_out))
    run_batch(BatchRequest(batch, inputs=(str(watch),)))
    assert partition(rows) == partition(read_clusters_csv(batch_out / "clusters.csv"))
