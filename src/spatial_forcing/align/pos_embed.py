"""The UV grid and 2-D sin-cos positional embedding that Spatial Forcing adds to the teacher grid.

It is the same routine VGGT's DPT heads use, so `teachers/vggt` imports it from here.
Formulas: SPATIAL_FORCING.md §5.
"""

from __future__ import annotations

import torch


def uv_grid(width: int, height: int, aspect_ratio: float | None = None,
            dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """Normalised UV coordinates of a `height x width` grid, shape `(height, width, 2)`.

    `grid[i, j] = (u_j, v_i)`; the spans are `a/sqrt(a^2+1)` and `1/sqrt(a^2+1)` with
    `a = aspect_ratio` (default `width/height`), shrunk by `(n-1)/n` so the points are patch centres.
    """
    if width < 1 or height < 1:
        raise ValueError(f"uv_grid needs a grid of at least 1x1, got {height}x{width}")
    a = float(width) / float(height) if aspect_ratio is None else float(aspect_ratio)
    diag = (a * a + 1.0) ** 0.5
    span_x, span_y = a / diag, 1.0 / diag
    ext_x = span_x * (width - 1) / width
    ext_y = span_y * (height - 1) / height
    u = torch.linspace(-ext_x, ext_x, steps=width, dtype=dtype, device=device)
    v = torch.linspace(-ext_y, ext_y, steps=height, dtype=dtype, device=device)
    uu, vv = torch.meshgrid(u, v, indexing="xy")  # both (height, width)
    return torch.stack((uu, vv), dim=-1)


def sincos_1d(positions: torch.Tensor, dim: int, omega_0: float = 100.0) -> torch.Tensor:
    """`[sin(p*w_0..w_{K-1}), cos(p*w_0..w_{K-1})]` with `w_k = omega_0^(-k/K)`, `K = dim/2`.

    Computed in float64 (positions promoted exactly), returned as float32, shape `(M, dim)`.
    """
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {dim}")
    k = torch.arange(dim // 2, dtype=torch.float64, device=positions.device)
    omega = 1.0 / omega_0 ** (k / (dim / 2.0))
    angles = positions.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def uv_sincos_embedding(grid: torch.Tensor, dim: int, omega_0: float = 100.0) -> torch.Tensor:
    """Embed a `(h, w, 2)` UV grid as `(h, w, dim)`: `[sin_u, cos_u, sin_v, cos_v]`, `dim/4` each."""
    if dim % 4:
        raise ValueError(f"UV positional embedding needs a width divisible by 4, got {dim}")
    h, w, two = grid.shape
    if two != 2:
        raise ValueError(f"expected a (h, w, 2) UV grid, got shape {tuple(grid.shape)}")
    flat = grid.reshape(-1, 2)
    emb = torch.cat([sincos_1d(flat[:, 0], dim // 2, omega_0), sincos_1d(flat[:, 1], dim // 2, omega_0)], dim=-1)
    return emb.view(h, w, dim)


def add_uv_pos_embed(x: torch.Tensor, ratio: float = 0.1, aspect_ratio: float | None = None,
                     omega_0: float = 100.0) -> torch.Tensor:
    """Return `x + ratio * E` for channels-first feature maps `x` of shape `(N, C, h, w)`.

    `aspect_ratio` is the width/height of the image the grid was computed from (default `w/h`,
    which equals it whenever both sides are whole multiples of the patch size).
    """
    n, c, h, w = x.shape
    grid = uv_grid(w, h, aspect_ratio, dtype=x.dtype, device=x.device)
    emb = uv_sincos_embedding(grid, c, omega_0).to(device=x.device)
    return x + (emb * ratio).permute(2, 0, 1)[None].to(x.dtype)
