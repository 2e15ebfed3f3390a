"""Tests for clustering evaluation and label loading."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score

from crop_clusterd.evaluate import (
    Evaluation,
    evaluate,
    labels_from_folders,
    load_labels_csv,
    match_labels,
)


def _bcubed_brute_force(clusters: list[int], labels: list[str]) -> tuple[float, float]:
    """B-cubed precision and recall straight from the definition, item by item."""
    n = len(clusters)
    precision = recall = 0.0
    for i in range(n):
        same_cluster = [j for j in range(n) if clusters[j] == clusters[i]]
        same_label = [j for j in range(n) if labels[j] == labels[i]]
        both = [j for j in same_cluster if labels[j] == labels[i]]
        precision += len(both) / len(same_cluster)
        recall += len(both) / len(same_label)
    return precision / n, recall / n


def _purity_brute_force(clusters: list[int], labels: list[str]) -> float:
    """Share of items whose label is the most common label of their cluster."""
    total = 0
    for cluster in set(clusters):
        members = [labels[i] for i in range(len(clusters)) if clusters[i] == cluster]
        total += Counter(members).most_common(1)[0][1]
    return total / len(clusters)


def test_hand_computed_example() -> None:
    # Clusters {a,a} {b,c} {c}: precision per item 1,1,1/2,1/2,1 -> 4/5;
    # recall per item 1,1,1,1/2,1/2 -> 4/5; purity (2+1+1)/5.
    result = evaluate([0, 0, 1, 1, 2], ["a", "a", "b", "c", "c"])
    assert (result.n_items, result.n_clusters, result.n_labels) == (5, 3, 3)
    assert result.purity == pytest.approx(0.8)
    assert result.bcubed_precision == pytest.approx(0.8)
    assert result.bcubed_recall == pytest.approx(0.8)
    assert result.bcubed_f1 == pytest.approx(0.8)


def test_everything_in_one_cluster() -> None:
    # One cluster of {x,x,y}: precision (2/3+2/3+1/3)/3 = 5/9, recall 1.
    result = evaluate([4, 4, 4], ["x", "x", "y"])
    assert result.bcubed_precision == pytest.approx(5 / 9)
    assert result.bcubed_recall == pytest.approx(1.0)
    assert result.bcubed_f1 == pytest.approx(2 * (5 / 9) / (5 / 9 + 1))
    assert result.purity == pytest.approx(2 / 3)
    assert result.ari == pytest.approx(0.0)


@pytest.mark.parametrize("seed", range(8))
def test_matches_definitions_on_random_inputs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    clusters = [int(c) * 7 - 3 for c in rng.integers(0, rng.integers(1, 10), size=n)]
    labels = [f"sp{c}" for c in rng.integers(0, rng.integers(1, 6), size=n)]
    result = evaluate(clusters, labels)
    precision, recall = _bcubed_brute_force(clusters, labels)
    assert result.bcubed_precision == pytest.approx(precision)
    assert result.bcubed_recall == pytest.approx(recall)
    assert result.bcubed_f1 == pytest.approx(2 * precision * recall / (precision + recall))
    assert result.purity == pytest.approx(_purity_brute_force(clusters, labels))
    assert result.ari == pytest.approx(adjusted_rand_score(labels, clusters))
    assert result.ami == pytest.approx(adjusted_mutual_info_score(labels, clusters))
    assert result.n_clusters == len(set(clusters))
    assert result.n_labels == len(set(labels))


def test_perfect_clustering_scores_one() -> None:
    # Cluster ids need not look like labels: only the partition matters.
    result = evaluate([10, 10, 3, 3, 3, 99], ["b", "b", "a", "a", "a", "c"])
    for value in (
        result.purity,
        result.ari,
        result.ami,
        result.bcubed_precision,
        result.bcubed_recall,
        result.bcubed_f1,
    ):
        assert value == pytest.approx(1.0)


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="2 cluster ids but 1 labels"):
        evaluate([0, 1], ["a"])
    with pytest.raises(ValueError, match="no labelled crops"):
        evaluate([], [])


def test_to_dict_and_table() -> None:
    result = evaluate([0, 0, 1], ["a", "b", "b"])
    as_dict = result.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert as_dict["n_items"] == 3 and as_dict["purity"] == pytest.approx(result.purity)
    assert Evaluation(**as_dict) == result  # type: ignore[arg-type]  # the JSON round trip
    table = result.format_table()
    assert "B-cubed F1" in table and f"{result.purity:.4f}" in table
    assert len({len(line) for line in table.splitlines()}) == 1  # aligned columns


# --------------------------------------------------------------------------- label loading


def test_load_labels_csv(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(
        '\ufefffilename,label,note\n"a,1.png",moth,x\nb.png, fly ,\n\n"c\nd.png",moth,\n',
        encoding="utf-8",
    )
    assert load_labels_csv(path) == {"a,1.png": "moth", "b.png": "fly", "c\nd.png": "moth"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name,label\na,b\n", "line 1"),
        ("filename,label\na.png,moth\nb.png\n", "line 3"),
        ("filename,label\na.png,moth\nb.png,\n", "line 3: empty label"),
        ("filename,label\n,moth\n", "line 2: empty filename"),
        ("filename,label\na.png,moth\nb.png,fly\na.png,fly\n", "line 4.*line 2"),
        ("", "empty file"),
    ],
)
def test_load_labels_csv_errors_name_the_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_labels_csv(path)


def test_load_labels_csv_rejects_non_utf8(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_bytes("filename,label\ncafé.png,moth\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        load_labels_csv(path)


def test_duplicate_row_with_same_label_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("filename,label\na.png,moth\na.png,moth\n", encoding="utf-8")
    assert load_labels_csv(path) == {"a.png": "moth"}


def test_labels_from_folders() -> None:
    paths = [Path("/data/moth/a.png"), Path("/data/fly/b.png"), Path("rel/moth/c.png")]
    assert labels_from_folders(paths) == {
        "/data/moth/a.png": "moth",
        "/data/fly/b.png": "fly",
        "rel/moth/c.png": "moth",
    }
    with pytest.raises(ValueError, match="no parent folder"):
        labels_from_folders([Path("loose.png")])


def test_match_labels_exact_then_basename() -> None:
    labels = {
        "/data/moth/a.png": "moth",
        "b.png": "fly",
        "x/dup.png": "moth",
        "y/dup.png": "fly",  # same basename, other label: ambiguous
        "z/same.png": "bee",
        "w/same.png": "bee",  # same basename, same label: fine
    }
    names = [
        "/data/moth/a.png",  # exact
        "elsewhere/a.png",  # basename
        "frames/b.png",  # basename of a bare key
        "x/dup.png",  # exact wins over the ambiguous basename
        "q/dup.png",  # ambiguous basename
        "q/same.png",
        "unknown.png",
    ]
    assert match_labels(names, labels) == ["moth", "moth", "fly", "moth", None, "bee", None]
