"""Sessions (issue 10): the rule that splits crops into nights or runs of activity,
the store's sessions, and the link stage's one open session.

End-to-end checks (live equals batch per session, outputs per session, the soak
across a night boundary) are in tests/test_session_daemon.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from crop_clusterd.config import Config, SessionConfig
from crop_clusterd.factory import linker_from_config, state_settings
from crop_clusterd.records import CommittedCrop, Crop, Embedded
from crop_clusterd.sessionbook import SessionBook
from crop_clusterd.sessions import SessionAssigner, SessionRule, capture_seconds, session_rule
from crop_clusterd.store import StateError, StateStore, session_cluster_sizes


def at(text: str) -> float:
    """A capture time as crop_clusterd stores it: naive local wall clock, read as UTC."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


# --- the rule ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("when", "night"),
    [
        ("2024-07-01T22:00:00", "2024-07-01"),
        ("2024-07-02T03:30:00", "2024-07-01"),  # after midnight: still the night before
        ("2024-07-02T11:59:59", "2024-07-01"),
        ("2024-07-02T12:00:00", "2024-07-02"),  # noon starts the next night
        ("2024-12-31T23:00:00", "2024-12-31"),
        ("2025-01-01T01:00:00", "2024-12-31"),
    ],
)
def test_a_night_runs_from_noon_to_noon(when: str, night: str) -> None:
    assert SessionRule("night").night_of(at(when)) == night


def test_the_night_start_hour_moves_the_boundary() -> None:
    rule = SessionRule("night", night_starts_h=18.5)
    assert rule.night_of(at("2024-07-02T18:29:00")) == "2024-07-01"
    assert rule.night_of(at("2024-07-02T18:30:00")) == "2024-07-02"


def test_none_is_one_session_whatever_the_time() -> None:
    assigner = SessionAssigner(SessionRule("none"))
    assert {assigner.assign(at(t)) for t in ("2024-07-01T22:00", "2025-03-01T01:00")} == {"all"}
    assert assigner.assign(math.nan) == "all"


def test_gap_starts_a_session_after_gap_s_without_crops() -> None:
    assigner = SessionAssigner(SessionRule("gap", gap_s=600.0))
    times = ["2024-07-01T22:00:00", "2024-07-01T22:09:59", "2024-07-01T22:19:58"]
    assert [assigner.assign(at(t)) for t in times] == ["2024-07-01T22-00-00"] * 3
    # 10 min 1 s after the last crop: a new session, named by its first crop.
    assert assigner.assign(at("2024-07-01T22:29:59")) == "2024-07-01T22-29-59"
    # An unknown time stays in the current session.
    assert assigner.assign(math.nan) == "2024-07-01T22-29-59"


def test_gap_resumes_from_the_span_of_a_restored_session() -> None:
    assigner = SessionAssigner(SessionRule("gap", gap_s=600.0))
    assigner.restore("2024-07-01T22-00-00", at("2024-07-01T22:00:00"), at("2024-07-01T23:00:00"))
    assert assigner.assign(at("2024-07-01T23:05:00")) == "2024-07-01T22-00-00"
    assert assigner.assign(at("2024-07-02T01:00:00")) == "2024-07-02T01-00-00"


def test_a_crop_without_capture_time_is_placed_by_its_mtime_in_local_time() -> None:
    mtime = at("2024-07-01T23:00:00")  # as an instant: UTC 23:00
    crop = Crop(path=Path("x.png"), name="x.png", mtime_ns=int(mtime * 1e9))
    local = mtime + datetime.fromtimestamp(mtime).astimezone().utcoffset().total_seconds()  # type: ignore[union-attr]
    assert capture_seconds(crop) == pytest.approx(local)
    timed = dataclasses.replace(crop, time=at("2024-07-01T22:00:00"))
    assert capture_seconds(timed) == at("2024-07-01T22:00:00")
    assert math.isnan(capture_seconds(Crop(path=Path("y.png"), name="y.png")))


def test_auto_is_night_for_the_daemon_and_none_for_the_batch_command() -> None:
    config = Config()
    assert config.session.split is None
    assert session_rule(config, "run").split == "night"
    assert session_rule(config, "cluster").split == "none"
    gap = dataclasses.replace(config, session=SessionConfig(split="gap", gap_s=60.0))
    assert session_rule(gap, "cluster") == SessionRule("gap", gap_s=60.0)


# --- the store --------------------------------------------------------------------------


def committed(
    names: list[str], start: int, clusters: list[int], first_local: int = 0
) -> list[CommittedCrop]:
    out = []
    for i, (name, cluster) in enumerate(zip(names, clusters, strict=True)):
        crop = Crop(path=Path(name), name=name)
        vector = np.full(4, 0.5, dtype=np.float32)
        out.append(CommittedCrop(Embedded(crop, vector), start + i, cluster, first_local + i))
    return out


def book_for(store: StateStore, config: Config, folder: Path | None) -> SessionBook:
    return SessionBook(
        store, session_rule(config, "run"), lambda: linker_from_config(config), folder
    )


def test_each_session_numbers_its_crops_from_zero(tmp_path: Path) -> None:
    with StateStore(tmp_path) as store:
        store.commit_batch(0, committed(["/a", "/b"], 0, [0, 0]), [], [], session="2024-07-01")
        store.close_session("2024-07-01", 100.0)
        store.commit_batch(
            1, committed(["/c", "/d", "/e"], 2, [0, 1, 0]), [], [], session="2024-07-02"
        )
        night2 = store.load_crops(session="2024-07-02")
        assert night2.locals.tolist() == [0, 1, 2]
        assert night2.seqs.tolist() == [2, 3, 4]
        assert night2.paths == ("/c", "/d", "/e")
        assert [s.id for s in store.sessions()] == ["2024-07-01", "2024-07-02"]
        assert [s.id for s in store.open_sessions()] == ["2024-07-02"]
        assert sorted(session_cluster_sizes(store, "2024-07-02").tolist()) == [1, 2]
        assert store.next_seq() == 5


def test_a_commit_to_a_closed_session_reopens_it(tmp_path: Path) -> None:
    with StateStore(tmp_path) as store:
        store.commit_batch(0, committed(["/a"], 0, [0]), [], [], session="n1")
        store.close_session("n1", 10.0)
        assert store.open_sessions() == []
        store.commit_batch(1, committed(["/b"], 1, [0], first_local=1), [], [], session="n1")
        assert [s.id for s in store.open_sessions()] == ["n1"]


def test_dropped_vectors_refuse_to_load_with_a_reason(tmp_path: Path) -> None:
    with StateStore(tmp_path) as store:
        store.commit_batch(0, committed(["/a", "/b"], 0, [0, 0]), [], [], session="n1")
        with pytest.raises(StateError, match="open or unknown"):
            store.drop_vectors("n1")
        store.close_session("n1", 10.0)
        assert store.drop_vectors("n1") == 2
        with pytest.raises(StateError, match="keep_sessions"):
            store.load_crops(session="n1")
        # Cluster figures need no vectors.
        assert session_cluster_sizes(store, "n1").tolist() == [2]


V2_TABLES = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE crops (seq INTEGER PRIMARY KEY, path TEXT NOT NULL, size INTEGER,
    mtime_ns INTEGER, inode INTEGER, content TEXT, retired INTEGER NOT NULL DEFAULT 0,
    frame TEXT, crop_index INTEGER, time REAL, cx REAL, cy REAL, batch INTEGER NOT NULL,
    cluster INTEGER NOT NULL, added REAL NOT NULL, vector BLOB NOT NULL);
CREATE TABLE merges (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL,
    batch INTEGER NOT NULL, from_cluster INTEGER NOT NULL, into_cluster INTEGER NOT NULL);
CREATE TABLE skipped (path TEXT PRIMARY KEY, reason TEXT NOT NULL, size INTEGER,
    mtime_ns INTEGER, at REAL NOT NULL, inode INTEGER, content TEXT);
CREATE TABLE runtime (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema', '2');
"""


def version_2_state(folder: Path, config: Config) -> None:
    """A state folder as the release before sessions left it: 3 crops, one merge."""
    folder.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(folder / "state.sqlite3")
    con.executescript(V2_TABLES)
    settings = {k: v for k, v in state_settings(config).items() if not k.startswith("session.")}
    con.execute("INSERT INTO meta VALUES ('settings', ?)", (json.dumps(settings),))
    blob = np.full(4, 0.5, dtype=np.float32).tobytes()
    for seq, cluster in enumerate([0, 1, 1]):
        con.execute(
            "INSERT INTO crops(seq, path, batch, cluster, added, vector) VALUES (?,?,?,?,?,?)",
            (seq, f"/w/{seq}.png", 0, cluster, 1.0, blob),
        )
    con.execute("INSERT INTO merges(at, batch, from_cluster, into_cluster) VALUES (1, 0, 1, 0)")
    con.commit()
    con.close()


def test_a_state_from_before_sessions_is_refused_for_nights_naming_the_fix(
    tmp_path: Path,
) -> None:
    config = Config()
    version_2_state(tmp_path, config)
    with StateStore(tmp_path) as store, pytest.raises(StateError) as err:
        store.check_settings(state_settings(config))
    message = str(err.value)
    assert "session.split" in message and 'session.split = "none"' in message


def test_a_state_from_before_sessions_resumes_as_one_session_with_split_none(
    tmp_path: Path,
) -> None:
    config = dataclasses.replace(Config(), session=SessionConfig(split="none"))
    version_2_state(tmp_path, config)
    with StateStore(tmp_path) as store:
        store.check_settings(state_settings(config))  # accepted
        assert store.get_meta("schema") == "4"
        assert np.isnan(store.load_crops(session="all").sizes).all()  # unknown: NULL
        old = store.load_crops(session="all")
        assert old.locals.tolist() == old.seqs.tolist() == [0, 1, 2]
        assert [m.merge.from_cluster for m in store.load_merges(session="all")] == [1]
        assert session_cluster_sizes(store, "all").tolist() == [3]
        assert [s.id for s in store.open_sessions()] == ["all"]


# --- the link stage's session book ------------------------------------------------------


def test_the_book_keeps_one_session_open_and_restores_a_reopened_one(tmp_path: Path) -> None:
    config = dataclasses.replace(Config(), session=SessionConfig(split="night"))
    with StateStore(tmp_path) as store:
        store.commit_batch(0, committed(["/a", "/b"], 0, [0, 0]), [], [], session="n1")
        book = SessionBook(
            store, session_rule(config, "run"), lambda: linker_from_config(config), tmp_path
        )
        resumed = book.resume(now=5.0)
        assert resumed is not None and resumed.id == "n1" and len(resumed.linker) == 2
        n2 = book.switch_to("n2", now=6.0)
        assert n2.id == "n2" and len(n2.linker) == 0
        assert [s.id for s in store.open_sessions()] == []  # n2 has no row until a commit
        assert store.session("n1") is not None and store.session("n1").closed == 6.0  # type: ignore[union-attr]
        again = book.switch_to("n1", now=7.0)
        assert len(again.linker) == 2  # restored from the store, not kept in memory


def test_a_crash_between_two_open_sessions_closes_the_older_at_start(tmp_path: Path) -> None:
    config = dataclasses.replace(Config(), session=SessionConfig(split="night"))
    with StateStore(tmp_path) as store:
        store.commit_batch(0, committed(["/a"], 0, [0]), [], [], session="n1")
        store.commit_batch(1, committed(["/b"], 1, [0]), [], [], session="n2")
        book = SessionBook(
            store, session_rule(config, "run"), lambda: linker_from_config(config), None
        )
        resumed = book.resume(now=9.0)
        assert resumed is not None and resumed.id == "n2"
        assert [s.id for s in store.open_sessions()] == ["n2"]
        assert not os.path.exists(tmp_path / "index-n1.hnsw")


def test_keep_sessions_drops_the_vectors_of_older_closed_sessions_only(tmp_path: Path) -> None:
    config = dataclasses.replace(Config(), session=SessionConfig(split="night"))
    with StateStore(tmp_path) as store:
        book = SessionBook(
            store,
            session_rule(config, "run"),
            lambda: linker_from_config(config),
            None,
            keep_sessions=1,
        )
        for seq, night in enumerate(("n1", "n2", "n3")):
            book.switch_to(night, now=float(seq))
            store.commit_batch(seq, committed(["/" + night], seq, [0]), [], [], session=night)
        book.close(now=10.0, reason="test")
        dropped = {s.id: s.vectors_dropped for s in store.sessions()}
        assert dropped == {"n1": True, "n2": True, "n3": False}
        assert len(store.load_crops(session="n3")) == 1
        # Paths and clusters stay: the files are still known, the figures still read.
        assert session_cluster_sizes(store, "n1").tolist() == [1]
