"""Score a clusters.csv against ground-truth labels (e.g. the simulator's labels.csv).

    python scripts/score.py demo/out/current/clusters.csv demo/session/labels.csv

Prints purity, ARI, AMI and B-cubed figures for the crops that have a label;
reads the CSV a running daemon keeps up to date, so it works mid-session too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from crop_clusterd.csvfiles import read_clusters_csv
from crop_clusterd.evaluate import evaluate, load_labels_csv, match_labels


def main() -> int:
    """Read both files, match crops to labels by name, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clusters_csv", type=Path)
    parser.add_argument("labels_csv", type=Path)
    args = parser.parse_args()
    rows = read_clusters_csv(args.clusters_csv)
    labels = match_labels([name for name, _ in rows], load_labels_csv(args.labels_csv))
    known = [(cluster, label) for (_, cluster), label in zip(rows, labels, strict=True) if label]
    if not known:
        print("no crop in the CSV has a label", file=sys.stderr)
        return 1
    result = evaluate([c for c, _ in known], [lab for _, lab in known])
    print(f"{len(known)} of {len(rows)} crops labelled")
    print(result.format_table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
