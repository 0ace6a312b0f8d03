"""Regenerate ``tests/fixtures/tf_images.npz``: TensorFlow's own image ops on real LIBERO frames, the oracle
that ``tests/test_tfimage.py`` holds ``spatial_forcing.data.tfimage`` (and through it the evaluation and the
RLDS pipeline) to, bit for bit, without TensorFlow.

TensorFlow is not a dependency of the project. The fixture is made once, in two steps and two environments:

1. Frames, in the project's environment (LIBERO rendered by our env at 256 px, OFT's camera size, rot180,
   the first policy observation of an episode: reset + the 10 wait steps)::

       MUJOCO_GL=egl .venv/bin/python tools/tf_image_oracle.py render /tmp/libero_frames.npz

2. TensorFlow's outputs, in a throwaway environment (this step imports nothing from the project)::

       python3 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu numpy pillow
       /tmp/tfvenv/bin/python tools/tf_image_oracle.py tf /tmp/libero_frames.npz tests/fixtures/tf_images.npz

Step 2 calls exactly what the published code calls:

* evaluation, ``experiments/robot/openvla_utils.py:resize_image_for_policy``: ``tf.image.encode_jpeg(img)``,
  ``tf.io.decode_image(..., expand_animations=False, dtype=tf.uint8)``, ``tf.image.resize(..., method=
  "lanczos3", antialias=True)``, ``tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8)``;
* training, ``prismatic/vla/datasets/rlds/obs_transforms.py:decode_and_resize`` -> ``tf.io.decode_image``
  then dlimp ``resize_image`` (the same resize, rounding and cast), on JPEGs of other encoders too.

The fixture holds: the frames; TF's JPEG bytes, decoded pixels, uint8 resizes to 224 (OFT) and 112 (the
``mini`` policy) and the SHA-256 of the float32 resizes before rounding; TF's per-axis Lanczos3 weights
for a few size pairs (impulse responses); JPEGs of other encoder settings (on an odd-sized crop) with TF's
decode of each; and the versions used.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys

import numpy as np

SCENES = [("libero_spatial", 0, 0), ("libero_object", 3, 1), ("libero_goal", 5, 2)]  # (suite, task, init state)
SIZES = (224, 112)  # OFT's side; the `mini` preset's
WEIGHT_PAIRS = [(256, 224), (256, 112), (128, 224), (200, 77)]  # (n_in, n_out): down, down, up, odd
# Other encoders' JPEGs for the training-side decode (Pillow options): chroma 4:4:4, 4:2:2, progressive, on
# a crop of frame 0 whose sides are no multiple of the 16 px MCU (edge blocks).
EXTRA_CROP = (slice(37, 137), slice(61, 193))  # 100 x 132
EXTRA_JPEGS = [dict(quality=90, subsampling="4:4:4"), dict(quality=75, subsampling="4:2:2"),
               dict(quality=95, subsampling="4:2:0", progressive=True)]


def render(out: str) -> None:
    """Real LIBERO frames from our env (needs the project's environment and MUJOCO_GL)."""
    from spatial_forcing.data.schema import IMAGE
    from spatial_forcing.envs.libero import LiberoEnv

    frames, names = [], []
    for suite, task, init in SCENES:
        with LiberoEnv(suite, task, image_size=256, depth=False, seed=0) as env:
            env.reset(init)
            obs = env.settle()
            for cam in env.cameras:
                frames.append(np.asarray(obs[IMAGE + cam], dtype=np.uint8))
                names.append(f"{suite}/task{task}/init{init}/{cam}")
    np.savez_compressed(out, frames=np.stack(frames), names=np.array(names))
    print(f"{len(frames)} frames -> {out}")


def _pack(blobs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    return np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets


def tf_outputs(frames_path: str, out: str) -> None:
    """TensorFlow's outputs for the rendered frames (needs tensorflow-cpu; imports nothing of the project)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import PIL
    import tensorflow as tf
    from PIL import Image, features

    src = np.load(frames_path)
    frames, names = src["frames"], src["names"]
    assert frames.dtype == np.uint8 and frames.shape[1:] == (256, 256, 3), frames.shape

    def decode(data: bytes) -> np.ndarray:
        return tf.io.decode_image(data, expand_animations=False, dtype=tf.uint8).numpy()

    def resize(img: np.ndarray, size: int) -> tf.Tensor:
        return tf.image.resize(img, (size, size), method="lanczos3", antialias=True)

    def to_uint8(x: tf.Tensor) -> np.ndarray:
        return tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8).numpy()

    fixture: dict[str, np.ndarray] = {"frames": frames, "names": names}
    jpegs = [tf.image.encode_jpeg(f).numpy() for f in frames]
    fixture["tf_jpeg"], fixture["tf_jpeg_offsets"] = _pack(jpegs)
    decoded = np.stack([decode(j) for j in jpegs])
    fixture["tf_decoded"] = decoded
    for size in SIZES:
        floats = [resize(d, size) for d in decoded]
        fixture[f"tf_resized_{size}"] = np.stack([to_uint8(x) for x in floats])
        fixture[f"tf_resized_{size}_f32_sha256"] = np.array(
            [hashlib.sha256(np.ascontiguousarray(x.numpy(), dtype=np.float32).tobytes()).hexdigest() for x in floats])
    # TF's same-size "resize" still filters; rounding gives the input back (checked here, relied on there).
    for img in list(decoded) + list(fixture["tf_resized_224"]):
        assert np.array_equal(to_uint8(resize(img, img.shape[0])), img), "same-size lanczos3 is not the identity"
    fixture["tf_same_size_is_identity"] = np.array(True)
    # Per-axis weights: resizing an impulse along the height (width 1 stays 1 with weight exactly 1).
    for n_in, n_out in WEIGHT_PAIRS:
        impulses = np.eye(n_in, dtype=np.float32)[:, :, None, None]  # batch j: 1 at row j
        w = tf.image.resize(impulses, (n_out, 1), method="lanczos3", antialias=True).numpy()[:, :, 0, 0].T
        fixture[f"tf_weights_{n_in}_{n_out}"] = np.ascontiguousarray(w, dtype=np.float32)  # [n_out, n_in]
    extra, extra_dec = [], []
    for opts in EXTRA_JPEGS:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(frames[0][EXTRA_CROP])).save(buf, format="JPEG", **opts)
        extra.append(buf.getvalue())
        extra_dec.append(decode(extra[-1]))
    fixture["extra_jpeg"], fixture["extra_jpeg_offsets"] = _pack(extra)
    fixture["extra_tf_decoded"] = np.stack(extra_dec)
    fixture["extra_jpeg_options"] = np.array([json.dumps(o, sort_keys=True) for o in EXTRA_JPEGS])
    fixture["extra_crop"] = np.array([[c.start, c.stop] for c in EXTRA_CROP])
    fixture["meta"] = np.array(json.dumps({
        "tool": "tools/tf_image_oracle.py", "tensorflow": tf.__version__, "numpy": np.__version__,
        "pillow": PIL.__version__, "pillow_libjpeg_turbo": features.version("libjpeg_turbo"),
        "python": sys.version.split()[0],
        "sizes": list(SIZES), "weight_pairs": WEIGHT_PAIRS, "scenes": SCENES,
    }, sort_keys=True))
    np.savez_compressed(out, **fixture)
    print(f"{out}: {os.path.getsize(out) / 1e6:.2f} MB, TensorFlow {tf.__version__}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    r = sub.add_parser("render", help="step 1: LIBERO frames (project environment)")
    r.add_argument("out")
    t = sub.add_parser("tf", help="step 2: TensorFlow's outputs (tensorflow-cpu environment)")
    t.add_argument("frames")
    t.add_argument("out")
    args = parser.parse_args(argv)
    if args.step == "render":
        render(args.out)
    else:
        tf_outputs(args.frames, args.out)


if __name__ == "__main__":
    main()
