"""LIBERO evaluation harness speed: raw ``env.step`` vs the harness, and scaling over worker processes.

    PYTHONPATH=src MUJOCO_GL=egl python benchmarks/eval.py [--steps 60] [--workers 1,2]

1. Harness overhead over raw ``env.step`` (target, issue 6: <= 10 %), on the OFT protocol env (256x256,
   agentview + wrist, no depth). The machine is shared, so the overhead is measured as two ratios that are
   each taken under the same load:
   * wrapper: ``LiberoEnv.step`` (canonical observation) vs robosuite's ``env.raw_env.step``, calls
     interleaved one by one in the same env, median over pairs;
   * loop: everything the harness does per policy step besides ``LiberoEnv.step`` and ``policy.infer``
     (rot180 views -> JPEG + Lanczos3 to 224 every 8 steps, proprio, chunk post-processing, queue,
     bookkeeping), from the timings an ``evaluate_libero`` episode records, with a zero-cost policy.
   overhead = (1 + wrapper) (1 + loop) - 1. Resets and the wait steps are excluded on both sides. The
   end-to-end ratio of separately timed raw and harness runs is reported too (noisier).
2. Throughput. ``sf eval libero`` with the random ``mini`` OFT policy (real checkpoint files, loaded once per
   worker) on 2 tasks x E episodes, with 1 and N worker processes: env steps per second of wall time
   (start-up, policy loading and resets included) and per worker (env steps / time inside episodes).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import device_name, git_commit, write_result  # noqa: E402

try:
    from spatial_forcing.eval.runner import evaluate_libero
except ImportError:  # run without PYTHONPATH=src
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from spatial_forcing.eval.runner import evaluate_libero
from spatial_forcing.normalize import DatasetStats
from spatial_forcing.envs.libero import LiberoEnv
from spatial_forcing.eval.policies import PolicyInfo, PolicyRef

SUITE = "libero_object"
TARGET_OVERHEAD = 0.10


class ZeroPolicy:
    """Zero motion, gripper open, chunk 8 (OFT convention); costs nothing, so the harness is what is timed."""

    info = PolicyInfo("zero", ("agentview", "wrist"), 224, 8, "oft")

    def reset(self, context):
        pass

    def infer(self, observation):
        return np.tile([0, 0, 0, 0, 0, 0, 1.0], (8, 1))


def step_seconds(steps: int) -> tuple[float, float]:
    """Median seconds of robosuite's ``env.step`` and of ``LiberoEnv.step``, interleaved in one protocol env
    after reset + wait steps."""
    with LiberoEnv(SUITE, 0, image_size=256, depth=False) as env:
        env.reset(0)
        env.settle()
        action = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0]
        raw, wrapped = [], []
        for _ in range(steps):
            t = time.perf_counter()
            env.raw_env.step(action)
            raw.append(time.perf_counter() - t)
            t = time.perf_counter()
            env.step(action, convention="raw")
            wrapped.append(time.perf_counter() - t)
        return statistics.median(raw), statistics.median(wrapped)


def harness_step_seconds(steps: int, out: Path) -> tuple[float, dict]:
    res = evaluate_libero(ZeroPolicy(), SUITE, tasks="0", trials_per_task=1, max_steps=steps, videos="none",
                          output=out, progress=False)
    import json

    (rec,) = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    assert rec["steps"] == steps and res["summary"]["episodes"] == 1
    loop = rec["seconds"] - rec["seconds_reset"] - rec["seconds_policy"]
    return loop / steps, {"env_step_s": rec["seconds_env"] / steps, "other_s": (loop - rec["seconds_env"]) / steps,
                          "loop_ratio": (loop - rec["seconds_env"]) / rec["seconds_env"]}


def mini_checkpoint(folder: Path) -> Path:
    from spatial_forcing.policies.oft.config import OFTConfig
    from spatial_forcing.policies.oft.model import OFTModel
    from spatial_forcing.policies.oft.policy import OFTPolicy
    from spatial_forcing.policies.oft.processor import OFTProcessor, load_tokenizer

    torch.manual_seed(0)
    cfg = OFTConfig.preset("mini")
    one = lambda n, v: [v] * n  # noqa: E731
    stats = DatasetStats.from_dict({
        "action": {"mean": one(7, 0.0), "std": one(7, 1.0), "min": one(7, -1.0), "max": one(7, 1.0),
                   "q01": one(6, -0.9) + [0.0], "q99": one(6, 0.9) + [1.0], "mask": one(6, True) + [False]},
        "proprio": {"mean": one(8, 0.0), "std": one(8, 1.0), "min": one(8, -1.0), "max": one(8, 1.0),
                    "q01": one(8, -1.0), "q99": one(8, 1.0)},
        "num_transitions": 1, "num_trajectories": 1})
    policy = OFTPolicy(OFTModel(cfg).eval(), OFTProcessor(cfg, load_tokenizer("bytes")),
                       {f"{SUITE}_no_noops": stats}, f"{SUITE}_no_noops")
    return policy.save_pretrained(folder)


def throughput(ckpt: Path, workers: int, episodes: int, steps: int, out: Path) -> dict:
    t = time.perf_counter()
    res = evaluate_libero(PolicyRef("oft", str(ckpt), device="cpu"), SUITE, tasks="0,1", trials_per_task=episodes,
                          max_steps=steps, workers=workers, videos="none", output=out, progress=False)
    wall = time.perf_counter() - t
    s = res["summary"]
    per_worker = s["env_steps"] / s["seconds"]
    return {"workers": workers, "episodes": s["episodes"], "env_steps": s["env_steps"], "wall_s": round(wall, 2),
            "env_steps_per_s_wall": round(s["env_steps"] / wall, 2),
            "env_steps_per_s_per_worker": round(per_worker, 2),
            "env_steps_per_s_steady": round(per_worker * min(workers, 2 * episodes), 2)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="policy steps per overhead round / throughput episode")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--episodes", type=int, default=3, help="episodes per task in the throughput runs")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "eval.json")
    args = p.parse_args(argv)
    raw, wrapped, harness, parts = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            raw_s, wrapped_s = step_seconds(args.steps)
            raw.append(raw_s)
            wrapped.append(wrapped_s)
            h, split = harness_step_seconds(args.steps, Path(tmp) / f"zero{r}")
            harness.append(h)
            parts.append(split)
            print(f"round {r}: raw env.step {1000 * raw_s:.1f} ms, LiberoEnv.step {1000 * wrapped_s:.1f} ms; harness "
                  f"{1000 * h:.1f} ms/step (LiberoEnv.step {1000 * split['env_step_s']:.1f}, "
                  f"rest {1000 * split['other_s']:.2f})")
        wrapper = statistics.median(w / r for w, r in zip(wrapped, raw)) - 1
        loop = statistics.median(x["loop_ratio"] for x in parts)
        overhead = (1 + wrapper) * (1 + loop) - 1
        raw_s, harness_s = statistics.median(raw), statistics.median(harness)
        ckpt = mini_checkpoint(Path(tmp) / "mini")
        scaling = {}
        for w in (int(x) for x in args.workers.split(",")):
            scaling[f"workers_{w}"] = row = throughput(ckpt, w, args.episodes, args.steps, Path(tmp) / f"w{w}")
            print(f"workers {w}: {row['env_steps']} env steps in {row['wall_s']} s = {row['env_steps_per_s_wall']} "
                  f"steps/s; inside episodes {row['env_steps_per_s_per_worker']} per worker, "
                  f"{row['env_steps_per_s_steady']} in all")
    rates = [v["env_steps_per_s_wall"] for v in scaling.values()]
    steady = [v["env_steps_per_s_steady"] for v in scaling.values()]
    doc = {"benchmark": "eval", "date": _dt.date.today().isoformat(), "device": device_name(torch.device("cpu")),
           "commit": git_commit(), "suite": SUITE,
           "settings": "OFT protocol env: 256x256 agentview + wrist, no depth, MUJOCO_GL egl (llvmpipe)",
           "overhead": {"raw_env_step_ms": round(1000 * raw_s, 2), "wrapped_env_step_ms": round(1000 * statistics.median(wrapped), 2),
                        "wrapper_overhead": round(wrapper, 4),
                        "harness_step_ms": round(1000 * harness_s, 2),
                        "harness_env_step_ms": round(1000 * statistics.median(x["env_step_s"] for x in parts), 2),
                        "harness_other_ms": round(1000 * statistics.median(x["other_s"] for x in parts), 3),
                        "loop_overhead": round(loop, 4), "overhead": round(overhead, 4),
                        "end_to_end_ratio_minus_1": round(harness_s / raw_s - 1, 4),
                        "rounds": args.rounds, "steps_per_round": args.steps,
                        "raw_env_steps_per_s": round(1 / raw_s, 2), "target": TARGET_OVERHEAD,
                        "pass": overhead <= TARGET_OVERHEAD},
           "throughput": {"policy": "mini OFT (random weights), CPU, loaded once per worker",
                          "tasks": 2, "episodes_per_task": args.episodes, "max_steps": args.steps, **scaling,
                          "speedup": round(rates[-1] / rates[0], 2) if len(rates) > 1 else None,  # wall
                          "speedup_steady": round(steady[-1] / steady[0], 2) if len(steady) > 1 else None,
                          "notes": "wall: start-up (spawn, imports, policy load, env creation) included; steady: "
                                   "env steps per second inside episodes x workers. One process renders with "
                                   "llvmpipe on every core; a worker gets cores / workers render threads."}}
    write_result(args.out, doc)
    print(f"harness overhead {100 * overhead:+.1f} % (target <= {100 * TARGET_OVERHEAD:.0f} %): "
          f"{'PASS' if doc['overhead']['pass'] else 'FAIL'}; wrote {args.out}")
    return doc


if __name__ == "__main__":
    main()
