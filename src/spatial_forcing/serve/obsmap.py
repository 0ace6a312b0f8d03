"""Which request keys are which cameras, the state and the prompt, and the checks every request passes.

A request arrives as the client's own dict (openpi: the raw observation, SERVING.md 1.4; OpenVLA: the
`/act` body, 2.2). An `ObservationMap` names the keys; `to_policy_observation` turns the request into the
policy's observation `{"images": [view0, ...], "state": float64 [D], "instruction": str}` or raises
`RequestError` naming the key, what was expected and what was found (SERVING.md 4.1-4.4, 4.13).

Presets (`PRESETS`):

| preset    | client                                   | images (policy view order)                        | state                 | prompt        |
|-----------|------------------------------------------|---------------------------------------------------|-----------------------|---------------|
| `libero`  | openpi LIBERO example (1.9)              | `observation/image`, `observation/wrist_image`    | `observation/state`   | `prompt`      |
| `openpi`  | openpi model-level dict (`Observation`)  | `image/base_0_rgb`, `image/left_wrist_0_rgb`      | `state`               | `prompt`      |
| `aloha`   | openpi ALOHA client                      | `images/cam_high`, `images/cam_left_wrist`, `images/cam_right_wrist` | `state` | `prompt`      |
| `openvla` | OpenVLA `deploy.py` `/act` (2.2)         | `full_image`, then every key containing `wrist`, in key order | `state`      | `instruction` |

A key may be a path: `image/base_0_rgb` is the top-level key `"image/base_0_rgb"` if present, else
`request["image"]["base_0_rgb"]`. openpi-style presets accept uint8 HWC, uint8 CHW and float images in
[0, 1] (openpi's `LiberoInputs` does the same); `openvla` accepts uint8 HWC only (upstream asserts it).
A custom map is JSON: `{"images": [...], "state": "...", "prompt": "...", "extra_images": null,
"chw": true, "float_images": true}` (inline or a file).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MAX_IMAGE_SIDE = 8192
_MISSING = object()


class RequestError(ValueError):
    """A request the policy cannot take; the message is sent back to the client."""


@dataclass(frozen=True)
class InputSpec:
    """What the policy reads and returns: views, state size (None = no state), chunk `[K, A]`."""

    num_images: int
    state_dim: int | None
    action_horizon: int
    action_dim: int
    max_prompt_chars: int = 2000

    @classmethod
    def of(cls, policy: Any, max_prompt_chars: int = 2000) -> "InputSpec":
        """Read the spec from a policy's `PolicySpec` (every registered family has one), else from its config
        (`num_images`, `use_proprio`, `proprio_dim`, `chunk_len`, `action_dim`, as every OFT config has)."""
        spec = getattr(policy, "spec", None)
        if spec is not None and hasattr(spec, "state_dim") and hasattr(spec, "chunk_len"):
            return cls(int(spec.num_images), int(spec.state_dim) or None, int(spec.chunk_len), int(spec.action_dim),
                       int(max_prompt_chars))
        cfg = getattr(policy, "config", None)
        try:
            return cls(int(cfg.num_images), int(cfg.proprio_dim) if cfg.use_proprio else None, int(cfg.chunk_len),
                       int(cfg.action_dim), int(max_prompt_chars))
        except AttributeError as exc:
            raise TypeError(f"{type(policy).__name__}: cannot read the input spec from policy.config ({exc})") from None


@dataclass(frozen=True)
class ObservationMap:
    """Request keys in the policy's terms. `images` are in the policy's view order; with `extra_images`
    (OpenVLA: "wrist"), every further top-level key containing that text follows, in the request's order."""

    images: tuple[str, ...]
    state: str | None
    prompt: str
    extra_images: str | None = None
    chw: bool = True
    float_images: bool = True
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.images, str) or not all(isinstance(k, str) and k for k in self.images):
            raise ValueError(f"observation map: images must be a list of key names, found {self.images!r}")
        object.__setattr__(self, "images", tuple(self.images))
        if not isinstance(self.prompt, str) or not self.prompt:
            raise ValueError(f"observation map: prompt must be a key name, found {self.prompt!r}")
        if self.state is not None and (not isinstance(self.state, str) or not self.state):
            raise ValueError(f"observation map: state must be a key name or null, found {self.state!r}")

    def check(self, spec: InputSpec) -> None:
        """Refuse at start-up a map that cannot feed this policy."""
        if self.extra_images is None and len(self.images) < spec.num_images:
            raise ValueError(f"observation map {self.name!r} names {len(self.images)} image keys {list(self.images)}, "
                             f"but the policy takes {spec.num_images} views")
        if spec.state_dim is not None and self.state is None:
            raise ValueError(f"observation map {self.name!r} names no state key, but the policy reads a "
                             f"{spec.state_dim}-D state")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["images"] = list(self.images)
        return d


PRESETS: dict[str, ObservationMap] = {
    "libero": ObservationMap(("observation/image", "observation/wrist_image"), "observation/state", "prompt",
                             name="libero"),
    "openpi": ObservationMap(("image/base_0_rgb", "image/left_wrist_0_rgb", "image/right_wrist_0_rgb"), "state",
                             "prompt", name="openpi"),
    "aloha": ObservationMap(("images/cam_high", "images/cam_left_wrist", "images/cam_right_wrist"), "state", "prompt",
                            name="aloha"),
    "openvla": ObservationMap(("full_image",), "state", "instruction", extra_images="wrist", chw=False,
                              float_images=False, name="openvla"),
}


def observation_map(text: str | ObservationMap) -> ObservationMap:
    """A preset name, inline JSON, or a JSON file -> `ObservationMap`."""
    if isinstance(text, ObservationMap):
        return text
    if text in PRESETS:
        return PRESETS[text]
    source = text
    if not text.lstrip().startswith("{"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ValueError(f"observation map {text!r}: not a preset ({', '.join(PRESETS)}), JSON, or a JSON file")
        source = path.read_text()
    try:
        d = json.loads(source)
    except json.JSONDecodeError as exc:
        raise ValueError(f"observation map {text!r}: invalid JSON ({exc})") from None
    known = {"images", "state", "prompt", "extra_images", "chw", "float_images"}
    if not isinstance(d, dict) or not {"images", "prompt"} <= set(d) or set(d) - known:
        raise ValueError(f"observation map {text!r}: expected an object with 'images' and 'prompt' (and optionally "
                         f"{sorted(known - {'images', 'prompt'})})")
    return ObservationMap(**{**{"state": None}, **d}, name="custom")


# ============================================================================ request -> policy observation
def lookup(request: dict, key: str) -> Any:
    """`request[key]`, else the nested path `key.split("/")` through maps; `_MISSING` when absent."""
    if key in request:
        return request[key]
    node: Any = request
    for part in key.split("/"):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def check_image(value: Any, key: str, omap: ObservationMap) -> np.ndarray:
    """uint8 HWC (contiguous) or float32 CHW in [0, 1], the two forms the OFT processor takes."""
    allowed = "uint8 (H, W, 3)" + (" or (3, H, W)" if omap.chw else "") + (
        ", or float in [0, 1]" if omap.float_images else "")
    if not isinstance(value, np.ndarray):
        raise RequestError(f"{key}: expected an image array, {allowed}; found {type(value).__name__}")
    shape = value.shape
    if value.ndim == 3 and shape[2] == 3:
        chw = False
    elif value.ndim == 3 and shape[0] == 3 and omap.chw:
        chw = True
    else:
        raise RequestError(f"{key}: expected an image of shape (H, W, 3){' or (3, H, W)' if omap.chw else ''}, "
                           f"found {shape}")
    h, w = shape[1:] if chw else shape[:2]
    if not (0 < h <= MAX_IMAGE_SIDE and 0 < w <= MAX_IMAGE_SIDE):
        raise RequestError(f"{key}: image sides must lie in 1..{MAX_IMAGE_SIDE}, found {h} x {w}")
    if value.dtype == np.uint8:
        return np.ascontiguousarray(value.transpose(1, 2, 0) if chw else value)
    if value.dtype.kind == "f" and omap.float_images:
        img = np.asarray(value if chw else value.transpose(2, 0, 1), dtype=np.float32)
        if not np.isfinite(img).all():
            raise RequestError(f"{key}: float image has non-finite values (NaN/inf)")
        lo, hi = float(img.min()), float(img.max())
        if lo < 0.0 or hi > 1.0:
            raise RequestError(f"{key}: float images must lie in [0, 1], found [{lo:.4g}, {hi:.4g}]")
        return np.ascontiguousarray(img)
    raise RequestError(f"{key}: image dtype {value.dtype} is not accepted; send {allowed}")


def check_state(value: Any, key: str, dim: int) -> np.ndarray:
    """A finite real vector of `dim` values, as float64 (raw, unnormalised: the server normalises)."""
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
                   for v in value):
            raise RequestError(f"{key}: expected {dim} numbers, found a list holding "
                               f"{sorted({type(v).__name__ for v in value})}")
        value = np.asarray(value, dtype=np.float64)
    if not isinstance(value, np.ndarray):
        raise RequestError(f"{key}: expected a float array of shape ({dim},), found {type(value).__name__}")
    if value.dtype.kind not in "iuf":
        raise RequestError(f"{key}: state must be real-valued (int or float), found dtype {value.dtype}")
    if value.shape != (dim,):
        raise RequestError(f"{key}: expected shape ({dim},), found {value.shape}")
    state = value.astype(np.float64)
    if not np.isfinite(state).all():
        raise RequestError(f"{key}: state has non-finite values at {np.flatnonzero(~np.isfinite(state)).tolist()}")
    return state


def check_prompt(value: Any, key: str, max_chars: int) -> str:
    """A str (or strict UTF-8 bytes, or a 0-d str/bytes array) of at most `max_chars` characters."""
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "US":
        value = value.item()
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(f"{key}: bytes are not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not isinstance(value, str):
        raise RequestError(f"{key}: expected a string, found {type(value).__name__}")
    if len(value) > max_chars:
        raise RequestError(f"{key}: {len(value)} characters, the limit is {max_chars}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{key}: not valid Unicode text (lone surrogates)") from None
    return str(value)


def image_keys(request: dict, omap: ObservationMap, spec: InputSpec) -> list[str]:
    if omap.extra_images is None:
        return list(omap.images[:spec.num_images])
    extra = [k for k in request if isinstance(k, str) and omap.extra_images in k and k not in omap.images]
    keys = list(omap.images) + extra
    if len(keys) > spec.num_images:
        raise RequestError(f"found {len(keys)} images {keys}; the policy takes {spec.num_images} "
                           f"({omap.images[0]!r} plus {spec.num_images - len(omap.images)} keys containing "
                           f"{omap.extra_images!r})")
    return keys + [f"<a key containing {omap.extra_images!r}>"] * (spec.num_images - len(keys))


def to_policy_observation(request: Any, omap: ObservationMap, spec: InputSpec) -> tuple[dict, list[str]]:
    """Validate a request and map it to the policy's observation; also return the unused top-level keys."""
    if not isinstance(request, dict):
        raise RequestError(f"expected the observation as a map of named values, found {type(request).__name__}")
    keys = image_keys(request, omap, spec)
    wanted = keys + ([omap.state] if spec.state_dim is not None else []) + [omap.prompt]
    values = {k: lookup(request, k) for k in wanted}
    missing = [k for k, v in values.items() if v is _MISSING]
    if missing:
        present = sorted(str(k) for k in request)[:20]
        raise RequestError(f"missing required keys {missing} (observation map {omap.name!r}); the request has "
                           f"{present}")
    obs: dict[str, Any] = {"images": [check_image(values[k], k, omap) for k in keys],
                           "instruction": check_prompt(values[omap.prompt], omap.prompt, spec.max_prompt_chars)}
    if spec.state_dim is not None:
        obs["state"] = check_state(values[omap.state], omap.state, spec.state_dim)
    used = {k.split("/")[0] for k in wanted} | set(wanted)
    unused = [str(k) for k in request if k not in used]
    return obs, unused
