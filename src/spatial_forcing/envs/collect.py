"""Collect scripted-expert LIBERO demonstrations into a LeRobot v3.0 dataset (``sf collect libero``).

Recorded per step (DATA.md A.4/A.5 conventions): both RGB cameras (``agentview``, ``wrist``; the published
"rot180" orientation), metric depth, intrinsics and extrinsics per camera, the 8-D OFT state, the 7-D raw
action (gripper -1 open / +1 close, as LIBERO's demos and the RLDS) and the instruction. As in the
published ``no_noops`` data: 10 unrecorded settle steps after ``reset``; the observation is recorded
before each kept action; no-ops (``||a[:6]|| < 1e-4`` and same gripper as the previous kept action) are
neither recorded nor executed; only successful episodes are kept (failures are discarded). Episode e of
a task runs in a fresh env (``experts.fresh_env``) from the benchmark's init state
``(first_init_state + e) % num_init_states``,
with the fixtures' layout and the expert both seeded with ``seed + e``, so each attempt, and the whole run,
is deterministic per seed. ``jobs > 1`` spreads the attempts
over worker processes and consumes them in attempt order: the same dataset, faster.

Public API
----------
    parse_tasks(suite, spec) -> [TaskInfo]      spec: "all" | "0,1,2" | names (comma-separated)
    collect_libero(suite, tasks="all", episodes_per_task=50, out=..., image_size=128, depth=True, seed=0,
                   video=True, progress=True, overwrite=False, max_attempts_factor=2, jobs=1) -> dict summary
"""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Sequence

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


Outcome = tuple[bool, int, "list[dict[str, Any]] | None", str]


def _run_attempt(suite: str, task: int, attempt: int, *, image_size: int, depth: bool, seed: int,
                 first_init_state: int = 0, antialias: bool = True) -> Outcome:
    """One expert attempt in a fresh env (`fresh_env`: the attempt is a function of its arguments alone,
    whichever process runs it): (success, executed steps, the recorded frames if it succeeded, instruction)."""
    from spatial_forcing.envs.experts import fresh_env, run_expert_episode

    frames: list[dict[str, Any]] = []
    with fresh_env(suite, task, seed + attempt, image_size=image_size, depth=depth, antialias=antialias) as env:
        result = run_expert_episode(env, (first_init_state + attempt) % env.num_init_states, seed=seed + attempt,
                                    on_step=lambda obs, a: frames.append(_frame(obs, a, depth)))
        instruction = env.instruction
    return result.success, result.steps, (frames if result.success else None), instruction


def _worker_init() -> None:
    # one llvmpipe thread per worker process: the workers already fill the cores
    os.environ.setdefault("LP_NUM_THREADS", "1")


class _InlineExecutor:
    """``jobs=1``: `submit` runs the call at once, so the schedule below runs attempts one by one."""

    def submit(self, fn: Any, *args: Any) -> Future:
        future: Future = Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


class _Schedule:
    """Which (task, attempt) runs next. At most `jobs` attempts are in flight; a task gets another attempt
    only while its successes plus its attempts in flight fall short of `needed`, earliest task first, so
    workers start the next task while the last attempts of the current one finish, and no attempt beyond
    need is started unless one failed. Results are consumed task by task in attempt order: the dataset
    and every stopping point are those of ``jobs=1``."""

    def __init__(self, executor: Any, call: Any, tasks: list[TaskInfo], needed: int, max_attempts: int,
                 jobs: int) -> None:
        self.executor, self.call, self.tasks = executor, call, tasks
        self.needed, self.max_attempts, self.jobs = needed, max_attempts, jobs
        self.next_attempt = [0] * len(tasks)
        self.successes = [0] * len(tasks)
        self.in_flight: list[deque] = [deque() for _ in tasks]
        self.current = 0

    def _wants(self, i: int) -> bool:
        return (self.successes[i] + len(self.in_flight[i]) < self.needed
                and self.next_attempt[i] < self.max_attempts)

    def _fill(self) -> None:
        while sum(len(q) for q in self.in_flight) < self.jobs:
            i = next((i for i in range(self.current, len(self.tasks)) if self._wants(i)), None)
            if i is None:
                return
            self.in_flight[i].append(self.executor.submit(self.call, self.tasks[i].index, self.next_attempt[i]))
            self.next_attempt[i] += 1

    def outcomes(self, i: int) -> Iterator[Outcome]:
        """Task `i`'s attempts in order until it has `needed` successes or runs out of attempts."""
        self.current = i
        while self.successes[i] < self.needed:
            self._fill()
            if not self.in_flight[i]:
                return
            outcome = self.in_flight[i].popleft().result()
            self.successes[i] += bool(outcome[0])
            yield outcome
        for future in self.in_flight[i]:  # started after a failure that a later success made unneeded
            future.cancel()
        self.in_flight[i].clear()


def _executor(jobs: int) -> Any:
    if jobs == 1:
        return _InlineExecutor()
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init)


def collect_libero(suite: str, tasks: str | Sequence[int | str] = "all", episodes_per_task: int = 50,
                   out: str | Path = "outputs/libero_expert", *, image_size: int = 128, depth: bool = True,
                   seed: int = 0, video: bool = True, progress: bool = True, overwrite: bool = False,
                   depth_format: str | None = None, max_attempts_factor: float = 2.0, jobs: int = 1,
                   first_init_state: int = 0, antialias: bool = True) -> dict[str, Any]:
    """Record `episodes_per_task` successful expert episodes per task (at most
    ``ceil(max_attempts_factor * episodes_per_task)`` attempts each) into one LeRobot dataset at `out`.

    ``jobs > 1`` runs the attempts in that many worker processes (one simulator each); the dataset is the
    same as with ``jobs=1``. Returns a summary: per task attempts, successes, success rate, mean recorded
    length, env steps; totals with env steps/s. Failed attempts are discarded. Attempt a starts from the
    benchmark's init state ``(first_init_state + a) % 50``. Evaluation runs episode i from init state i, so
    with `first_init_state` at least the number of evaluated episodes (and no wrap-around past 50), the
    evaluated scenes are not among the demonstrations. `antialias=False` renders without MuJoCo's
    multisampling (faster; evaluate such data with the same setting). `depth_format` stores depth as
    LeRobot's 12-bit depth video ("video", the default with `video`), or lossless float32 / float16
    parquet columns (`canonical_features`)."""
    from spatial_forcing.data.lerobot import LeRobotWriter, canonical_features

    if episodes_per_task < 1:
        raise ValueError(f"episodes_per_task: expected >= 1, found {episodes_per_task}")
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs: expected an int >= 1, found {jobs!r}")
    if not isinstance(first_init_state, int) or first_init_state < 0:
        raise ValueError(f"first_init_state: expected an int >= 0, found {first_init_state!r}")
    infos = parse_tasks(suite, tasks)
    feats = canonical_features({c: (image_size, image_size) for c in CAMERAS}, STATE_DIM, ACTION_DIM,
                               depth=depth, intrinsics=True, extrinsics=True, depth_format=depth_format, video=video)
    max_attempts = int(np.ceil(max_attempts_factor * episodes_per_task))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(infos) * episodes_per_task, desc=f"collect {suite}", unit="ep")
    summary: dict[str, Any] = {"suite": suite, "out": str(out), "image_size": image_size, "depth": depth,
                               "seed": seed, "jobs": jobs, "first_init_state": first_init_state, "antialias": antialias,
                               "tasks": {}}
    t_start = time.perf_counter()
    executor = _executor(jobs)
    schedule = _Schedule(executor, partial(_run_attempt, suite, image_size=image_size, depth=depth, seed=seed,
                                           first_init_state=first_init_state, antialias=antialias),
                         infos, episodes_per_task, max_attempts, jobs)
    try:
        with LeRobotWriter(out, FPS, feats, robot_type="panda", video=video,
                           camera_keys=[IMAGE + c for c in CAMERAS], overwrite=overwrite) as writer:
            for i, info in enumerate(infos):
                attempts = steps = 0
                lengths: list[int] = []
                for _, n_steps, frames, instruction in schedule.outcomes(i):
                    attempts += 1
                    steps += n_steps
                    if frames is not None:  # kept only for successes
                        for frame in frames:
                            writer.add_frame(frame)
                        writer.save_episode(task=instruction)
                        lengths.append(len(frames))
                        if bar is not None:
                            bar.update(1)
                    if bar is not None:
                        bar.set_postfix(task=info.index, ok=f"{len(lengths)}/{attempts}")
                summary["tasks"][info.name] = {
                    "index": info.index, "instruction": info.language, "attempts": attempts,
                    "successes": len(lengths), "success_rate": len(lengths) / max(1, attempts),
                    "mean_length": float(np.mean(lengths)) if lengths else 0.0, "env_steps": steps,
                }
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - t_start
    total_steps = sum(t["env_steps"] for t in summary["tasks"].values())
    summary.update(episodes=sum(t["successes"] for t in summary["tasks"].values()),
                   attempts=sum(t["attempts"] for t in summary["tasks"].values()),
                   env_steps=total_steps, seconds=wall,
                   env_steps_per_s=total_steps / wall if wall > 0 else 0.0)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"{'task':<4} {'ok/try':>7} {'rate':>6} {'len':>6} {'steps':>6}  name"]
    for name, t in summary["tasks"].items():
        lines.append(f"{t['index']:<4} {t['successes']:>3}/{t['attempts']:<3} {t['success_rate']:>6.0%} "
                     f"{t['mean_length']:>6.1f} {t['env_steps']:>6}  {name}")
    lines.append(f"total: {summary['episodes']} episodes kept of {summary['attempts']} attempts, "
                 f"{summary['env_steps']} env steps in {summary['seconds']:.1f} s "
                 f"({summary['env_steps_per_s']:.1f} steps/s, {summary['jobs']} simulator processes) "
                 f"-> {summary['out']}")
    return "\n".join(lines)
