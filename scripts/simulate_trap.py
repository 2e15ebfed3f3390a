#!/usr/bin/env python3
"""Write a seeded synthetic camera-trap night (flat-bug crops, labels.csv and truth.csv).

Run from the repository root with the package installed, e.g.
``python scripts/simulate_trap.py -o demo --frames 300``; ``--help`` lists the flags.
"""

from __future__ import annotations

import sys

from crop_clusterd.simulate import main

if __name__ == "__main__":
    sys.exit(main())
