"""Collection speed of `sf collect libero`: env steps/s at 128x128 with depth, both cameras, recorded
into a LeRobot v3 mp4 dataset, with one simulator process and with one per core.

    PYTHONPATH=src MUJOCO_GL=egl python benchmarks/collect.py [--tasks 0,1] [--episodes 2] [--jobs 1,2]

Counts every executed env step (attempts that fail included) over the whole wall time: environment
construction, resets, rendering, the expert, encoding and writing. Target (issue): >= 10 env steps/s on
this 2-core machine.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import tempfile
from pathlib import Path

import torch

from common import device_name, git_commit, write_result  # noqa: E402

try:
    from spatial_forcing.envs.collect import collect_libero
except ImportError:  # run without PYTHONPATH=src
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from spatial_forcing.envs.collect import collect_libero

TARGET = 10.0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="libero_object")
    p.add_argument("--tasks", default="0,1")
    p.add_argument("--episodes", type=int, default=4, help="successful episodes per task")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--jobs", default="1,2", help="comma-separated worker counts to measure")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "collect.json")
    args = p.parse_args(argv)
    results = {}
    for jobs in (int(j) for j in args.jobs.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            s = collect_libero(args.suite, args.tasks, args.episodes, Path(tmp) / "ds", image_size=args.image_size,
                               depth=True, seed=0, video=True, progress=False, jobs=jobs)
        results[f"jobs_{jobs}"] = {"jobs": jobs, "episodes": s["episodes"], "attempts": s["attempts"],
                                   "env_steps": s["env_steps"], "seconds": round(s["seconds"], 2),
                                   "env_steps_per_s": round(s["env_steps_per_s"], 2)}
        print(f"jobs {jobs}: {s['env_steps']} env steps in {s['seconds']:.1f} s = "
              f"{s['env_steps_per_s']:.2f} steps/s ({s['episodes']} episodes kept of {s['attempts']})")
    best = max(r["env_steps_per_s"] for r in results.values())
    out = {"benchmark": "collect", "date": _dt.date.today().isoformat(), "device": device_name(torch.device("cpu")),
           "commit": git_commit(), "suite": args.suite, "tasks": args.tasks, "episodes_per_task": args.episodes,
           "settings": f"{args.image_size}x{args.image_size}, depth, agentview + wrist, mp4 (LeRobot v3)",
           "results": results, "target_env_steps_per_s": TARGET, "best_env_steps_per_s": best,
           "pass": best >= TARGET}
    write_result(args.out, out)
    print(f"target >= {TARGET:.0f} env steps/s: {'PASS' if out['pass'] else 'FAIL'} (best {best:.2f}); wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
