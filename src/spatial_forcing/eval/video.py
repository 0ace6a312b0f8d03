"""Episode videos: which episodes to film (``--videos``) and an MP4 writer (PyAV, H.264, yuv420p).

Frames are the two cameras side by side (agentview | wrist) in the orientation the policy sees (rot180,
as OFT's rollout videos), one per executed action plus the observation after the wait steps, at the
control rate (20 Hz: real time).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

FPS = 20  # LIBERO control frequency


@dataclass(frozen=True)
class VideoSelection:
    """``first:K`` (episodes 0..K-1 of every task), ``failures``, ``all`` or ``none``."""

    mode: str
    first: int = 0

    @classmethod
    def parse(cls, text: str) -> VideoSelection:
        t = text.strip().lower()
        if t in ("all", "none", "failures"):
            return cls(t)
        if t.startswith("first:") and t[6:].isdigit():
            return cls("first", int(t[6:]))
        raise ValueError(f"--videos: expected first:K, failures, all or none, found {text!r}")

    def records(self, episode: int) -> bool:
        """Whether frames of `episode` must be kept while it runs."""
        return self.mode in ("all", "failures") or (self.mode == "first" and episode < self.first)

    def keeps(self, episode: int, success: bool) -> bool:
        """Whether the finished episode's video is written."""
        return self.records(episode) and not (self.mode == "failures" and success)

    def any(self) -> bool:
        return self.mode in ("all", "failures") or (self.mode == "first" and self.first > 0)


def video_name(task: int, episode: int, success: bool) -> str:
    return f"videos/task{task:02d}_ep{episode:03d}_{'success' if success else 'failure'}.mp4"


def write_mp4(path: str | Path, frames: Sequence[np.ndarray], fps: int = FPS, crf: int = 23) -> Path:
    """uint8 HxWx3 frames -> H.264 MP4 (yuv420p, so odd sizes are padded by one pixel with edge copies).
    Written to a temporary name, then renamed: a killed writer never leaves a truncated video."""
    import av

    if not frames:
        raise ValueError("write_mp4: no frames")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    pad = ((0, h % 2), (0, w % 2), (0, 0))
    tmp = path.with_name(path.stem + ".partial.mp4")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps,
                                      options={"crf": str(crf)})
        stream.width, stream.height, stream.pix_fmt = w + w % 2, h + h % 2, "yuv420p"
        for frame in frames:
            image = np.pad(np.asarray(frame, dtype=np.uint8), pad, mode="edge")
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)
    return path
