"""Every engine default, written once.

The config schema (:mod:`crop_clusterd.config`), the command line and the
engines (:mod:`crop_clusterd.linking`, :mod:`crop_clusterd.embed`) all read
their defaults from here, so a default changed here changes everywhere. This
module imports nothing, so the config can read it without importing torch,
hnswlib or scipy. Settings that only one place uses (batch size, folders,
intervals) keep their default in the config schema, their one place.
"""

from __future__ import annotations

from typing import Final

# --- embedders ------------------------------------------------------------------------

# Registry names, in the order the help text lists them; the first is the default.
EMBEDDER_NAMES: Final = ("efficientnet-lite0", "dino", "hierarchical")
DEFAULT_EMBEDDER: Final = EMBEDDER_NAMES[0]

# How `dino` prepares a crop for its processor, recorded in a dino state folder:
# since issue 9 (thin crops) every crop is padded to a square first, so a state
# folder built before (centre-cropped embeddings) refuses to resume rather than
# mix the two kinds of embedding.
DINO_PREPROCESS: Final = "pad-square"

# --- linking methods and thresholds -----------------------------------------------------

METHODS: Final = ("cosine", "track")
DEFAULT_METHOD: Final = "cosine"

# The old batch tool's threshold (SEED-NOTES.md); the cosine default everywhere.
COSINE_THRESHOLD: Final = 0.9

# Track thresholds chosen on the simulator's ground truth. efficientnet-lite0: 0.4
# (issue 11; was 0.65 before margin matching): with TRACK_MARGIN it is the margin
# that decides (a match needs similarity > 0.4 + move cost), the threshold is only
# the floor; 0.5 kept ARI but gave 1.23 clusters per individual on classic seed 0,
# 0.65 gave 2.36 (README "Benchmarks"). The real crops of shared/seed-example give
# their 9 individuals at 0.4 as at 0.65. dino and hierarchical were NOT
# benchmarked: placeholders until someone measures them.
TRACK_THRESHOLDS: Final[dict[str, float]] = {
    "efficientnet-lite0": 0.4,
    "dino": 0.6,
    "hierarchical": 0.8,
}

# --- gating (cosine with metadata; the old tool's rule and limits, SEED-NOTES.md) -------

MAX_CENTER_DIST_PX: Final = 100.0
NEAR_WINDOW_S: Final = 300.0
ANY_WINDOW_S: Final = 30.0

# --- track ------------------------------------------------------------------------------

# Chosen on the simulator (bundled model, with -mf; README "Benchmarks", issue 11):
# sessions of `simulate --frames 220 --seed S` in both behaviours, `classic` (the
# sessions the issue analysed) and `trap` (returns, still periods, runs of missed
# detections); seeds 0 and 1 of each tuned by coordinate search, seed 2 of each
# held out. Mean over the four tuning sessions: ARI 0.966, 1.08 clusters per
# individual (before: 0.733, 1.60). Each note gives the neighbouring values as
# ARI on classic 0 / classic 1 / trap 0 / trap 1.
#
# A track stays matchable this many frames of its own trap after its last crop,
# and at most TRACK_IDLE_CAP_S seconds: frames, so a trap that shoots one frame a
# minute keeps its tracks; short, because an idle track was otherwise taken over by
# a newly arrived look-alike (longer gaps are the stitching's). 4: trap 1 lost
# 0.03 (runs of missed detections), trap 0 gained 0.01; 6: classic 1 lost 0.01;
# 10 (the first guess) lost 0.06 on classic 0.
TRACK_IDLE_FRAMES: Final = 5
# 15 minutes: only a trap shooting less than a frame every 180 s reaches it.
TRACK_IDLE_CAP_S: Final = 900.0
TRACK_MEMORY: Final = 3
# Fraction of the frame diagonal a crop may move from its track's last crop (0.12
# of a 4000 x 3000 frame: 600 px; the simulator's hops go to 500 px). 0.09 lost
# 0.005 on classic 1, 0.16 lost 0.04-0.06 (look-alikes continue each other).
TRACK_MAX_MOVE: Final = 0.12
# 0.1 lost 0.02-0.10 on classic (a far look-alike wins), 0.5 lost 0.01 and split more.
TRACK_MOVE_PENALTY: Final = 0.3
# A match must score similarity - move penalty - margin > 0: better than starting
# a new track, so two mediocre matches no longer beat one good one. 0.45: +0.005
# on classic 1 and trap 1 but 1.21 clusters per individual on trap 1 (1.15);
# 0.35: classic lost 0.01-0.02, merging individuals; 0.5: 1.23 on classic 0.
TRACK_MARGIN: Final = 0.4
# Without image_width/image_height in the metadata a trap's diagonal is estimated
# from the box centres seen in it; never below this (the smallest frames flat-bug
# sees are about 1,000 px wide).
TRACK_MIN_DIAGONAL_PX: Final = 1000.0
# Stitching (the second pass). Prototype (mean embedding) similarity: 0.85 gave
# the same but split more on trap 0 (1.27 clusters per individual at gap 10).
STITCH_THRESHOLD: Final = 0.75
# Window after a tracklet's end, frames of its trap. What it joins are mostly
# runs of missed detections of a still insect (trap: 6-13 frames). 5: trap lost
# 0.03-0.14; 10: trap 0 lost 0.005; 20: classic 0 lost 0.01.
STITCH_GAP_FRAMES: Final = 15
# Distance from where it ended (or, for a blurred half, between the mean
# positions), fraction of the diagonal (0.04 of 4000 x 3000: 200 px). Tight,
# because a look-alike arriving where another left within the window is the
# classic sessions' failure: 0.12 lost 0.03-0.05 there at gap 10-15. 0.03: the
# same; 0.06: trap 1 +0.002, classic 1 -0.002.
STITCH_MAX_MOVE: Final = 0.04
# Thirty minutes: a cap for traps shooting less than a frame every 2 minutes.
STITCH_CAP_S: Final = 1800.0

# --- HNSW (ungated cosine) ---------------------------------------------------------------

# Measured on clustered 384-d data (scripts/check_oracle.py): M=32 misses ten times
# fewer neighbours above the threshold than M=16 at the same ef, for about 20% more
# build time.
HNSW_M: Final = 32
HNSW_EF_CONSTRUCTION: Final = 100
# With whole-batch indexing and anchor pairs, ef=64 and ef=128 matched the all-pairs
# oracle exactly at 200,000 crops; 128 keeps a margin for a million.
HNSW_EF_SEARCH: Final = 128


# --- exact products or an index (issue 13) -----------------------------------------------

# The cost model that picks, for a batch at least as large as what came before it
# (the batch command's one batch), between the exact all-pairs search and an HNSW
# index: exact costs EXACT_S_PER_PAIR_DIM * pairs * dim CPU seconds, the index
# INDEX_S_PER_CROP_DIM_LOG * crops * dim * log2(crops). Fitted to the "method CPU
# s" of scripts/bench_peers.py at 200,000 x 384 (2 cores, shared):
#     python scripts/bench_peers.py --sizes 200000 --methods crop-clusterd crop-clusterd-index
# exact 70.3 s on `easy` (51.3 s on `near`) for 2.0e10 pairs; the index 100.6 s on
# `easy` (at 50,000: 27.7 s `easy`, 63.2 s `near`). Each takes the data kind that
# makes it cheapest relative to the other (exact's dearer, the index's cheaper),
# so the crossover, about 290,000 crops whatever the dimension, errs towards the
# index; near-threshold data would be served exactly well beyond it.
EXACT_S_PER_PAIR_DIM: Final = 9.2e-12
INDEX_S_PER_CROP_DIM_LOG: Final = 7.4e-8

# Buckets (linking/buckets.py), the batch command's search past the crossover: about
# BUCKET_CROPS crops per k-means bucket, each crop compared with its own bucket and the
# BUCKET_PROBES - 1 next most similar ones. Exact pairs missed at 200,000 near-threshold
# crops (403,994 pairs; k-means with 3 passes over every crop): 2 at 200 crops and 16
# probes, none split a cluster; 14 at 400 crops. 200 balances the two costs below at a
# million crops (each crop's share of the k-means passes against its probes).
BUCKET_CROPS: Final = 200
BUCKET_PROBES: Final = 16
# Their CPU cost, fitted to one run of each phase at 1,000,000 x 384 `easy` crops
# (2 cores): the k-means passes and assignment 163.7 s for 1e6 crops x 5,000 buckets x
# 384 dims, the probes 56.9 s for 1e6 crops x 3,200 probed crops x 384 dims.
BUCKET_S_PER_CENTRE_DIM: Final = 8.5e-11
BUCKET_S_PER_PROBE_DIM: Final = 4.6e-11
# Exact products cannot miss a pair and buckets can, so exact is kept while it costs
# at most this many times the buckets' estimate: the crossover falls at about 300,000
# crops, and every size the peers are compared at (up to 200,000) is exact.
EXACT_PREMIUM: Final = 5.0


def default_threshold(method: str, embedder: str) -> float:
    """The threshold a method uses when none is given.

    ``cosine``: :data:`COSINE_THRESHOLD` whatever the embedder. ``track``: the
    embedder's entry in :data:`TRACK_THRESHOLDS`, else :data:`COSINE_THRESHOLD`.
    """
    if method == "track":
        return TRACK_THRESHOLDS.get(embedder, COSINE_THRESHOLD)
    return COSINE_THRESHOLD


# --- sessions -----------------------------------------------------------------------------

# A trap's night straddles midnight; noon is the hour no light trap runs, so a night
# never splits (issue 10). Local hour of the frames' capture time.
NIGHT_STARTS_H: Final = 12.0
# "gap" sessions: an hour without crops ends one (a trap's breaks within a night,
# such as rain or a full card, are shorter).
SESSION_GAP_S: Final = 3600.0
# The open session closes after 6 h without crops: past the end of any night's
# activity, before the next evening's.
SESSION_CLOSE_AFTER_S: Final = 21600.0
# The id of the one session of split = "none".
ALL_SESSION: Final = "all"

# --- watching -------------------------------------------------------------------------------

# A folder whose whole subtree has not changed for this long is frozen: routine walks
# of the watched tree skip it (events and the verify walk after a start still see it).
# flat-bug writes a night's folders during that night only, so once the night's
# session has gone quiet for SESSION_CLOSE_AFTER_S its folders have stopped changing.
FREEZE_AFTER_S: Final = SESSION_CLOSE_AFTER_S
