"""The canonical sample schema and the episode-source protocol every dataset reader implements.

A *source* is random access by (episode, frame):

    source.cameras                 -> ["agentview", "wrist"]     camera order = token order everywhere
    source.num_episodes            -> int
    source.episode_length(e)       -> int
    source.episode_arrays(e)       -> {"observation.state": [T, S] float32, "action": [T, A] float32}
    source.task(e)                 -> str  (the instruction)
    source.frame(e, t, keys=None)  -> one time step in the canonical schema (below), decoded

Canonical keys of one time step (LeRobot-style names):

    observation.images.<camera>      uint8 [H, W, 3]
    observation.state                float32 [S]
    action                           float32 [A]          (one step; the pipeline builds chunks)
    task                             str
    observation.depth.<camera>       float32 [H, W]       metres along the optical axis (optional)
    observation.intrinsics.<camera>  float32 [3, 3]       pixels of that image (optional)
    observation.extrinsics.<camera>  float32 [4, 4]       camera-to-world, OpenCV axes (optional)
    observation.pad_mask.<camera>    bool [H, W]          True = real pixel (optional)
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

IMAGE = "observation.images."
DEPTH = "observation.depth."
INTRINSICS = "observation.intrinsics."
EXTRINSICS = "observation.extrinsics."
PAD_MASK = "observation.pad_mask."
STATE = "observation.state"
ACTION = "action"
TASK = "task"


@runtime_checkable
class EpisodeSource(Protocol):
    cameras: list[str]

    @property
    def num_episodes(self) -> int: ...

    def episode_length(self, episode: int) -> int: ...

    def episode_arrays(self, episode: int) -> dict[str, np.ndarray]: ...

    def task(self, episode: int) -> str: ...

    def frame(self, episode: int, t: int, keys: list[str] | None = None) -> dict[str, Any]: ...
