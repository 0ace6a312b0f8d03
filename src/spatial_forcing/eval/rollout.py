"""One LIBERO episode under the OFT protocol (LIBERO.md §3.1), and the per-task env that runs them.

    session = TaskSession(task, protocol, render=True)     # env created lazily, seeded once (env.seed(0))
    result, frames = session.run(policy, episode=3)        # resets replayed first if episodes were skipped

Per episode, exactly as ``run_libero_eval.py``: ``env.reset()`` + ``set_init_state(init_states[i])``,
``num_steps_wait`` (10) steps of ``[0, 0, 0, 0, 0, 0, -1]`` whose ``done`` is ignored, then up to
``max_steps`` policy actions: the policy is queried only when the queue is empty and ``replan_steps``
actions of each chunk are executed open loop; success is ``done`` from ``env.step``. The cameras render
only in the steps whose observation is read (the step before a query, or every step of a recorded episode):
rendering never changes the physics, so the episode is the same, several times faster. An exception anywhere
in the episode ends it as a failure with reason ``"exception"`` and the message; the next episode runs.

Layout history: every hard reset re-places the fixtures from the previous layout with numpy's global RNG
(``LiberoEnv.reset``), so episode i of a task depends on the i resets before it in the same env. A session
therefore replays the skipped resets (``env.reset()`` only, no steps) before running episode i, which makes
a resumed or split task identical to the serial protocol (checked through ``scene_hash``).
"""

from __future__ import annotations

import hashlib
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from spatial_forcing.data.schema import IMAGE
from spatial_forcing.eval.policies import EpisodeContext, EvalPolicy, PolicyInfo
from spatial_forcing.eval.protocol import (IMAGE_OPS, Protocol, postprocess_actions, prepare_image,
                                          proprio_state, set_seed_everywhere)
from spatial_forcing.envs.libero import LiberoEnv, TaskInfo

REASONS = ("success", "timeout", "exception")


@dataclass
class EpisodeResult:
    """One finished episode: a line of ``episodes.jsonl``."""

    suite: str
    task: int
    task_name: str
    episode: int  # = init state index
    success: bool
    reason: str  # "success" | "timeout" | "exception"
    steps: int  # policy actions executed (the episode length)
    env_steps: int  # including the wait steps
    queries: int  # policy calls
    instruction: str = ""
    error: str | None = None
    scene_hash: str | None = None  # initial scene (fixture layout + init state): equal across serial / resumed runs
    actions_sha1: str | None = None  # every executed env action (float64): equal for equal behaviour (local/remote)
    seconds: float = 0.0  # wall time of the whole episode
    seconds_reset: float = 0.0  # replayed resets + reset + wait steps
    seconds_env: float = 0.0  # inside env.step during the policy loop
    seconds_policy: float = 0.0  # inside policy.infer (the observation pipeline is the harness's)
    video: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def scene_hash(env: LiberoEnv) -> str:
    """Fingerprint of the initial scene: body placements of the model and the simulator state."""
    sim = env.sim
    h = hashlib.sha1(np.ascontiguousarray(sim.model.body_pos, dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(sim.get_state().flatten(), dtype=np.float64).tobytes())
    return h.hexdigest()[:16]


def policy_observation(env: LiberoEnv, obs: dict[str, Any], info: PolicyInfo, quality: int,
                       ops: str = IMAGE_OPS) -> dict[str, Any]:
    """Env observation -> policy input (§3.2): the rot180 camera images through JPEG + Lanczos3 to the
    policy's side (or openpi's resize-with-pad, `ops="openpi"`), the float64 proprio from the raw robosuite
    observation, and the instruction."""
    return {"images": [prepare_image(obs[IMAGE + cam], info.image_size, quality, ops) for cam in info.cameras],
            "state": proprio_state(env.raw_obs), "instruction": env.instruction}


def video_frame(obs: dict[str, Any]) -> np.ndarray | None:
    """agentview | wrist side by side, as the policy sees them (rot180); None without rendering."""
    views = [obs[k] for k in (IMAGE + "agentview", IMAGE + "wrist") if k in obs]
    return np.concatenate(views, axis=1) if views else None


class TaskSession:
    """The env of one task in one process: created on first use (``set_seed_everywhere(seed)``, then the env
    with ``env.seed(env_seed)``, as OFT does per task), and the count of resets it has performed."""

    def __init__(self, task: TaskInfo, protocol: Protocol, render: bool) -> None:
        self.task, self.protocol, self.render = task, protocol, render
        self.env: LiberoEnv | None = None
        self.resets = 0

    def _open(self) -> LiberoEnv:
        if self.env is None:
            p = self.protocol
            set_seed_everywhere(p.seed)
            self.env = LiberoEnv(self.task.suite, self.task.index, image_size=p.env_image_size, depth=False,
                                 antialias=p.antialias,
                                 seed=p.env_seed, action_convention="raw", image_orientation="rot180",
                                 instruction=p.instruction, render=self.render)  # type: ignore[arg-type]
        return self.env

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None

    def run(self, policy: EvalPolicy, episode: int, record: bool = False
            ) -> tuple[EpisodeResult, list[np.ndarray]]:
        """Run `episode` (replaying the resets of the episodes before it that this env has not done).
        Returns the result and, when `record`, the video frames (initial observation + one per action)."""
        if episode < self.resets:
            raise ValueError(f"episode {episode} of task {self.task.index} comes after {self.resets} resets of this "
                             "env: episodes of a task must run in increasing order")
        p, info = self.protocol, policy.info
        t0 = time.perf_counter()
        res = EpisodeResult(p.suite, self.task.index, self.task.name, episode, False, "exception", 0, 0, 0)
        frames: list[np.ndarray] = []
        queue: deque[np.ndarray] = deque()
        digest = hashlib.sha1()
        try:
            env = self._open()
            res.instruction = env.instruction
            while self.resets < episode:  # layout history of the skipped episodes (no steps needed)
                env.raw_env.reset()
                self.resets += 1
            obs = env.reset(episode)
            self.resets += 1
            res.scene_hash = scene_hash(env)
            policy.reset(EpisodeContext(p.suite, self.task, episode, env.instruction, env))
            obs = env.settle(p.num_steps_wait)
            res.env_steps = p.num_steps_wait
            res.seconds_reset = time.perf_counter() - t0
            if record and (frame := video_frame(obs)) is not None:
                frames.append(frame)
            res.reason = "timeout"
            while res.steps < p.max_steps:
                if not queue:
                    policy_obs = policy_observation(env, obs, info, p.jpeg_quality, p.image_ops)
                    t = time.perf_counter()
                    chunk = policy.infer(policy_obs)
                    res.seconds_policy += time.perf_counter() - t
                    res.queries += 1
                    queue.extend(postprocess_actions(chunk, info.action_convention, info.action_dim)[:p.replan_steps])
                action = queue.popleft()
                digest.update(np.ascontiguousarray(action, dtype=np.float64).tobytes())
                t = time.perf_counter()
                # the cameras render only for an observation somebody reads: the next query or the video
                seen = record or not queue
                obs, _, done, _ = env.step(action, convention="raw", render=seen)
                res.seconds_env += time.perf_counter() - t
                res.steps += 1
                res.env_steps += 1
                if record and (frame := video_frame(obs)) is not None:
                    frames.append(frame)
                if done:
                    res.success, res.reason = True, "success"
                    break
        except Exception as exc:  # noqa: BLE001 - any failure inside an episode is that episode's failure
            res.success, res.reason = False, "exception"
            where = traceback.extract_tb(exc.__traceback__)[-1]
            res.error = f"{type(exc).__name__}: {exc} (at {where.filename.rsplit('/', 1)[-1]}:{where.lineno})"
        res.actions_sha1 = digest.hexdigest()[:16]
        res.seconds = time.perf_counter() - t0
        return res, frames
