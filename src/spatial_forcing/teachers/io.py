"""Files in and out of teachers: images and depth maps from disk, feature grids to safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from .base import TeacherGrid


def load_images(paths: list[str | Path]) -> torch.Tensor:
    """Image files (one per view, same size) -> `[1, V, 3, H, W]` float32 in [0, 1].

    RGBA is composited on white (VGGT's convention); grey and palette images become RGB.
    """
    if not paths:
        raise ValueError("no images given: pass one image file per camera view")
    views, sizes = [], []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such image file")
        try:
            img = Image.open(p)
            img.load()
        except OSError as exc:
            raise ValueError(f"{p}: not a readable image ({exc})") from exc
        if img.mode in ("RGBA", "LA", "P"):
            img = img.convert("RGBA")
            white = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(white, img)
        img = img.convert("RGB")
        sizes.append((p.name, img.size))
        views.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1))
    if len({s for _, s in sizes}) > 1:
        listing = ", ".join(f"{n} is {w}x{h}" for n, (w, h) in sizes)
        raise ValueError(f"all views must share one size (W x H): {listing}")
    return torch.stack(views)[None].float() / 255.0


def load_depths(paths: list[str | Path]) -> torch.Tensor:
    """Metric depth maps (`.npy`, metres, H x W or H x W x 1), one per view -> `[1, V, H, W]`."""
    maps = []
    for p in paths:
        p = Path(p)
        if p.suffix != ".npy":
            raise ValueError(f"{p}: depth maps must be .npy arrays of metres (H x W)")
        arr = _read_array(p, "a depth map (.npy array of metres)")
        if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
            raise ValueError(f"{p}: expected a depth map of real numbers (metres), found dtype {arr.dtype}")
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim != 2:
            raise ValueError(f"{p}: expected an H x W depth map, found shape {arr.shape}")
        maps.append(torch.from_numpy(arr.astype(np.float32)))
    if len({m.shape for m in maps}) > 1:
        raise ValueError(f"all depth maps must share one size, found {[tuple(m.shape) for m in maps]}")
    return torch.stack(maps)[None]


def load_matrices(path: str | Path, views: int, size: int, what: str) -> torch.Tensor:
    """A `.npy` or `.json` holding one `size x size` matrix (shared by all views) or one per view
    -> `[1, V, size, size]`."""
    p = Path(path)
    if p.suffix == ".json":
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such file ({what})")
        try:
            arr = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"{p}: expected {what} as a JSON list of rows ({' '.join(str(exc).split())})") from None
    else:
        arr = _read_array(p, f"{what} (.npy array or .json list)")
    try:
        arr = np.asarray(arr, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{p}: expected {what} of numbers ({exc})") from None
    if arr.shape == (size, size):
        arr = np.broadcast_to(arr, (views, size, size))
    if arr.shape != (views, size, size):
        raise ValueError(f"{p}: {what} must be {size}x{size} or {views}x{size}x{size}, found shape {arr.shape}")
    return torch.from_numpy(np.array(arr, dtype=np.float32))[None]


def _read_array(p: Path, what: str) -> np.ndarray:
    """A `.npy` file's array (no pickles), or a ValueError naming the file."""
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file ({what})")
    with open(p, "rb") as f:
        if f.read(6) != b"\x93NUMPY":
            raise ValueError(f"{p}: expected {what}, found a file that is not a .npy array")
    try:
        return np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:  # truncated, or an object array (a pickle)
        reason = " ".join(str(exc).split())
        raise ValueError(f"{p}: expected {what}, found an unreadable .npy file ({reason})") from None


def save_grid(path: str | Path, grid: TeacherGrid, metadata: dict[str, str] | None = None) -> Path:
    """Write `feats` and `valid` to a safetensors file (string metadata alongside)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"feats": grid.feats.contiguous().cpu(), "valid": grid.valid.contiguous().cpu()}, str(path),
              metadata={k: str(v) for k, v in (metadata or {}).items()})
    return path


def load_grid(path: str | Path) -> TeacherGrid:
    tensors = load_file(str(path))
    missing = {"feats", "valid"} - set(tensors)
    if missing:
        raise ValueError(f"{path}: not a teacher feature file, missing tensors {sorted(missing)}")
    return TeacherGrid(feats=tensors["feats"], valid=tensors["valid"])


def fit_to_patches(images: torch.Tensor, depth: torch.Tensor, intrinsics: torch.Tensor, patch: int,
                   mode: str = "resize", size: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, str]:
    """Bring views of any size `[B,V,*,H,W]` onto a grid of `patch`-pixel patches for the geometry teacher.

    * ``"resize"`` (what training does: the pipeline resizes every frame to the student's side and the
      teacher tiles it with `side / grid`-pixel patches): to `size x size`, or, without `size`, each side
      to its nearest multiple of `patch` (256 -> 252 at 14). Depth is resampled by nearest sampling (as
      `data/dataset.py`'s `resize_nearest`: depths are never interpolated across edges), intrinsics are
      rescaled with pixel centres at +0.5 (as its `resize_intrinsics`), images bilinearly (the geometry
      teacher does not read colours).
    * ``"pad"``: the bottom and right are padded to the next multiple of `patch` (256 -> 266 at 14), with
      white images, zero depth and `pad_mask` False; intrinsics are unchanged (the origin stays). The
      caller marks every patch that holds padding invalid.

    Returns (images, depth, intrinsics, pad_mask or None, a one-line description of what was done).
    """
    if mode not in ("resize", "pad"):
        raise ValueError(f"fit mode: expected 'resize' or 'pad', found {mode!r}")
    h, w = images.shape[-2:]
    if mode == "pad":
        if size is not None:
            raise ValueError("--image-size: has no effect with --fit pad (padding keeps the pixels); drop one")
        nh, nw = -(-h // patch) * patch, -(-w // patch) * patch
        if (nh, nw) == (h, w):
            return images, depth, intrinsics, None, f"{w}x{h}: already {w // patch}x{h // patch} patches of {patch}"
        pad = (0, nw - w, 0, nh - h)
        images = torch.nn.functional.pad(images, pad, value=1.0)
        depth = torch.nn.functional.pad(depth, pad, value=0.0)
        mask = torch.nn.functional.pad(torch.ones(depth.shape[:2] + (h, w), dtype=torch.bool), pad, value=False)
        return images, depth, intrinsics, mask, (f"{w}x{h} padded to {nw}x{nh} (bottom/right, white, zero depth): "
                                                 f"{nw // patch}x{nh // patch} patches of {patch}, those holding "
                                                 f"padding invalid")
    if size is not None:
        if size < patch or size % patch:
            raise ValueError(f"--image-size {size}: expected a multiple of --patch-size {patch} (e.g. "
                             f"{max(patch, round(size / patch) * patch)})")
        nh = nw = size
    else:
        nh, nw = max(patch, round(h / patch) * patch), max(patch, round(w / patch) * patch)
    if (nh, nw) == (h, w):
        return images, depth, intrinsics, None, f"{w}x{h}: already {w // patch}x{h // patch} patches of {patch}"
    b, v = images.shape[:2]
    images = torch.nn.functional.interpolate(images.flatten(0, 1), size=(nh, nw), mode="bilinear",
                                             align_corners=False, antialias=True).view(b, v, 3, nh, nw)
    depth = torch.nn.functional.interpolate(depth.flatten(0, 1)[:, None], size=(nh, nw), mode="nearest").view(b, v, nh, nw)
    k = intrinsics.clone()
    sx, sy = nw / w, nh / h
    k[..., 0, 0], k[..., 0, 1], k[..., 1, 1] = intrinsics[..., 0, 0] * sx, intrinsics[..., 0, 1] * sx, intrinsics[..., 1, 1] * sy
    k[..., 0, 2] = (intrinsics[..., 0, 2] + 0.5) * sx - 0.5
    k[..., 1, 2] = (intrinsics[..., 1, 2] + 0.5) * sy - 0.5
    return images, depth, k, None, (f"{w}x{h} resized to {nw}x{nh} (depth nearest, intrinsics rescaled): "
                                    f"{nw // patch}x{nh // patch} patches of {patch}")


def patches_without_padding(pad_mask: torch.Tensor, patch: int) -> torch.Tensor:
    """`[B,V,H,W]` real-pixel mask -> `[B,V,H/p,W/p]`: True where a patch holds no padding at all."""
    b, v, h, w = pad_mask.shape
    return pad_mask.view(b, v, h // patch, patch, w // patch, patch).all(dim=5).all(dim=3)
