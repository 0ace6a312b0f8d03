"""Scripted-expert success per task on LIBERO-Object and LIBERO-Spatial -> benchmarks/results/experts.json.

    PYTHONPATH=src .venv/bin/python benchmarks/experts.py --episodes 3 [--suites libero_object,libero_spatial]
        [--jobs 2] [--render [--image-size 128] [--depth]]

Each suite runs in its own process (``--jobs`` at a time); episode e of a task runs in a fresh env from the
benchmark's init state ``e % 50`` with layout and expert seed ``seed + e``. The expert uses privileged state only, so the success
sweep builds no renderer by default (``--render`` adds the cameras; rendering never changes the physics).
Collection speed with cameras is measured by ``benchmarks/collect.py``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def run_suite(suite: str, episodes: int, seed: int, image_size: int, depth: bool, tasks: list[int] | None,
              render: bool) -> dict:
    from spatial_forcing.envs.experts import fresh_env, run_expert_episode
    from spatial_forcing.envs.libero import list_tasks

    out = {}
    for info in list_tasks(suite):
        if tasks is not None and info.index not in tasks:
            continue
        t0 = time.perf_counter()
        rows = []
        for e in range(episodes):
            t1 = time.perf_counter()
            # a fresh env per episode, as `sf collect`: the episode depends on (task, e, seed) alone
            with fresh_env(suite, info.index, seed + e, image_size=image_size, depth=depth, render=render) as env:
                r = run_expert_episode(env, e % env.num_init_states, seed=seed + e)
                rows.append({"init_state": e % env.num_init_states, "success": r.success, "steps": r.steps,
                             "final_phase": r.phase, "seconds": round(time.perf_counter() - t1, 2)})
            print(f"{suite} task {info.index} ep {e}: success={r.success} steps={r.steps}", flush=True)
        steps = sum(r["steps"] for r in rows)
        wall = time.perf_counter() - t0
        out[str(info.index)] = {
            "name": info.name, "episodes": len(rows), "successes": sum(r["success"] for r in rows),
            "success_rate": sum(r["success"] for r in rows) / len(rows),
            "mean_steps_success": (sum(r["steps"] for r in rows if r["success"]) /
                                   max(1, sum(r["success"] for r in rows))),
            "env_steps_per_s_incl_reset": round(steps / wall, 2), "runs": rows,
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suites", default="libero_object,libero_spatial")
    ap.add_argument("--episodes", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--depth", action="store_true")
    ap.add_argument("--render", action="store_true", help="render the cameras (not needed by the expert)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--tasks", default=None, help="comma-separated task indices (default all)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "experts.json"))
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_part", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    tasks = [int(t) for t in args.tasks.split(",")] if args.tasks else None
    if args._worker:
        res = run_suite(args._worker, args.episodes, args.seed, args.image_size, args.depth, tasks, args.render)
        Path(args._part).write_text(json.dumps(res))
        return 0
    suites = args.suites.split(",")
    t0 = time.perf_counter()
    procs, parts = [], {}
    pending = list(suites)
    while pending or procs:
        while pending and len(procs) < args.jobs:
            s = pending.pop(0)
            part = Path(args.out).with_suffix(f".{s}.part.json")
            parts[s] = part
            cmd = [sys.executable, __file__, "--_worker", s, "--_part", str(part), "--episodes", str(args.episodes),
                   "--seed", str(args.seed), "--image-size", str(args.image_size)] + (["--depth"] if args.depth else []) \
                + (["--render"] if args.render else []) \
                + (["--tasks", args.tasks] if args.tasks else [])
            procs.append(subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT / "src"))))
        time.sleep(1.0)
        for p in list(procs):
            if p.poll() is not None:
                procs.remove(p)
    results = {s: json.loads(parts[s].read_text()) for s in suites if parts[s].is_file()}
    for part in parts.values():
        part.unlink(missing_ok=True)
    target = 0.9
    summary = {s: {t: r["success_rate"] for t, r in res.items()} for s, res in results.items()}
    doc = {
        "benchmark": "scripted LIBERO experts (spatial_forcing.envs.experts)",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
        "settings": {"episodes_per_task": args.episodes, "seed": args.seed, "image_size": args.image_size,
                     "depth": args.depth, "render": args.render,
                     "init_states": "episode e -> fresh env, init state e % 50, seed + e", "parallel_jobs": args.jobs},
        "target_success_rate": target,
        "tasks_meeting_target": sum(v >= target for r in summary.values() for v in r.values()),
        "tasks_total": sum(len(r) for r in summary.values()),
        "success_rate_per_task": summary,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
