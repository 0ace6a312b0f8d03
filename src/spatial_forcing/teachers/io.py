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
        arr = np.load(p)
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
    arr = np.asarray(json.loads(p.read_text()) if p.suffix == ".json" else np.load(p), dtype=np.float32)
    if arr.shape == (size, size):
        arr = np.broadcast_to(arr, (views, size, size))
    if arr.shape != (views, size, size):
        raise ValueError(f"{p}: {what} must be {size}x{size} or {views}x{size}x{size}, found shape {arr.shape}")
    return torch.from_numpy(np.array(arr, dtype=np.float32))[None]


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
