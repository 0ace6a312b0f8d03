"""Dataset conversion: LIBERO RLDS (TFRecords) -> LeRobotDataset v3.0.

The converted dataset keeps the raw RLDS values (gripper -1 open / +1 close, 8-D state), like
LeRobot's own LIBERO datasets; readers apply the OFT standardisation with `standardize="libero"`.
Cameras become `observation.images.agentview` and `observation.images.wrist` (frames as published,
already flipped); the instruction is the episode's task.
"""

from __future__ import annotations

import time
from pathlib import Path

from tqdm import tqdm

from .lerobot import LeRobotWriter, canonical_features
from .rlds import RLDSEpisodeSource
from .schema import ACTION, IMAGE, STATE


def rlds_to_lerobot(src: str | Path, dst: str | Path, *, fps: int = 20, video: bool = True,
                    overwrite: bool = False, verify_crc: bool = True, progress: bool = True) -> dict:
    """Convert every episode of an RLDS dataset folder; returns a summary dict."""
    t0 = time.perf_counter()
    source = RLDSEpisodeSource(src, verify_crc=verify_crc, standardize=None)
    if source.num_episodes == 0:
        raise ValueError(f"{src}: the RLDS dataset has no episodes")
    first = source.frame(0, 0, keys=[IMAGE + c for c in source.cameras])
    cameras = {c: tuple(first[IMAGE + c].shape[:2]) for c in source.cameras}
    arrays = source.episode_arrays(0)
    features = canonical_features(cameras, arrays[STATE].shape[-1], arrays[ACTION].shape[-1], video=video)
    frames = 0
    with LeRobotWriter(dst, fps, features, robot_type="panda", video=video, camera_keys=list(cameras),
                       overwrite=overwrite) as writer:
        for e in tqdm(range(source.num_episodes), desc=f"convert {source.name}", unit="episode", disable=not progress):
            arrays = source.episode_arrays(e)
            for t in range(source.episode_length(e)):
                frame = source.frame(e, t, keys=[IMAGE + c for c in cameras])
                writer.add_frame({**frame, STATE: arrays[STATE][t], ACTION: arrays[ACTION][t]})
                frames += 1
            writer.save_episode(task=source.task(e))
    return {"source": str(source.root), "name": source.name, "destination": str(Path(dst)), "episodes": source.num_episodes,
            "frames": frames, "cameras": list(cameras), "fps": fps, "video": video,
            "seconds": time.perf_counter() - t0}
