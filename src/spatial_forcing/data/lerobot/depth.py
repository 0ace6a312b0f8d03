"""Depth as LeRobot 0.6 stores it: a 12-bit quantised grayscale video (``is_depth_map``).

What LeRobot 0.6.1 does (read from its code: ``lerobot/configs/video.py`` ``DepthEncoderConfig``,
``lerobot/datasets/depth_utils.py`` ``quantize_depth`` / ``dequantize_depth``,
``lerobot/datasets/video_utils.py`` ``get_video_info`` and ``decode_video_frames_pyav``,
``lerobot/datasets/dataset_writer.py`` ``add_frame``, ``lerobot/robots/so_follower/so_follower.py``):

* **Feature.** A depth camera is a visual feature ``observation.images.<cam>_depth``, dtype ``video``,
  shape ``(H, W, 1)``, ``info.is_depth_map = true`` (older files: ``video.is_depth_map``) and
  ``info.depth_unit`` (``"m"`` for float frames, ``"mm"`` for integer frames: the unit of the recorded
  frames and of the feature's statistics, which are per channel ``(1, 1, 1)`` and not divided by 255).
* **Quantisation.** ``q = rint(4095 * (log(d + shift) - log(d_min + shift)) / (log(d_max + shift) -
  log(d_min + shift)))`` clipped to ``[0, 4095]``, with ``d_min = 0.01 m``, ``d_max = 10 m``,
  ``shift = 3.5 m`` (``use_log``; the linear variant is ``(d - d_min) / (d_max - d_min)``). The
  parameters are in metres and converted to the frames' unit first, so the codes do not depend on
  the unit. They are recorded as ``video.depth_min``, ``video.depth_max``, ``video.shift``,
  ``video.use_log`` in the feature's ``info``.
* **Video.** HEVC (``libx265``, Main 12 / Rext profile), pixel format ``gray12le``, ``g=2``,
  ``crf=30`` and ``x265-params=lossless=1``: the video itself is lossless, the quantisation is the
  only loss.
* **Decoding.** Frames are decoded to ``gray12le`` (uint16 codes) and inverted in float32 torch
  operations: ``d = exp(q * step + log_min) - shift`` clipped to ``[d_min, d_max]`` (metres; LeRobot
  returns millimetres by default, ``depth_output_unit="mm"``, and metres on request).

The round-trip error is at most half a step: ``|d' - d| <= (d + shift) * (exp(step / 2) - 1)`` with
``step = (log(d_max + shift) - log(d_min + shift)) / 4095 = 3.29e-4``: 0.58 mm at 0 m, 0.74 mm at
1 m, 1.07 mm at 3 m, 2.2 mm at 10 m (plus float32 rounding). Depths outside ``[d_min, d_max]`` come
back clamped to ``d_min`` / ``d_max`` (a sensor's 0 = "no reading" becomes 0.01 m).

This module transcribes those formulas (same float32 / float64 steps, so the codes and the decoded
metres equal LeRobot's); `video.py` encodes and decodes the frames.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from spatial_forcing.data.schema import IMAGE

from .layout import LeRobotFormatError

DEPTH_QUANT_BITS = 12
DEPTH_QMAX = (1 << DEPTH_QUANT_BITS) - 1  # 4095
DEFAULT_DEPTH_MIN = 0.01
DEFAULT_DEPTH_MAX = 10.0
DEFAULT_DEPTH_SHIFT = 3.5
DEFAULT_DEPTH_USE_LOG = True
DEPTH_KEY_SUFFIX = "_depth"  # LeRobot's robots name a camera's depth stream `<cam>_depth`
DEPTH_INFO_FIELDS = ("depth_min", "depth_max", "shift", "use_log")
MM_PER_METRE = 1000.0


@dataclass(frozen=True)
class DepthQuantizer:
    """LeRobot's depth quantiser: metres <-> 12-bit codes (module docstring)."""

    depth_min: float = DEFAULT_DEPTH_MIN
    depth_max: float = DEFAULT_DEPTH_MAX
    shift: float = DEFAULT_DEPTH_SHIFT
    use_log: bool = DEFAULT_DEPTH_USE_LOG

    def __post_init__(self) -> None:
        for name in DEPTH_INFO_FIELDS[:3]:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise LeRobotFormatError(f"depth quantiser {name}: expected a finite number of metres, found {value!r}")
        if not self.depth_max > self.depth_min:
            raise LeRobotFormatError(f"depth quantiser: expected depth_max > depth_min, found "
                                     f"{self.depth_max!r} <= {self.depth_min!r}")
        if self.use_log and self.depth_min + self.shift <= 0:
            raise LeRobotFormatError(f"depth quantiser: log quantisation needs depth_min + shift > 0, found "
                                     f"{self.depth_min!r} + {self.shift!r}")

    @classmethod
    def from_info(cls, info: Mapping[str, Any] | None) -> DepthQuantizer:
        """The parameters recorded in a feature's info (`video.depth_min`, ...); LeRobot's defaults for any
        that are missing, as LeRobot reads them."""
        info = info or {}
        kwargs = {name: info[f"video.{name}"] for name in DEPTH_INFO_FIELDS if info.get(f"video.{name}") is not None}
        if "use_log" in kwargs and not isinstance(kwargs["use_log"], bool):
            raise LeRobotFormatError(f"video.use_log: expected true or false, found {kwargs['use_log']!r}")
        return cls(**kwargs)

    def info(self) -> dict[str, Any]:
        return {f"video.{name}": getattr(self, name) for name in DEPTH_INFO_FIELDS}

    # -- the mapping -------------------------------------------------------------------------------
    def _log_bounds(self) -> tuple[float, float]:
        lo = float(np.float32(self.depth_min) + np.float32(self.shift))
        hi = float(np.float32(self.depth_max) + np.float32(self.shift))
        return math.log(lo), math.log(hi)

    def quantize(self, depth_m: np.ndarray) -> np.ndarray:
        """float depth in metres `[H, W]` -> uint16 codes in [0, 4095] (LeRobot's `quantize_depth` for
        float frames; NaN has no code and is refused by the writer before it gets here)."""
        d = np.asarray(depth_m).astype(np.float32)
        shift = np.float32(self.shift)
        if self.use_log:
            log_min, log_max = self._log_bounds()
            norm = (np.log(d + shift) - log_min) / (log_max - log_min)
        else:
            lo, hi = np.float32(self.depth_min), np.float32(self.depth_max)
            norm = (d - lo) / (hi - lo)
        return np.rint(norm * DEPTH_QMAX).clip(0, DEPTH_QMAX).astype(np.uint16)

    def dequantize(self, codes: np.ndarray) -> np.ndarray:
        """uint16 codes `[H, W]` -> float32 metres, with the float32 torch operations LeRobot's dataset reader
        applies (`dequantize_depth` on the decoded tensor): the result equals what `LeRobotDataset` returns
        with `depth_output_unit="m"`, bit for bit (checked against LeRobot 0.6.1)."""
        import torch

        if self.use_log:
            log_min = math.log(self.depth_min + self.shift)
            scale, offset = (math.log(self.depth_max + self.shift) - log_min) / DEPTH_QMAX, log_min
        else:
            scale, offset = (self.depth_max - self.depth_min) / DEPTH_QMAX, self.depth_min
        buf = torch.from_numpy(np.asarray(codes, dtype=np.int32)).to(torch.float32)
        buf.mul_(scale).add_(offset)
        if self.use_log:
            buf.exp_().sub_(self.shift)
        return buf.clamp_(self.depth_min, self.depth_max).numpy()

    def max_error(self, depth_m: float | np.ndarray) -> float | np.ndarray:
        """The largest round-trip error (metres) at a depth inside [depth_min, depth_max]: half a step,
        plus float32 rounding of the result."""
        d = np.asarray(depth_m, dtype=np.float64)
        if self.use_log:
            lo, hi = self._log_bounds()
            half = (d + self.shift) * math.expm1((hi - lo) / DEPTH_QMAX / 2)
        else:
            half = np.full_like(d, (self.depth_max - self.depth_min) / DEPTH_QMAX / 2)
        return half + 2.0 * np.spacing(np.float32(np.maximum(d, self.depth_max))).astype(np.float64)


def depth_unit_factor(unit: str | None, where: str) -> float:
    """Metres per recorded unit of a depth feature's statistics ('m', 'mm', or none recorded = metres)."""
    if unit in (None, "m"):
        return 1.0
    if unit == "mm":
        return 1.0 / MM_PER_METRE
    raise LeRobotFormatError(f"{where}: depth_unit expected 'm' or 'mm', found {unit!r}")


def is_depth_map(spec: Mapping[str, Any]) -> bool:
    """Whether a feature is a depth map in LeRobot's sense (`info.is_depth_map`, or the legacy
    `video.is_depth_map` in `info` or `video_info`)."""
    info = spec.get("info") or {}
    legacy = spec.get("video_info") or {}
    return bool(info.get("is_depth_map") or info.get("video.is_depth_map") or legacy.get("video.is_depth_map"))


def depth_camera(key: str) -> str:
    """The camera a depth feature belongs to by LeRobot's naming: `observation.images.<cam>_depth` -> `<cam>`
    (a depth stream without the suffix is a camera of its own: its name)."""
    name = key[len(IMAGE):] if key.startswith(IMAGE) else key
    return name[: -len(DEPTH_KEY_SUFFIX)] if name.endswith(DEPTH_KEY_SUFFIX) and len(name) > len(DEPTH_KEY_SUFFIX) else name
