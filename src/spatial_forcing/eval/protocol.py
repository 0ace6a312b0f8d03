"""The OpenVLA-OFT LIBERO evaluation protocol (LIBERO.md §3, §5): settings and pure functions.

Everything the published evaluation client does to an observation or an action lives here or is reused
from ``envs/libero.py``, so each step can be tested against hand-computed values:

* 180° image rotation ``img[::-1, ::-1]``: ``envs.libero.orient_image(img, "rot180")`` (LiberoEnv's default).
* JPEG round trip (``jpeg_roundtrip``): TF's ``encode_jpeg`` defaults (quality 95, 4:2:0, baseline,
  accurate DCT, JFIF 300 dpi) and ``decode_image`` (fast integer IDCT, fancy upsampling), TF's bytes
  and pixels exactly (§3.2 step 2; ``data/tfimage.py``).
* Lanczos3 antialiased resize to the policy's side (``lanczos3_resize``): TF ``scale_and_translate`` in
  float32 bit for bit, then round half to even, clip, uint8 (§3.2 step 2).
* 90 %-area centre crop: applied by the policy's own processor (``policies/images.py:center_crop``,
  TF-exact); its box is ``crop_box`` (§3.2 step 3).
* Proprio: ``envs.libero.proprio_state`` = eef pos + ``quat2axisangle(eef quat xyzw)`` + gripper qpos
  (§2), float64, from the raw robosuite observation.
* Gripper post-processing: ``envs.libero.oft_gripper_to_env`` = ``-sign(2g - 1)`` (binarise, then invert to
  LIBERO's -1 open / +1 close; 0.5 -> 0) for policies that speak the OFT convention (§3.3).
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from spatial_forcing.data import tfimage
from spatial_forcing.envs.libero import (DUMMY_ACTION, NUM_SETTLE_STEPS, OFT_MAX_STEPS, STANDARD_SUITES,
                                         oft_gripper_to_env, orient_image, proprio_state, to_env_action)
from spatial_forcing.policies.images import CROP_AREA, crop_box

__all__ = ["Protocol", "max_steps_for", "base_suite", "jpeg_encode", "jpeg_roundtrip", "lanczos3_weights",
           "lanczos3_resize", "prepare_image", "crop_box", "CROP_AREA", "orient_image", "proprio_state",
           "oft_gripper_to_env", "postprocess_actions", "set_seed_everywhere", "wilson_interval"]

JPEG_QUALITY = tfimage.JPEG_QUALITY  # 95
IMAGE_OPS = "tf-exact"  # the image ops of `data/tfimage.py`: TensorFlow's bytes and pixels, bit for bit
OPENPI_IMAGE_OPS = "openpi"  # openpi's LIBERO client (examples/libero/main.py): resize_with_pad, PIL bilinear, no JPEG
ENV_IMAGE_SIZE = 256  # OFT `env_img_res`
ENV_SEED = 0  # OFT: env.seed(0) once per task, right after creating the env
DEFAULT_SEED = 7  # OFT `set_seed_everywhere(7)`
Z95 = 1.959963984540054  # standard normal quantile for a two-sided 95 % interval


def base_suite(suite: str) -> str | None:
    """The standard suite a suite derives from: itself for the five standard suites, ``libero_spatial`` for
    a LIBERO-PRO variant such as ``libero_spatial_lan``, None when there is none (``libero_mine``)."""
    if suite in STANDARD_SUITES:
        return suite
    for base in sorted(STANDARD_SUITES, key=len, reverse=True):
        if suite.startswith(base + "_"):
            return base
    return None


def max_steps_for(suite: str) -> int:
    """OFT's policy-step limit (§1: spatial 220, object 280, goal 300, 10 520, 90 400), excluding the 10 wait
    steps. A LIBERO-PRO variant takes its base suite's limit (the perturbation keeps the task length)."""
    base = base_suite(suite)
    if base is None:
        raise ValueError(f"suite {suite!r} has no published step limit (it derives from none of "
                         f"{list(STANDARD_SUITES)}); pass --max-steps")
    return OFT_MAX_STEPS[base]


@dataclass(frozen=True)
class Protocol:
    """Every setting that changes what an episode does. Saved with the results; a resumed run must match.

    The descriptive fields (``rules``) are fixed by the protocol and only documented in the results file.
    ``replan_steps`` below the chunk length executes the FIRST ``replan_steps`` actions of each chunk
    (openpi's ``replan_steps``); upstream OFT's ``deque(maxlen=k).extend(chunk)`` would keep the last k, a
    setting its code warns against. The published setting, the whole chunk, is the default.
    """

    suite: str
    max_steps: int  # policy actions per episode, excluding the wait steps (§1)
    replan_steps: int  # actions of each chunk executed open loop before the next query (OFT: all 8)
    num_steps_wait: int = NUM_SETTLE_STEPS
    env_image_size: int = ENV_IMAGE_SIZE
    env_seed: int = ENV_SEED
    seed: int = DEFAULT_SEED
    instruction: str = "auto"  # task.language; the BDDL text for PRO _lan/_task suites (§4.6)
    jpeg_quality: int = JPEG_QUALITY
    image_ops: str = IMAGE_OPS  # a run made with other image ops (PIL, before) does not resume into this one
    antialias: bool = True  # MuJoCo's 4x multisampled renders (LIBERO's default; False: faster, our own data only)

    def __post_init__(self) -> None:
        if self.image_ops not in (IMAGE_OPS, OPENPI_IMAGE_OPS):
            raise ValueError(f"protocol image_ops: expected {IMAGE_OPS!r} or {OPENPI_IMAGE_OPS!r}, found "
                             f"{self.image_ops!r}")
        for name in ("max_steps", "replan_steps", "num_steps_wait", "env_image_size", "jpeg_quality"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"protocol {name}: expected an int >= 1, found {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rules": {
            "wait_action": list(DUMMY_ACTION),
            "env": f"OffScreenRenderEnv, {self.env_image_size}x{self.env_image_size} "
                   f"{'multisampled' if self.antialias else 'single-sample (antialias off)'} agentview + "
                   f"robot0_eye_in_hand, one env per task, env.seed({self.env_seed}) once at creation",
            "seeding": f"random/numpy/torch seeded with {self.seed} before each task (then env.seed)",
            "episodes": "episode i: env.reset() then set_init_state(init_states[i]) of the benchmark's "
                        "pruned_init; a task's episodes run in order in one env (resets replayed on resume)",
            "images": (f"rot180 (img[::-1, ::-1]), JPEG q{self.jpeg_quality} 4:2:0 round trip (TF encode_jpeg + "
                       "decode_image: fast integer IDCT), Lanczos3 antialias resize to the policy side (TF "
                       "scale_and_translate, round half to even), centre crop sqrt(0.9) by the policy processor"
                       if self.image_ops == IMAGE_OPS else
                       "rot180 (img[::-1, ::-1]), openpi resize_with_pad to the policy side (PIL bilinear, black "
                       "letterbox), no JPEG (openpi examples/libero/main.py)"),
            "image_ops": tfimage.implementation() if self.image_ops == IMAGE_OPS else f"Pillow {_pil_version()}",
            "proprio": "eef_pos + quat2axisangle(eef_quat xyzw, unfolded) + gripper_qpos (float64)",
            "actions": "the first replan_steps actions of each chunk executed open loop, then a new query; "
                       "OFT gripper -> -sign(2g - 1); dims 0-5 unchanged",
            "success": "done returned by env.step (LIBERO's success check); done during the wait is ignored",
            "failure": "timeout after max_steps policy actions, or an exception inside the episode",
        }}


# ----------------------------------------------------------------------------------------------- images
# The TensorFlow ops of OFT's `resize_image_for_policy`, bit-exact without TensorFlow: `data/tfimage.py`.

def jpeg_encode(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """uint8 HxWx3 -> the bytes of ``tf.image.encode_jpeg`` (q95 baseline, 4:2:0, accurate DCT, JFIF 300 dpi)."""
    return tfimage.encode_jpeg(_check_rgb(image), quality)


def jpeg_roundtrip(image: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    """``tf.io.decode_image(tf.image.encode_jpeg(image))``: the decode uses TF's fast integer IDCT."""
    return tfimage.jpeg_roundtrip(_check_rgb(image), quality)


def lanczos3_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """TF ``scale_and_translate`` spans (lanczos3, antialias) on one axis: (starts [n_out], weights
    [n_out, span] float32), bit-exact (``data.tfimage.lanczos3_weights``)."""
    return tfimage.lanczos3_weights(n_in, n_out)


def lanczos3_resize(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 HxWx3 -> uint8 size x size: TF ``resize(method="lanczos3", antialias=True)`` (float32, rows then
    columns), then ``round`` (half to even), clip to [0, 255], uint8 — OFT's ``resize_image_for_policy``."""
    return tfimage.resize_uint8(_check_rgb(image), int(size))


def prepare_image(image: np.ndarray, size: int | None, quality: int = JPEG_QUALITY, ops: str = IMAGE_OPS
                  ) -> np.ndarray:
    """An env camera image (already rotated 180°) -> what the policy receives: JPEG round trip, then
    Lanczos3 to `size` (§3.2 steps 1-2); with ``ops="openpi"``, openpi's LIBERO client instead
    (`resize_with_pad`, PIL bilinear, no JPEG). ``size=None`` passes the rendered image through unchanged."""
    if size is None:
        return image
    if ops == OPENPI_IMAGE_OPS:
        from spatial_forcing.policies.images import resize_with_pad

        return resize_with_pad(_check_rgb(image), int(size), int(size))[0]
    return lanczos3_resize(jpeg_roundtrip(image, quality), size)


def _pil_version() -> str:
    import PIL

    return PIL.__version__


def _check_rgb(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, found {a.dtype} {a.shape}")
    return np.ascontiguousarray(a)


# ---------------------------------------------------------------------------------------------- actions

def postprocess_actions(chunk: Any, convention: str, action_dim: int = 7) -> np.ndarray:
    """A policy's chunk [K, 7] -> env actions [K, 7] float64 (§3.3). ``"oft"``: gripper ``-sign(2g - 1)``
    (1 = open -> -1, 0 = close -> +1, 0.5 -> 0), dims 0-5 unchanged (the controller clips them);
    ``"raw"``: already env units. Rejects other shapes and non-finite values."""
    a = np.asarray(chunk, dtype=np.float64)
    if a.ndim == 1 and a.shape[0] == action_dim:
        a = a[None]
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] != action_dim:
        raise ValueError(f"policy returned actions of shape {a.shape}; expected [K, {action_dim}] "
                         "[dx, dy, dz, drx, dry, drz, gripper]")
    return to_env_action(a, convention)


# ------------------------------------------------------------------------------------------ seeds, stats

def set_seed_everywhere(seed: int) -> None:
    """OFT's ``set_seed_everywhere``: random, numpy, torch (+CUDA, deterministic cuDNN), PYTHONHASHSEED.
    torch is seeded only if this process already imported it (the scripted expert never needs it)."""
    random.seed(seed)
    np.random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95 % by default); (0, 1) for n = 0."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: expected 0 <= successes <= n, found {successes}/{n}")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    return lo, 1.0 if successes == n else min(1.0, centre + half)
