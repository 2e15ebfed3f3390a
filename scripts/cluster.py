"""The old batch tool's command line, kept working: same flags, same meanings.

    python scripts/cluster.py -i CROPS -o OUT [-mf META --time_format FMT]
        [-d DEVICE] [-e dino|hierarchical|efficientnet-lite0] [-fp MODEL]
        [-kp] [-gs] [-c cosine|track] [-th 0.9] [-se] [-sl] [-x N]

It runs ``crop-clusterd cluster`` with the same arguments (the new options work
here too); see ``crop-clusterd cluster --help``.
"""

from __future__ import annotations

import sys

from crop_clusterd.cli import main

if __name__ == "__main__":
    sys.exit(main(["cluster", *sys.argv[1:]]))
