"""Error categories of ``crop_clusterd.trackerrors`` on small hand-made sessions.

Each case has one kind of error and a known count, and the other counts at
zero, so a category that counted the wrong thing (or the same thing twice)
fails here.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from crop_clusterd.flatbug import TimeFormat
from crop_clusterd.trackerrors import (
    TrackErrors,
    TruthRow,
    analyse,
    derive_truth,
    load_truth_csv,
)


def row(ind: str, frame: int, **kw: object) -> TruthRow:
    """One crop of ``ind`` in ``frame`` (2 s a frame)."""
    base = TruthRow(f"{ind}-{frame}.png", ind, 0, frame, 2.0 * frame)
    return replace(base, **kw)  # type: ignore[arg-type]


def errors(pairs: list[tuple[TruthRow, int]]) -> TrackErrors:
    return analyse([c for _, c in pairs], [r for r, _ in pairs])


ZERO = dict(
    breaks_within_visit=0,
    breaks_blurred=0,
    breaks_at_move=0,
    breaks_at_return=0,
    takeovers=0,
    swaps=0,
    singletons=0,
    mixed_clusters=0,
    crops_off_main=0,
)


def counts(e: TrackErrors) -> dict[str, int]:
    return {k: getattr(e, k) for k in ZERO}


def test_perfect_tracks_have_no_errors() -> None:
    pairs = [(row("a", f), 1) for f in range(5)] + [(row("b", f), 2) for f in range(5)]
    e = errors(pairs)
    assert counts(e) == ZERO
    assert (e.crops, e.individuals, e.clusters, e.clusters_per_individual) == (10, 2, 2, 1.0)


def test_breaks_within_a_visit_count_each_cluster_change() -> None:
    # a: 1 1 2 2 3 -> two breaks; the blurred crop (frame 4) starts cluster 3.
    ids = [1, 1, 2, 2, 3]
    pairs = [(row("a", f, blur=f == 4), c) for f, c in enumerate(ids)]
    e = errors(pairs)
    assert counts(e) == {
        **ZERO,
        "breaks_within_visit": 2,
        "breaks_blurred": 1,
        "singletons": 1,
        "crops_off_main": 3,
    }
    assert e.clusters_per_individual == 3.0


def test_a_break_where_the_later_crop_jumped_is_a_break_at_a_move() -> None:
    pairs = [(row("a", 0), 1), (row("a", 1), 1), (row("a", 2, jump=True), 2), (row("a", 3), 2)]
    # The jump on a crop that stays in its cluster is no break at all.
    pairs += [(row("b", 0), 5), (row("b", 1, jump=True), 5)]
    e = errors(pairs)
    assert counts(e) == {**ZERO, "breaks_at_move": 1, "crops_off_main": 2}


def test_a_new_visit_in_a_new_cluster_is_a_break_at_a_return() -> None:
    pairs = [(row("a", f), 1) for f in range(3)]
    pairs += [(row("a", f, visit=1, jump=True), 2) for f in range(10, 13)]
    e = errors(pairs)
    assert counts(e) == {**ZERO, "breaks_at_return": 1, "crops_off_main": 3}


def test_detections_are_walked_in_frame_order_not_input_order() -> None:
    pairs = [(row("a", 2), 1), (row("a", 0), 1), (row("a", 1), 1)]
    assert counts(errors(pairs)) == ZERO


def test_a_cluster_continued_by_a_newcomer_is_one_takeover() -> None:
    # a leaves after frame 2; b arrives at frame 6 and continues a's cluster.
    pairs = [(row("a", f), 1) for f in range(3)] + [(row("b", f), 1) for f in range(6, 9)]
    e = errors(pairs)
    assert counts(e) == {**ZERO, "takeovers": 1, "mixed_clusters": 1}
    assert e.clusters_per_individual == 0.5


def test_two_tracks_exchanged_in_one_frame_are_one_swap_not_two_takeovers() -> None:
    # From frame 3 on, cluster 1 follows b and cluster 2 follows a.
    pairs = [(row("a", f), 1 if f < 3 else 2) for f in range(6)]
    pairs += [(row("b", f), 2 if f < 3 else 1) for f in range(6)]
    e = errors(pairs)
    assert counts(e) == {
        **ZERO,
        "swaps": 1,
        "breaks_within_visit": 2,
        "mixed_clusters": 2,
        "crops_off_main": 6,
    }


def test_handovers_in_different_frames_are_takeovers_not_a_swap() -> None:
    pairs = [(row("a", f), 1 if f < 3 else 2) for f in range(6)]
    pairs += [(row("b", f), 2 if f < 4 else 1) for f in range(6)]
    e = errors(pairs)
    # Cluster 1 goes {a} (frame 2) -> {b} (frame 4): a takeover. Cluster 2 holds
    # {b}, then {a, b} in frame 3, then {a}: someone always continues, no handover.
    assert (e.takeovers, e.swaps) == (1, 0)


def test_a_cluster_holding_two_present_individuals_is_mixed_not_a_takeover() -> None:
    pairs = [(row("a", f), 1) for f in range(4)] + [(row("b", f), 1) for f in range(4)]
    e = errors(pairs)
    assert counts(e) == {**ZERO, "mixed_clusters": 1, "crops_off_main": 0}
    assert e.clusters == 1


def test_singletons_count_one_crop_clusters() -> None:
    pairs = [(row("a", 0), 1), (row("b", 0), 2), (row("c", 0), 3), (row("c", 1), 3)]
    assert errors(pairs).singletons == 2


def test_lengths_must_agree() -> None:
    with pytest.raises(ValueError, match="2 cluster ids but 1 truth rows"):
        analyse([1, 2], [row("a", 0)])
    with pytest.raises(ValueError, match="no crops"):
        analyse([], [])


def test_truth_csv_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "truth.csv"
    path.write_text(
        "filename,individual,visit,frame,time_s,cx,cy,jump,blur,still\n"
        "x.png,sp01-ind0001,1,7,14.0,10.5,20,1,0,1\n"
        "y.png,sp01-ind0002,0,8,16.0,,,0,1,0\n"
    )
    rows = load_truth_csv(path)
    assert rows == [
        TruthRow("x.png", "sp01-ind0001", 1, 7, 14.0, 10.5, 20.0, True, False, True),
        TruthRow("y.png", "sp01-ind0002", 0, 8, 16.0, None, None, False, True, False),
    ]
    path.write_text("filename,individual,frame\nx.png,a,1\n")
    with pytest.raises(ValueError, match="missing columns"):
        load_truth_csv(path)


def crop(stamp: str, index: int) -> str:
    return f"/w/{stamp}/crops/crop_{stamp}-00-06_CROPNUMBER_{index}_UUID_X.png"


def test_derived_truth_orders_frames_by_time_and_finds_jumps_from_centres() -> None:
    names = [crop("20240701220004", 0), crop("20240701220000", 0), crop("20240701220002", 0)]
    names.append(crop("20240701220002", 1))  # unlabelled: left out
    labels = {n: "a" for n in names[:3]}
    centres = {names[1]: (100.0, 100.0), names[2]: (130.0, 100.0), names[0]: (300.0, 100.0)}
    truth = derive_truth(names, labels, TimeFormat.compile("%Y%m%d%H%M%S"), centres.get)
    assert [(r.filename, r.frame, r.time_s, r.jump) for r in truth.rows] == [
        (names[1], 0, 0.0, False),
        (names[2], 1, 2.0, False),  # 30 px: a drift
        (names[0], 2, 4.0, True),  # 170 px: a jump
    ]
    assert any("60 px" in note for note in truth.derived)

    blind = derive_truth(names, labels, TimeFormat.compile("%Y%m%d%H%M%S"))
    assert not any(r.jump for r in blind.rows)
    assert any("no jumps known" in note for note in blind.derived)
