"""Scores a clustering against known labels (one label per individual or class).

Everything is computed from the sparse cluster x label contingency table, so
evaluating a million crops needs no n x n matrix.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score
from sklearn.metrics.cluster import contingency_matrix

from .textfiles import open_text, reraise_decode

__all__ = [
    "Evaluation",
    "evaluate",
    "labels_from_folders",
    "load_labels_csv",
    "match_labels",
]


@dataclass(frozen=True, slots=True)
class Evaluation:
    """Agreement between clusters and labels.

    ``purity`` is the old tool's score: the share of crops whose label is the
    most common label of their cluster. B-cubed precision/recall are the mean,
    over crops, of the share of the crop's cluster (resp. label class) that
    shares its label (resp. cluster).
    """

    n_items: int
    n_clusters: int
    n_labels: int
    purity: float
    ari: float
    ami: float
    bcubed_precision: float
    bcubed_recall: float
    bcubed_f1: float

    def to_dict(self) -> dict[str, int | float]:
        """The scores as a flat dict, for JSON or CSV output."""
        return asdict(self)

    def format_table(self) -> str:
        """The scores as an aligned two-column text table."""
        rows: list[tuple[str, str]] = [
            ("crops", str(self.n_items)),
            ("clusters", str(self.n_clusters)),
            ("labels", str(self.n_labels)),
            ("purity", f"{self.purity:.4f}"),
            ("adjusted Rand index", f"{self.ari:.4f}"),
            ("adjusted mutual information", f"{self.ami:.4f}"),
            ("B-cubed precision", f"{self.bcubed_precision:.4f}"),
            ("B-cubed recall", f"{self.bcubed_recall:.4f}"),
            ("B-cubed F1", f"{self.bcubed_f1:.4f}"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value:>10}" for name, value in rows)


def evaluate(clusters: Sequence[int], labels: Sequence[str]) -> Evaluation:
    """Score ``clusters`` (one id per crop) against ``labels`` (one per crop, all known)."""
    if len(clusters) != len(labels):
        raise ValueError(f"{len(clusters)} cluster ids but {len(labels)} labels")
    if len(clusters) == 0:
        raise ValueError("no labelled crops to evaluate")
    cluster_ids = np.asarray(clusters, dtype=np.int64)
    label_codes = np.unique(np.asarray(labels, dtype=object), return_inverse=True)[1]
    table = contingency_matrix(cluster_ids, label_codes, sparse=True).tocsr()
    n = float(len(clusters))
    cells = table.tocoo()
    counts, rows, cols = cells.data.astype(np.float64), cells.row, cells.col
    cluster_sizes = np.asarray(table.sum(axis=1), dtype=np.float64).ravel()
    label_sizes = np.asarray(table.sum(axis=0), dtype=np.float64).ravel()
    precision = float(np.sum(counts**2 / cluster_sizes[rows]) / n)
    recall = float(np.sum(counts**2 / label_sizes[cols]) / n)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    purity = float(table.max(axis=1).toarray().sum() / n)
    return Evaluation(
        n_items=len(clusters),
        n_clusters=table.shape[0],
        n_labels=table.shape[1],
        purity=purity,
        ari=float(adjusted_rand_score(label_codes, cluster_ids)),
        ami=float(adjusted_mutual_info_score(label_codes, cluster_ids)),
        bcubed_precision=precision,
        bcubed_recall=recall,
        bcubed_f1=f1,
    )


def load_labels_csv(path: Path) -> dict[str, str]:
    """Read a ``filename,label`` CSV (extra columns ignored) into a name → label dict.

    Errors name the file and line: a missing column, an empty filename or
    label, or one filename given two different labels.
    """
    try:
        return _read_labels_csv(path)
    except UnicodeDecodeError as exc:
        raise reraise_decode(path, exc) from None


def _read_labels_csv(path: Path) -> dict[str, str]:
    """The body of :func:`load_labels_csv`."""
    labels: dict[str, str] = {}
    first_line: dict[str, int] = {}
    # Spreadsheets save CSV with a byte-order mark, some as UTF-16.
    with open_text(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file; expected a 'filename,label' header")
        columns = [c.strip() for c in header]
        if "filename" not in columns or "label" not in columns:
            raise ValueError(
                f"{path}: line 1: header must have 'filename' and 'label' columns, got {header!r}"
            )
        name_col, label_col = columns.index("filename"), columns.index("label")
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue  # tolerate blank lines, common at the end of hand-made files
            if len(row) <= max(name_col, label_col):
                raise ValueError(
                    f"{path}: line {line}: expected {len(header)} columns, got {row!r}"
                )
            name, label = row[name_col], row[label_col].strip()
            if not name:
                raise ValueError(f"{path}: line {line}: empty filename")
            if not label:
                raise ValueError(f"{path}: line {line}: empty label for {name!r}")
            if name in labels and labels[name] != label:
                raise ValueError(
                    f"{path}: line {line}: {name!r} labelled {label!r}, but line "
                    f"{first_line[name]} labelled it {labels[name]!r}"
                )
            labels[name] = label
            first_line.setdefault(name, line)
    return labels


def labels_from_folders(paths: Sequence[Path]) -> dict[str, str]:
    """Label each path by the name of its parent folder, keyed by ``str(path)``."""
    labels: dict[str, str] = {}
    for path in paths:
        label = Path(path).parent.name
        if not label:
            raise ValueError(f"{path}: no parent folder to take a label from")
        labels[str(path)] = label
    return labels


def _basename(name: str) -> str:
    """The last component of a name written with either kind of slash."""
    return name.replace("\\", "/").rsplit("/", 1)[-1]


def match_labels(names: Sequence[str], labels: Mapping[str, str]) -> list[str | None]:
    """The label of each name: exact match first, then by basename; None when unknown.

    A basename that several labelled files share with different labels is
    ambiguous and matches nothing.
    """
    by_basename: dict[str, str | None] = {}
    for key, label in labels.items():
        base = _basename(key)
        if base in by_basename and by_basename[base] != label:
            by_basename[base] = None
        else:
            by_basename.setdefault(base, label)
    out: list[str | None] = []
    for name in names:
        exact = labels.get(name)
        out.append(exact if exact is not None else by_basename.get(_basename(name)))
    return out
