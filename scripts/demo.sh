#!/usr/bin/env bash
# The main job on demo data: set up .venv, simulate a trap session (~2,300 crops
# with ground truth), cluster it with the bundled model and print the scores.
# Everything lands in demo/ (ignored by git); run it again to start afresh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
rm -rf demo
.venv/bin/crop-clusterd simulate -o demo/session --frames 150 --seed 1
.venv/bin/crop-clusterd cluster -i demo/session --recursive -mf demo/session \
    -c track -gs --labels demo/session/labels.csv -o demo/out
echo "clusters: demo/out/clusters.csv   folders: demo/out/clusters/   scores: demo/out/eval.json"
