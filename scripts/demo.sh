#!/usr/bin/env bash
# The main job on demo data: set up .venv, then run the daemon in the foreground
# while a simulated trap writes frames into demo/session the way flat-bug does
# (one folder per frame, crops written in place, metadata JSON). The daemon
# clusters crops as they land and stops by itself once the session is over and
# nothing new arrived for 15 s (Ctrl-C stops it earlier, with a final snapshot).
# Everything lands in demo/ (ignored by git); run it again to start afresh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
rm -rf demo
mkdir -p demo
.venv/bin/crop-clusterd simulate -o demo/session --frames 100 --seed 1 --behaviour classic --rate 1 --non-atomic \
    > demo/simulate.log 2>&1 &
simulator=$!
trap 'kill "$simulator" 2>/dev/null || true' EXIT
.venv/bin/crop-clusterd run --config config.toml --watch demo/session --metadata -c track \
    --state demo/state -o demo/out -gs --exit-when-idle 15
wait "$simulator" || true
# One night (the simulator starts at 22:00): demo/out/<date>/, and demo/out/current
# points at it.
.venv/bin/python scripts/score.py demo/out/current/clusters.csv demo/session/labels.csv
echo "clusters: demo/out/current/clusters.csv   folders: demo/out/current/clusters/   state: demo/state/"
echo "gallery: open $(pwd)/demo/out/current/index.html in a browser (offline, from the file system)"
