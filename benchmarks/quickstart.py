#!/usr/bin/env python
"""`sf quickstart` with its defaults, recorded as a benchmark: wall time (target <= 15 min on 2 CPU
cores) and the depth-probe R^2 of the SF and the baseline student (SF must be above).

    PYTHONPATH=src MUJOCO_GL=egl python benchmarks/quickstart.py      # -> results/quickstart.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spatial_forcing.cli import main as sf_main

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quickstart.json")
    p.add_argument("--work", default="outputs/quickstart_bench", help="the quickstart's output folder")
    args = p.parse_args()
    sys.exit(sf_main(["quickstart", "--out", args.work, "--record", str(args.out), "--quiet"]))
