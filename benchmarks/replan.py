#!/usr/bin/env python
"""Closed-loop replanning for a small policy: does executing only the first k actions of each chunk
(then querying again) change LIBERO success?

Takes the final checkpoints of a finished `sf study` (both arms, every seed, one data fraction) and
evaluates each again with `--replan-steps k` for every k asked, with the study's own protocol (the
same suite, tasks, init states, image size, antialiasing and step limit). The study's evaluation of
the same checkpoint is the whole-chunk point (k = chunk length). For every (arm, k): success pooled
over seeds with a 95 % Wilson interval, and the paired difference to the whole-chunk run (bootstrap
over seeds and episodes, the same init states in both).

    MUJOCO_GL=egl PYTHONPATH=src python benchmarks/replan.py --study outputs/study --fraction 1 --k 4 2
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, git_commit, write_result  # noqa: E402


def outcomes(folder: Path, tasks: list[int], episodes: int) -> list[bool]:
    rows = {}
    for line in (folder / "episodes.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows[(r["task"], r["episode"])] = bool(r["success"])
    missing = [(t, e) for t in tasks for e in range(episodes) if (t, e) not in rows]
    if missing:
        raise SystemExit(f"{folder}: episodes missing from episodes.jsonl: {missing[:5]}")
    return [rows[(t, e)] for t in tasks for e in range(episodes)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default="outputs/study", help="a finished sf study folder")
    p.add_argument("--fraction", type=float, default=1.0, help="the data fraction whose checkpoints to use")
    p.add_argument("--k", type=int, nargs="+", default=[4, 2], help="actions executed per query")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "replan.json"))
    args = p.parse_args()

    import numpy as np

    from spatial_forcing.analysis.effects import paired_difference, rate_summary
    from spatial_forcing.cli import main as sf
    from spatial_forcing.study import StudyConfig

    study = Path(args.study)
    cfg = StudyConfig(**{k: v for k, v in json.loads((study / "study_config.json").read_text()).items()
                         if k in StudyConfig.__dataclass_fields__})
    final = cfg.checkpoints()[-1]
    result: dict = {"benchmark": "replan", "date": _dt.date.today().isoformat(),
                    "device": f"{platform.machine()}, {os.cpu_count()} CPU cores", "commit": git_commit(),
                    "study": str(study), "fraction": args.fraction, "step": final, "seeds": cfg.seeds,
                    "episodes_per_task": cfg.episodes, "arms": {}}
    t0 = time.perf_counter()
    for arm in ("sf", "baseline"):
        units = [f"f{args.fraction:g}_s{s}_{arm}" for s in range(cfg.seeds)]
        whole = None
        rows: dict = {}
        for unit in units:
            study_eval = study / "eval" / unit / f"step-{final:07d}"
            res = json.loads((study_eval / "results.json").read_text())
            tasks = [int(t) for t in res["selection"]["tasks"]]
            chunk = res["protocol"]["replan_steps"]
            rows.setdefault(chunk, []).append(outcomes(study_eval, tasks, cfg.episodes))
            whole = chunk
            for k in args.k:
                out = study / "replan" / unit / f"k{k}"
                if not (out / "results.json").is_file() or not json.loads((out / "results.json").read_text()).get("complete"):
                    argv = ["eval", "libero", "--policy", str(study / "runs" / unit / "checkpoints" / f"step-{final:07d}" / "policy"),
                            "--suite", cfg.suite, "--tasks", ",".join(map(str, tasks)), "--trials-per-task",
                            str(cfg.episodes), "--replan-steps", str(k), "--env-image-size", str(cfg.image_size),
                            "--workers", str(args.workers), "--seed", "7", "--videos", "none", "--output", str(out),
                            "--quiet"]
                    if cfg.eval_max_steps:
                        argv += ["--max-steps", str(cfg.eval_max_steps)]
                    if not cfg.antialias:
                        argv.append("--no-antialias")
                    print(" ".join(argv), flush=True)
                    if sf(argv) != 0:
                        raise SystemExit(f"evaluation failed: {out}")
                rows.setdefault(k, []).append(outcomes(out, tasks, cfg.episodes))
        arrays = {k: np.array(v) for k, v in rows.items()}
        result["arms"][arm] = {
            "whole_chunk": whole,
            "by_k": {str(k): {**rate_summary(a),
                              **({"vs_whole_chunk": paired_difference(a, arrays[whole])} if k != whole else {})}
                     for k, a in sorted(arrays.items(), reverse=True)}}
        for k, s in result["arms"][arm]["by_k"].items():
            diff = s.get("vs_whole_chunk")
            print(f"{arm:8s} k={k}: {100 * s['mean']:.0f} % [{100 * s['ci95'][0]:.0f}, {100 * s['ci95'][1]:.0f}]"
                  + (f"  vs whole chunk {100 * diff['difference']:+.0f} pts [{100 * diff['ci95'][0]:+.0f}, "
                     f"{100 * diff['ci95'][1]:+.0f}]" if diff else ""))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_result(Path(args.out), result)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
