"""Client-side helpers for LIBERO-style clients of a served policy (SERVING.md 1.9); torch-free, no simulator.

    request = libero_request(agentview, wrist, state, "put the bowl on the plate")   # openpi LIBERO keys
    actions = policy.infer(request)["actions"]

`resize_with_pad` is openpi's client-side resize: keep the aspect ratio, PIL bilinear, paste centred on
a black canvas; an image already of the target size is returned unchanged.
"""

from __future__ import annotations

import numpy as np

LIBERO_RESIZE = 224  # openpi's examples/libero default


def convert_to_uint8(image: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] -> `(255 * x).astype(uint8)`; other dtypes unchanged (openpi `convert_to_uint8`)."""
    if np.issubdtype(image.dtype, np.floating):
        return (255 * image).astype(np.uint8)
    return image


def resize_with_pad(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 `(H, W, 3)` -> `(height, width, 3)`: ratio `max(W/width, H/height)`, bilinear, centred on black."""
    from PIL import Image

    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    ratio = max(w / width, h / height)
    new_h, new_w = int(h / ratio), int(w / ratio)
    resized = Image.fromarray(image).resize((new_w, new_h), resample=Image.Resampling.BILINEAR)
    canvas = Image.new(resized.mode, (width, height), 0)
    canvas.paste(resized, (int((width - new_w) / 2), int((height - new_h) / 2)))
    return np.asarray(canvas)


def libero_request(image: np.ndarray, wrist_image: np.ndarray, state: np.ndarray, prompt: str,
                   resize: int | None = LIBERO_RESIZE) -> dict:
    """The openpi LIBERO request (keys of the `libero` observation map). Images are the policy's view
    order (agentview, wrist), already oriented as in training (LIBERO: `raw[::-1, ::-1]`); `state` is the
    8-D `[eef_pos, axis_angle(eef_quat), gripper_qpos]`; `resize=None` sends the images as they are."""
    def prep(x: np.ndarray) -> np.ndarray:
        x = convert_to_uint8(np.ascontiguousarray(x))
        return resize_with_pad(x, resize, resize) if resize else x

    return {"observation/image": prep(image), "observation/wrist_image": prep(wrist_image),
            "observation/state": np.asarray(state, dtype=np.float64), "prompt": str(prompt)}
