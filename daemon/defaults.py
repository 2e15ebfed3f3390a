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

# Track thresholds chosen on the simulator's ground truth (scripts/bench_methods.py,
# see README "Benchmarks"). efficientnet-lite0: 0.65 had the best ARI averaged over
# seeds 0 and 1 (340 frames, ~5,200 crops each) with metadata and the default motion.
# dino and hierarchical were NOT benchmarked: placeholders until someone measures them.
TRACK_THRESHOLDS: Final[dict[str, float]] = {
    "efficientnet-lite0": 0.65,
    "dino": 0.6,
    "hierarchical": 0.8,
}

# --- gating (cosine with metadata; the old tool's rule and limits, SEED-NOTES.md) -------

MAX_CENTER_DIST_PX: Final = 100.0
NEAR_WINDOW_S: Final = 300.0
ANY_WINDOW_S: Final = 30.0

# --- track ------------------------------------------------------------------------------

# Chosen on the simulator (220 frames, seeds 0 and 1 tuned, 2 held out; README
# "Benchmarks", issue 11). See each value's note.
# A track stays matchable this many frames of its own trap after its last crop,
# and at most TRACK_IDLE_CAP_S seconds: frames, so a trap that shoots one frame a
# minute keeps its tracks; short, because an idle track is otherwise taken over
# by a newly arrived look-alike.
TRACK_IDLE_FRAMES: Final = 10
TRACK_IDLE_CAP_S: Final = 900.0
TRACK_MEMORY: Final = 3
# Fraction of the frame diagonal a crop may move from its track's last crop.
TRACK_MAX_MOVE: Final = 0.12
TRACK_MOVE_PENALTY: Final = 0.3
# A match must score similarity - move penalty - margin > 0: better than starting
# a new track, so two mediocre matches no longer beat one good one.
TRACK_MARGIN: Final = 0.5
# Without image_width/image_height in the metadata a trap's diagonal is estimated
# from the box centres seen in it; never below this (the smallest frames flat-bug
# sees are about 1,000 px wide).
TRACK_MIN_DIAGONAL_PX: Final = 1000.0
# Stitching (the second pass): prototype similarity, window, place.
STITCH_THRESHOLD: Final = 0.8
STITCH_GAP_FRAMES: Final = 30
STITCH_MAX_MOVE: Final = 0.12
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
