"""A frame is flat-bug's (name, identifier, trap folder); traps never mix (issue 9, case 4).

Two traps write frames with the same names (`W/trapA/<F>/...UUID_trapA...` and
`W/trapB/<F>/...UUID_trapB...`): each crop takes the boxes of its own frame's
JSON, crops of two traps never share a cluster, and trap A's clusters are the
same with or without trap B's files, through the daemon and the batch command.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fakes import ColourEmbedder

from crop_clusterd.batch import BatchRequest, run_batch
from crop_clusterd.config import Config
from crop_clusterd.csvfiles import read_clusters_csv
from crop_clusterd.embed import register, unregister
from crop_clusterd.embfile import write_embeddings_pickle
from crop_clusterd.flatbug import (
    METADATA_AMBIGUOUS,
    METADATA_MISSING,
    MetadataIndex,
    describe_crop,
    frame_of_metadata,
    frame_of_path,
    frame_place,
    frames_of_names,
)
from crop_clusterd.linking import CosineLinker, Gating, LinkBatch, Motion, TrackLinker
from crop_clusterd.records import FrameId, TrapId
from crop_clusterd.simulate import SimConfig, simulate
from crop_clusterd.store import StateStore
from crop_clusterd.supervisor import Daemon

Partition = set[frozenset[str]]


@pytest.fixture(autouse=True)
def colour_embedder() -> Iterator[None]:
    register(ColourEmbedder)
    yield
    unregister(ColourEmbedder.name)


def make_config(tmp: Path, watch: Path, method: str, out: str) -> Config:
    """Daemon and batch settings on tmp folders, with metadata from the watched tree."""
    c = Config()
    threshold = 0.98 if method == "cosine" else 0.9
    return dataclasses.replace(
        c,
        input=dataclasses.replace(c.input, recursive=True, meta_folder=watch),
        embed=dataclasses.replace(c.embed, model="colour-test", batch_size=8, max_wait_ms=50),
        link=dataclasses.replace(c.link, method=method, threshold=threshold),  # type: ignore[arg-type]
        watch=dataclasses.replace(c.watch, folder=watch, settle_ms=150, rescan_s=1.0),
        metadata=dataclasses.replace(c.metadata, enabled=True, wait_s=3.0),
        state=dataclasses.replace(c.state, folder=tmp / f"state-{out}"),
        output=dataclasses.replace(c.output, folder=tmp / f"out-{out}"),
        snapshot=dataclasses.replace(c.snapshot, interval_s=0.5),
        session=dataclasses.replace(c.session, split="none"),  # outputs directly in out-*/
    )


def two_traps(
    root: Path,
    ids: tuple[str | None, str | None] = ("trapA", "trapB"),
    seeds: tuple[int, int] = (3, 4),
    frames: int = 8,
) -> tuple[Path, Path]:
    """Two simulated traps under ``root`` with the same frame names (same start and
    interval), different individuals and boxes."""
    traps = (root / "trapA", root / "trapB")
    for trap, identifier, seed in zip(traps, ids, seeds, strict=True):
        simulate(
            SimConfig(
                seed=seed,
                frames=frames,
                mean_present=6.0,
                identifier=identifier,
                behaviour="classic",
            ),
            trap,
        )
    names_a = {p.name for p in traps[0].iterdir() if p.is_dir()}
    names_b = {p.name for p in traps[1].iterdir() if p.is_dir()}
    assert names_a == names_b and len(names_a) == frames, "the traps must share frame names"
    return traps


def partition(rows: list[tuple[str, int]]) -> Partition:
    groups: dict[int, set[str]] = {}
    for name, cluster in rows:
        groups.setdefault(cluster, set()).add(name)
    return {frozenset(g) for g in groups.values()}


def moved(parts: Partition, old: Path, new: Path) -> Partition:
    """The partition with every name's ``old`` folder prefix replaced by ``new``."""
    return {frozenset(n.replace(str(old), str(new), 1) for n in p) for p in parts}


def restricted(parts: Partition, folder: Path) -> Partition:
    """The clusters of the crops under ``folder``; asserts none mixes in other crops."""
    prefix = str(folder) + "/"
    mine = {frozenset(n for n in p if n.startswith(prefix)) for p in parts}
    for p in parts:
        inside = sum(n.startswith(prefix) for n in p)
        assert inside in (0, len(p)), f"a cluster mixes traps: {sorted(p)[:4]}"
    return {p for p in mine if p}


def batch_partition(config: Config, inputs: Path) -> Partition:
    config = dataclasses.replace(
        config, input=dataclasses.replace(config.input, meta_folder=inputs)
    )
    run_batch(BatchRequest(config, inputs=(str(inputs),)))
    return partition(read_clusters_csv(config.output.folder / "clusters.csv"))


def daemon_partition(config: Config) -> Partition:
    Daemon(config, exit_when_idle_s=1.0).run()
    return partition(read_clusters_csv(config.output.folder / "clusters.csv"))


def own_box_centre(crop: Path) -> tuple[float, float]:
    """The centre of the crop's box in the JSON of its own frame folder (the truth)."""
    frame_dir = crop.parent.parent
    (meta,) = frame_dir.glob("metadata_*.json")
    index = int(crop.name.split("_CROPNUMBER_")[1].split("_")[0])
    x1, y1, x2, y2 = json.loads(meta.read_text())["boxes"][index]
    return ((x1 + x2) / 2.0, (y1 + y2) / 2.0)


def crops_of(folder: Path) -> list[Path]:
    return sorted(folder.rglob("crop_*.png"))


# --- the case: two traps, same frame names --------------------------------------------


@pytest.mark.parametrize("method", ["cosine", "track"])
def test_batch_trap_result_does_not_depend_on_the_other_trap(tmp_path: Path, method: str) -> None:
    alone_root = tmp_path / "alone"
    trap_a = two_traps(tmp_path / "W")[0]
    shutil.copytree(trap_a, alone_root / "trapA")
    alone = batch_partition(make_config(tmp_path, alone_root, method, "alone"), alone_root)
    both = batch_partition(make_config(tmp_path, tmp_path / "W", method, "both"), tmp_path / "W")
    a_in_both = restricted(both, trap_a)
    relocated = {
        frozenset(n.replace(str(alone_root), str(tmp_path / "W")) for n in p) for p in alone
    }
    assert 1 < len(alone) < len(crops_of(trap_a)), "a trivial partition would prove nothing"
    assert a_in_both == relocated
    restricted(both, tmp_path / "W" / "trapB")


@pytest.mark.parametrize("method", ["cosine", "track"])
def test_daemon_trap_result_does_not_depend_on_the_other_trap(tmp_path: Path, method: str) -> None:
    trap_a, trap_b = two_traps(tmp_path / "W")
    alone_root = tmp_path / "alone"
    shutil.copytree(trap_a, alone_root / "trapA")
    alone = daemon_partition(make_config(tmp_path, alone_root, method, "alone"))
    both_config = make_config(tmp_path, tmp_path / "W", method, "both")
    both = daemon_partition(both_config)
    relocated = {
        frozenset(n.replace(str(alone_root), str(tmp_path / "W")) for n in p) for p in alone
    }
    assert 1 < len(alone) < len(crops_of(trap_a))
    assert restricted(both, trap_a) == relocated
    restricted(both, trap_b)
    # Live equals batch over the two traps.
    assert both == batch_partition(
        make_config(tmp_path, tmp_path / "W", method, "b"), tmp_path / "W"
    )


def test_daemon_gives_each_crop_the_box_of_its_own_frame(tmp_path: Path) -> None:
    root = tmp_path / "W"
    two_traps(root)
    config = make_config(tmp_path, root, "track", "both")
    Daemon(config, exit_when_idle_s=1.0).run()
    with StateStore(config.state.folder, readonly=True) as store:
        stored = store.load_crops()
    assert len(stored) == len(crops_of(root))
    for path, centre in zip(stored.paths, stored.centers.tolist(), strict=True):
        assert tuple(centre) == own_box_centre(Path(path)), path


def test_batch_metadata_lookup_gives_each_crop_its_own_frame_box(tmp_path: Path) -> None:
    """The batch command's rule (``-mf`` = the tree holding both traps)."""
    root = tmp_path / "W"
    two_traps(root)
    index = MetadataIndex.scan(root, loose=True)
    for crop in crops_of(root):
        described, problems = describe_crop(crop, str(crop), time_format=None, metadata=index)
        assert problems == ()
        assert described.center == own_box_centre(crop), crop


# --- kind: other ways two frames share a name -------------------------------------------


@pytest.mark.parametrize("ids", [("SIM", "SIM"), (None, None)], ids=["same-id", "no-id"])
def test_same_frame_names_in_two_places_are_two_traps(
    tmp_path: Path, ids: tuple[str | None, str | None]
) -> None:
    """Same identifier (or none at all) in two folders: the place tells the traps apart."""
    root = tmp_path / "W"
    trap_a, trap_b = two_traps(root, ids=ids)
    alone_root = tmp_path / "alone"
    shutil.copytree(trap_a, alone_root / "trapA")
    alone = batch_partition(make_config(tmp_path, alone_root, "track", "alone"), alone_root)
    both = daemon_partition(make_config(tmp_path, root, "track", "both"))
    relocated = moved(alone, alone_root, root)
    assert restricted(both, trap_a) == relocated
    restricted(both, trap_b)
    with StateStore(tmp_path / "state-both", readonly=True) as store:
        stored = store.load_crops()
    for path, centre in zip(stored.paths, stored.centers.tolist(), strict=True):
        assert tuple(centre) == own_box_centre(Path(path)), path


@pytest.mark.parametrize("through", ["batch", "daemon"])
@pytest.mark.parametrize("method", ["cosine", "track"])
def test_identical_crops_of_two_traps_never_share_a_cluster(
    tmp_path: Path, method: str, through: str
) -> None:
    """Trap B's files are copies of trap A's (same pixels, same boxes) under another
    identifier: every crop of B is as similar to A as can be, and still no cluster
    mixes them; B's clusters mirror A's."""
    root = tmp_path / "W"
    trap_a, trap_b = two_traps(root, seeds=(5, 5))
    config = make_config(tmp_path, root, method, through)
    both = batch_partition(config, root) if through == "batch" else daemon_partition(config)
    part_a, part_b = restricted(both, trap_a), restricted(both, trap_b)
    assert 1 < len(part_a) < len(crops_of(trap_a))
    renamed = {frozenset(n.replace("trapA", "trapB") for n in p) for p in part_a}
    assert renamed == part_b


# --- frame identity, unit level -------------------------------------------------------------


def test_frame_place_in_each_layout(tmp_path: Path) -> None:
    f = "20240701220000-00-06"
    crop = f"crop_{f}_CROPNUMBER_0_UUID_x.png"
    meta = f"metadata_{f}_UUID_x.json"
    trap = tmp_path / "T"
    for path in (
        trap / f / "crops" / crop,  # flat-bug's default
        trap / f / crop,  # crops beside the JSON
        trap / f / meta,
        trap / "crops" / crop,  # flat layout
        trap / "metadata" / meta,
        trap / crop,
    ):
        assert frame_place(path, f) == str(trap), path
    frame = FrameId(f, TrapId(str(trap), "x"))
    assert frame_of_path(trap / f / "crops" / crop) == frame
    assert frame_of_metadata(trap / f / meta) == frame
    # flat-bug writes UUID_None for "no identifier" and leaves it out of crop names.
    no_id = FrameId(f, TrapId(str(trap), ""))
    assert frame_of_path(trap / f / "crops" / f"crop_{f}_CROPNUMBER_0_.png") == no_id
    assert frame_of_metadata(trap / f / f"metadata_{f}_UUID_None.json") == no_id
    assert frame_of_path(trap / "IMG_0001.png") is None


def write_json(path: Path, box: list[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"boxes": [box]}))


def test_own_frame_metadata_only_unless_loose(tmp_path: Path) -> None:
    """The daemon's rule: same name, same identifier, same trap folder, nothing else."""
    write_json(tmp_path / "B" / "F" / "metadata_F_UUID_x.json", [0, 0, 2, 2])
    write_json(tmp_path / "A" / "F" / "metadata_F_UUID_y.json", [0, 0, 4, 4])
    strict = MetadataIndex.scan(tmp_path)
    mine = FrameId("F", TrapId(str(tmp_path / "A"), "x"))
    assert strict.center(mine, 0) == (None, METADATA_MISSING)  # other place / other id
    assert not strict.has(mine)
    assert strict.center(FrameId("F", TrapId(str(tmp_path / "A"), "y")), 0) == ((2.0, 2.0), None)


def test_loose_lookup_takes_the_nearest_place_and_refuses_ties(tmp_path: Path) -> None:
    """The batch command's ``-mf`` folder kept apart from the crops: the JSON of the
    same name and identifier whose folder path ends most like the crop's."""
    meta = tmp_path / "M"
    write_json(meta / "trapA" / "F" / "metadata_F_UUID_x.json", [0, 0, 2, 2])
    write_json(meta / "trapB" / "F" / "metadata_F_UUID_x.json", [0, 0, 4, 4])
    write_json(meta / "trapB" / "G" / "metadata_G_UUID_x.json", [0, 0, 6, 6])
    index = MetadataIndex.scan(meta, loose=True)
    crops = tmp_path / "copy"

    def centre(trap: str, name: str) -> tuple[tuple[float, float] | None, str | None]:
        path = crops / trap / name / "crops" / f"crop_{name}_CROPNUMBER_0_UUID_x.png"
        frame = frame_of_path(path)
        assert frame is not None
        return index.center(frame, 0)

    assert centre("trapA", "F") == ((1.0, 1.0), None)
    assert centre("trapB", "F") == ((2.0, 2.0), None)
    assert centre("trapC", "F") == (None, METADATA_AMBIGUOUS)  # no folder nearer
    assert centre("trapC", "G") == ((3.0, 3.0), None)  # the only one of its name
    assert centre("trapA", "H") == (None, METADATA_MISSING)


def fr(name: str, trap: str) -> FrameId:
    return FrameId(name, TrapId(f"/{trap}", ""))


@pytest.mark.parametrize("timed", [True, False])
def test_track_matches_only_tracks_of_the_frame_s_trap(timed: bool) -> None:
    """Trap B's crops are copies of trap A's; A's clusters are the same with B.

    Untimed, a track lives ``gap_frames`` frames of its own trap: trap B's frames
    in between must not age trap A's tracks."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((3, 8)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    frames = 6
    emb = np.repeat(base, frames, axis=0)  # individual i in every frame
    steps = np.tile(np.arange(frames) * 2.0, 3)
    order = np.argsort(steps, kind="stable")
    emb, steps = emb[order], steps[order]
    names = [f"f{int(t):02d}" for t in steps]
    times = steps if timed else np.full(len(steps), np.nan)

    def batch(traps: list[str]) -> LinkBatch:
        n = len(emb)
        rows = np.concatenate([np.arange(n)] * len(traps))
        return LinkBatch(
            emb[rows].copy(),
            times[rows],
            np.zeros((len(rows), 2)),
            tuple(fr(names[i % n], traps[i // n]) for i in range(len(rows))),
        )

    alone = TrackLinker(0.9, Motion(), idle_frames=1)
    alone.add(batch(["A"]))
    both = TrackLinker(0.9, Motion(), idle_frames=1)
    both.add(batch(["A", "B"]))
    n = len(emb)
    ids = both.cluster_ids()
    assert not set(ids[:n].tolist()) & set(ids[n:].tolist())
    assert ids[:n].tolist() == alone.cluster_ids().tolist()
    assert len(set(ids[:n].tolist())) == 3


@pytest.mark.parametrize("gated", [False, True])
def test_cosine_refuses_pairs_across_traps(gated: bool) -> None:
    v = np.array([[1.0, 0.0]] * 4, dtype=np.float32)
    gating = Gating() if gated else None
    linker = CosineLinker(0.9, gating)
    frames = (fr("f0", "A"), fr("f0", "B"), fr("f1", "A"), None)
    linker.add(LinkBatch(v, np.array([0.0, 0.0, 2.0, 2.0]), np.zeros((4, 2)), frames))
    # The crop without a flat-bug frame is a trap of its own too.
    assert linker.cluster_ids().tolist() == [0, 1, 0, 3]


@pytest.mark.parametrize("method", ["cosine", "track"])
def test_restart_keeps_traps_apart(tmp_path: Path, method: str) -> None:
    """After a restart the stored crops get their traps back (from their stored
    paths): new frames of trap A still never join trap B's clusters."""
    src = tmp_path / "src"
    two_traps(src, seeds=(5, 5))
    root = tmp_path / "W"
    frames = sorted(p.name for p in (src / "trapA").iterdir() if p.is_dir())
    config = make_config(tmp_path, root, method, "live")
    for part in (frames[:4], frames[4:]):
        for trap in ("trapA", "trapB"):
            for frame in part:
                shutil.copytree(src / trap / frame, root / trap / frame)
        Daemon(config, exit_when_idle_s=1.0).run()
    live = partition(read_clusters_csv(config.output.folder / "clusters.csv"))
    assert len(set().union(*live)) == len(crops_of(root))
    restricted(live, root / "trapA")
    assert live == batch_partition(make_config(tmp_path, root, method, "batch"), root)


@pytest.mark.parametrize("method", ["cosine", "track"])
def test_from_embeddings_keeps_traps_apart(tmp_path: Path, method: str) -> None:
    """``cluster --from-embeddings``: the traps come from the stored names."""
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((4, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    names = [
        f"/W/{trap}/{f}/crops/crop_{f}_CROPNUMBER_{i}_UUID_{trap}.png"
        for trap in ("trapA", "trapB")
        for f in ("20240701220000", "20240701220002")
        for i in range(4)
    ]
    emb = np.concatenate([vectors, vectors, vectors, vectors])  # one individual per index
    pickle = tmp_path / "emb.pkl"
    write_embeddings_pickle(pickle, names, emb)
    config = make_config(tmp_path, tmp_path, method, "pkl")
    config = dataclasses.replace(
        config,
        input=dataclasses.replace(config.input, meta_folder=None),
        metadata=dataclasses.replace(config.metadata, enabled=False),
    )
    run_batch(BatchRequest(config, inputs=(), from_embeddings=pickle))
    parts = partition(read_clusters_csv(config.output.folder / "clusters.csv"))
    expected = {
        frozenset(n for n in names if f"/{trap}/" in n and f"_CROPNUMBER_{i}_" in n)
        for trap in ("trapA", "trapB")
        for i in range(4)
    }
    assert parts == expected


def test_frames_of_names_shares_one_record_per_frame() -> None:
    names = [f"/W/T/F/crops/crop_F_CROPNUMBER_{i}_UUID_x.png" for i in range(3)]
    frames = frames_of_names([*names, "/W/T/notes.png", "/W/U/crops/crop_F_CROPNUMBER_0_.png"])
    assert frames[0] is frames[1] is frames[2]
    assert frames[0] == FrameId("F", TrapId("/W/T", "x"))
    assert frames[3] is None
    assert frames[4] == FrameId("F", TrapId("/W/U", ""))
