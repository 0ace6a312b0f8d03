"""Collect scripted-expert LIBERO demonstrations into a LeRobot v3.0 dataset (``sf collect libero``).

Recorded per step (DATA.md A.4/A.5 conventions): both RGB cameras (``agentview``, ``wrist``; the published
"rot180" orientation), metric depth, intrinsics and extrinsics per camera, the 8-D OFT state, the 7-D raw
action (gripper -1 open / +1 close, as LIBERO's demos and the RLDS) and the instruction. As in the
published ``no_noops`` data: 10 unrecorded settle steps after ``reset``; the observation is recorded
before each kept action; no-ops (``||a[:6]|| < 1e-4`` and same gripper as the previous kept action) are
neither recorded nor executed; only successful episodes are kept (failures are discarded). Episode e of
a task starts from the benchmark's init state ``e % num_init_states``; the env is seeded with ``seed``
and the expert with ``seed + e``, so a run is deterministic per seed.

Public API
----------
    parse_tasks(suite, spec) -> [TaskInfo]      spec: "all" | "0,1,2" | names (comma-separated)
    collect_libero(suite, tasks="all", episodes_per_task=50, out=..., image_size=128, depth=True, seed=0,
                   video=True, progress=True, overwrite=False, max_attempts_factor=2) -> dict summary
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from spatial_forcing.data.schema import ACTION, DEPTH, EXTRINSICS, IMAGE, INTRINSICS, STATE
from spatial_forcing.envs.libero import STATE_DIM, ACTION_DIM, TaskInfo, get_task, list_suites, list_tasks

FPS = 20
CAMERAS = ("agentview", "wrist")


def parse_tasks(suite: str, spec: str | Sequence[int | str] = "all") -> list[TaskInfo]:
    """Resolve a task selection: "all", comma-separated indices and/or task names, or a sequence."""
    if suite not in list_suites(complete_only=False):
        raise ValueError(f"unknown LIBERO suite {suite!r}; valid suites: {list_suites(complete_only=False)}")
    if isinstance(spec, str):
        if spec.strip().lower() == "all":
            return list_tasks(suite)
        items: list[int | str] = []
        for part in (p.strip() for p in spec.split(",")):
            if part:
                items.append(int(part) if part.lstrip("-").isdigit() else part)
    else:
        items = list(spec)
    if not items:
        raise ValueError(f"no tasks selected from {spec!r}; use 'all', indices or names of suite {suite!r}")
    return [get_task(suite, t) for t in items]


def _frame(obs: dict[str, Any], action: np.ndarray, depth: bool) -> dict[str, Any]:
    frame = {STATE: obs[STATE], ACTION: np.asarray(action, dtype=np.float32)}
    for cam in CAMERAS:
        frame[IMAGE + cam] = obs[IMAGE + cam]
        if depth:
            frame[DEPTH + cam] = obs[DEPTH + cam]
        frame[INTRINSICS + cam] = obs[INTRINSICS + cam]
        frame[EXTRINSICS + cam] = obs[EXTRINSICS + cam]
    return frame


def collect_libero(suite: str, tasks: str | Sequence[int | str] = "all", episodes_per_task: int = 50,
                   out: str | Path = "outputs/libero_expert", *, image_size: int = 128, depth: bool = True,
                   seed: int = 0, video: bool = True, progress: bool = True, overwrite: bool = False,
                   depth_dtype: str = "float32", max_attempts_factor: float = 2.0) -> dict[str, Any]:
    """Record `episodes_per_task` successful expert episodes per task (at most
    ``ceil(max_attempts_factor * episodes_per_task)`` attempts each) into one LeRobot dataset at `out`.

    Returns a summary: per task attempts, successes, success rate, mean recorded length, env steps/s;
    totals. Failed attempts are discarded (``discard_episode``)."""
    from spatial_forcing.data.lerobot import LeRobotWriter, canonical_features
    from spatial_forcing.envs.experts import run_expert_episode
    from spatial_forcing.envs.libero import LiberoEnv

    if episodes_per_task < 1:
        raise ValueError(f"episodes_per_task: expected >= 1, found {episodes_per_task}")
    infos = parse_tasks(suite, tasks)
    feats = canonical_features({c: (image_size, image_size) for c in CAMERAS}, STATE_DIM, ACTION_DIM,
                               depth=depth, intrinsics=True, extrinsics=True, depth_dtype=depth_dtype, video=video)
    max_attempts = int(np.ceil(max_attempts_factor * episodes_per_task))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(infos) * episodes_per_task, desc=f"collect {suite}", unit="ep")
    summary: dict[str, Any] = {"suite": suite, "out": str(out), "image_size": image_size, "depth": depth,
                               "seed": seed, "tasks": {}}
    t_start = time.perf_counter()
    total_steps = 0
    with LeRobotWriter(out, FPS, feats, robot_type="panda", video=video,
                       camera_keys=[IMAGE + c for c in CAMERAS], overwrite=overwrite) as writer:
        for info in infos:
            env = LiberoEnv(suite, info.index, image_size=image_size, depth=depth, seed=seed)
            t0 = time.perf_counter()
            attempts = successes = steps = 0
            lengths: list[int] = []
            try:
                while successes < episodes_per_task and attempts < max_attempts:
                    e = attempts
                    attempts += 1
                    frames: list[int] = [0]

                    def record(obs: dict[str, Any], action: np.ndarray) -> None:
                        writer.add_frame(_frame(obs, action, depth))
                        frames[0] += 1

                    result = run_expert_episode(env, e % env.num_init_states, seed=seed + e, on_step=record)
                    steps += result.steps
                    if result.success:
                        writer.save_episode(task=env.instruction)
                        successes += 1
                        lengths.append(frames[0])
                        if bar is not None:
                            bar.update(1)
                    else:
                        writer.discard_episode()
                    if bar is not None:
                        bar.set_postfix(task=info.index, ok=f"{successes}/{attempts}")
            finally:
                env.close()
            wall = time.perf_counter() - t0
            total_steps += steps
            summary["tasks"][info.name] = {
                "index": info.index, "instruction": info.language, "attempts": attempts, "successes": successes,
                "success_rate": successes / max(1, attempts),
                "mean_length": float(np.mean(lengths)) if lengths else 0.0,
                "env_steps": steps, "env_steps_per_s": steps / wall if wall > 0 else 0.0,
            }
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t_start
    summary.update(episodes=sum(t["successes"] for t in summary["tasks"].values()),
                   attempts=sum(t["attempts"] for t in summary["tasks"].values()),
                   env_steps=total_steps, seconds=wall,
                   env_steps_per_s=total_steps / wall if wall > 0 else 0.0)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"{'task':<4} {'ok/try':>7} {'rate':>6} {'len':>6} {'steps/s':>8}  name"]
    for name, t in summary["tasks"].items():
        lines.append(f"{t['index']:<4} {t['successes']:>3}/{t['attempts']:<3} {t['success_rate']:>6.0%} "
                     f"{t['mean_length']:>6.1f} {t['env_steps_per_s']:>8.1f}  {name}")
    lines.append(f"total: {summary['episodes']} episodes kept of {summary['attempts']} attempts, "
                 f"{summary['env_steps']} env steps in {summary['seconds']:.1f} s "
                 f"({summary['env_steps_per_s']:.1f} steps/s) -> {summary['out']}")
    return "\n".join(lines)
