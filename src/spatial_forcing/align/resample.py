"""Matching the teacher grid to the student grid: bilinear resampling of features, nearest
resampling of validity masks (SPATIAL_FORCING.md §6, §8)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .pos_embed import add_uv_pos_embed


def grid_side(num_tokens: int, num_views: int) -> int:
    """Per-view square grid side `s` with `num_views * s * s == num_tokens`, or a ValueError.

    Upstream computes `int(37 / sqrt(V * 1369 / T))` and never checks it; this is exact.
    """
    per_view, rest = divmod(num_tokens, num_views)
    side = math.isqrt(per_view)
    if rest or side * side != per_view:
        raise ValueError(f"{num_tokens} visual tokens over {num_views} views do not form square per-view grids")
    return side


def resample_features(feats: torch.Tensor, size: tuple[int, int], pos_embed_ratio: float | None = 0.1) -> torch.Tensor:
    """Teacher grid `[B,V,H',W',D]` -> `[B,V,h,w,D]` (float32).

    The UV positional embedding (if `pos_embed_ratio` is not None) is added on the teacher grid
    with aspect `W'/H'`, then the grid is resized bilinearly with `align_corners=True`.
    """
    b, v, ht, wt, d = feats.shape
    x = feats.float().reshape(b * v, ht, wt, d).permute(0, 3, 1, 2)
    if pos_embed_ratio is not None:
        x = add_uv_pos_embed(x, ratio=pos_embed_ratio)
    if (ht, wt) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)
    return x.permute(0, 2, 3, 1).reshape(b, v, size[0], size[1], d)


def resample_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bool mask `[B,V,H,W]` -> `[B,V,h,w]` by nearest sampling: cell (i, j) reads pixel
    `(floor(i*H/h), floor(j*W/w))`, the top-left pixel of its patch when H = p*h."""
    b, v, h, w = mask.shape
    if (h, w) == tuple(size):
        return mask
    out = F.interpolate(mask.reshape(b * v, 1, h, w).float(), size=tuple(size), mode="nearest")
    return out.reshape(b, v, *size) > 0.5


def combine_masks(size: tuple[int, int], batch: int, views: int, device: torch.device,
                  teacher_valid: torch.Tensor | None = None, slot_mask: torch.Tensor | None = None,
                  pad_mask: torch.Tensor | None = None) -> torch.Tensor:
    """AND of every mask that is given, on the student grid `[B,V,h,w]` (True = align this token).

    teacher_valid `[B,V,H',W']` (padding / invalid depth on the teacher grid), slot_mask `[B,V]`
    (False for an empty camera slot), pad_mask `[B,V,H,W]` (student pixels, True = real).
    """
    valid = torch.ones(batch, views, *size, dtype=torch.bool, device=device)
    if teacher_valid is not None:
        valid &= resample_mask(teacher_valid.bool(), size)
    if pad_mask is not None:
        if pad_mask.shape[:2] != (batch, views) or pad_mask.ndim != 4:
            raise ValueError(f"pad_mask must be [B={batch},V={views},H,W], got {tuple(pad_mask.shape)}")
        valid &= resample_mask(pad_mask.bool(), size)
    if slot_mask is not None:
        if tuple(slot_mask.shape) != (batch, views):
            raise ValueError(f"slot_mask must be [B={batch},V={views}], got {tuple(slot_mask.shape)}")
        valid &= slot_mask.bool()[:, :, None, None]
    return valid
