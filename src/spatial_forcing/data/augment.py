"""Training augmentation in torch, as the OpenVLA-OFT recipe (DATA.md A.8), per view:

1. random crop of 90% of the area (square box of side sqrt(0.9), offsets `u * (1 - side)` with
   one `u` for both axes, as the upstream stateless seed gives), bilinear crop-and-resize back;
2. brightness `x + d`, d ~ U[-0.2, 0.2);   3. contrast `(x - mean_c) f + mean_c`, f ~ U[0.8, 1.2);
4. saturation x f in HSV, f ~ U[0.8, 1.2); 5. hue + d (wrapping), d ~ U[-0.05, 0.05];
clipping to [0, 1] after each step.

The crop box is returned and applied unchanged to depth, padding masks and teacher feature maps
(`crop_resize`), so geometry stays aligned with the pixels. Boxes are normalised `(y0, x0, y1, x1)`;
normalised coordinate y samples pixel `y * (H - 1)` (TF `crop_and_resize`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    """`color`: the colour jitter (steps 2-5) on or off; the crop always applies."""

    crop_area: float = 0.9
    brightness: float = 0.2
    contrast: tuple[float, float] = (0.8, 1.2)
    saturation: tuple[float, float] = (0.8, 1.2)
    hue: float = 0.05
    color: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.crop_area <= 1:
            raise ValueError(f"crop_area must be in (0, 1], got {self.crop_area}")


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def sample_crop_box(g: torch.Generator, area: float = 0.9) -> tuple[float, float, float, float]:
    side = math.sqrt(area)
    offset = _uniform(g, 0.0, 1.0) * (1.0 - side)
    return offset, offset, offset + side, offset + side


def crop_resize(x: torch.Tensor, box: tuple[float, float, float, float], size: tuple[int, int],
                mode: str = "bilinear") -> torch.Tensor:
    """Crop `box` from `x` `[..., C, H, W]` and resample to `size`; output pixel i reads input
    `y0 (H-1) + i (y1-y0)(H-1)/(h-1)`. `mode` "nearest" for depth and masks, "bilinear" otherwise.

    The sample positions are TF `crop_and_resize`'s; the arithmetic is `grid_sample`'s (about 4x
    faster on the training hot path, last-bit rounding aside). Evaluation, where bits must match
    the released pipeline, uses the TF-order implementation `policies/images.center_crop`."""
    *lead, c, h, w = x.shape
    y0, x0, y1, x1 = box
    oh, ow = size
    ys = torch.linspace(y0, y1, oh, dtype=torch.float32, device=x.device) * 2 - 1
    xs = torch.linspace(x0, x1, ow, dtype=torch.float32, device=x.device) * 2 - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (oh, ow, 2) as (x, y)
    flat = x.reshape(-1, c, h, w)
    src = flat if flat.is_floating_point() else flat.float()
    out = F.grid_sample(src, grid[None].expand(len(flat), -1, -1, -1), mode=mode, padding_mode="border",
                        align_corners=True)
    return out.to(x.dtype).reshape(*lead, c, oh, ow)


def crop_intrinsics(k: torch.Tensor, box: tuple[float, float, float, float], in_hw: tuple[int, int],
                    out_hw: tuple[int, int]) -> torch.Tensor:
    """Pixel intrinsics after `crop_resize` (an affine map of pixel coordinates)."""
    (h, w), (oh, ow) = in_hw, out_hw
    y0, x0, y1, x1 = box
    sy = (oh - 1) / ((y1 - y0) * (h - 1))
    sx = (ow - 1) / ((x1 - x0) * (w - 1))
    out = k.clone()
    out[..., 0, :] = k[..., 0, :] * sx
    out[..., 1, :] = k[..., 1, :] * sy
    out[..., 0, 2] = (k[..., 0, 2] - x0 * (w - 1)) * sx
    out[..., 1, 2] = (k[..., 1, 2] - y0 * (h - 1)) * sy
    return out


def saturation_hue(x: torch.Tensor, factor: float, delta: float) -> torch.Tensor:
    """HSV saturation x `factor` (clamped to [0, 1]) then hue + `delta` (wrapping), on `[..., 3, H, W]`
    in [0, 1], in one pass. Saturation leaves hue and value alone, so both edit one HSV decomposition:
    with V = max, C = max - min and hue sector ``h6 = 6 H``, the result is
    ``V - min(C factor, V) * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + h6 + 6 delta) mod 6`` for
    n = 5, 3, 1 (R, G, B). Grey pixels (C = 0) stay grey."""
    r, g, b = x.unbind(-3)
    v = torch.maximum(torch.maximum(r, g), b)
    chroma = v - torch.minimum(torch.minimum(r, g), b)
    inv = chroma.clamp_min(1e-12).reciprocal_()
    # hue sector in [0, 6): the max channel decides (ties: red, then green, as argmax)
    h6 = torch.where(v == r, (g - b).mul_(inv),
                     torch.where(v == g, (b - r).mul_(inv).add_(2.0), (r - g).mul_(inv).add_(4.0)))
    h6 = h6.add_(6.0 * delta).remainder_(6.0)
    new_chroma = torch.minimum(chroma.mul_(factor), v)
    out = []
    for n in (5.0, 3.0, 1.0):  # R, G, B
        k = h6 + n
        k = torch.where(k >= 6.0, k - 6.0, k)
        out.append(v - new_chroma * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0))
    return torch.stack(out, dim=-3)


def jitter(x: torch.Tensor, brightness: float | torch.Tensor, contrast: float | torch.Tensor,
           saturation: float | torch.Tensor, hue: float | torch.Tensor) -> torch.Tensor:
    """Brightness `+ d`, contrast `(x - mean_c) f + mean_c`, saturation `x f` and hue `+ d` (in that order,
    clipping to [0, 1] after each) on `[..., 3, H, W]` in [0, 1]. Each amount is a number, or a tensor that
    broadcasts against `[..., 1, 1, 1]` (one value per image of a batch)."""
    if isinstance(brightness, torch.Tensor):  # one value per image: [N] -> [N, 1, 1, 1] / [N, 1, 1]
        b4 = lambda t: t.reshape(*t.shape, 1, 1, 1)  # noqa: E731
        brightness, contrast = b4(brightness), b4(contrast)
        saturation, hue = saturation.reshape(*saturation.shape, 1, 1), hue.reshape(*hue.shape, 1, 1)
    x = (x + brightness).clamp(0, 1)
    mean = x.mean(dim=(-2, -1), keepdim=True)
    x = ((x - mean) * contrast + mean).clamp(0, 1)
    return saturation_hue(x, saturation, hue).clamp(0, 1)


def color_jitter(x: torch.Tensor, g: torch.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """Brightness, contrast, saturation, hue (in that order) on `[3, H, W]` in [0, 1]."""
    brightness = _uniform(g, -cfg.brightness, cfg.brightness)
    contrast = _uniform(g, *cfg.contrast)
    saturation = _uniform(g, *cfg.saturation)
    return jitter(x, brightness, contrast, saturation, _uniform(g, -cfg.hue, cfg.hue))


def augment_view(image: torch.Tensor, g: torch.Generator, cfg: AugmentConfig
                 ) -> tuple[torch.Tensor, tuple[float, float, float, float]]:
    """One view `[3, H, W]` in [0, 1] -> augmented view of the same size and the crop box used."""
    box = sample_crop_box(g, cfg.crop_area)
    cropped = crop_resize(image, box, tuple(image.shape[-2:])).clamp(0, 1)
    return (color_jitter(cropped, g, cfg) if cfg.color else cropped), box


# ------------------------------------------------------------------------------ batched (in memory)
@dataclass
class AugmentParams:
    """The random amounts of one batch of views, one value per view `[N]` (float32): crop offset `u`
    (box `(o, o, o + s, o + s)`, `o = u (1 - s)`, `s = sqrt(crop_area)`), brightness, contrast, saturation,
    hue. The same distribution as `augment_view` draws per view."""

    crop: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor

    @classmethod
    def sample(cls, n: int, g: torch.Generator, cfg: AugmentConfig) -> "AugmentParams":
        u = torch.rand(5, n, generator=g, dtype=torch.float64)
        span = lambda row, lo, hi: (lo + (hi - lo) * u[row]).float()  # noqa: E731
        return cls(crop=u[0].float(), brightness=span(1, -cfg.brightness, cfg.brightness),
                   contrast=span(2, *cfg.contrast), saturation=span(3, *cfg.saturation), hue=span(4, -cfg.hue, cfg.hue))

    def boxes(self, area: float) -> torch.Tensor:
        """`[N, 4]` normalised `(y0, x0, y1, x1)`."""
        side = math.sqrt(area)
        o = self.crop.double() * (1.0 - side)
        return torch.stack([o, o, o + side, o + side], dim=1).float()


def crop_resize_batch(x: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], mode: str = "bilinear"
                      ) -> torch.Tensor:
    """`crop_resize` with one box per image: `x` `[N, C, H, W]`, `boxes` `[N, 4]` -> `[N, C, *size]` (the
    same sample positions and arithmetic as `crop_resize` applied image by image)."""
    n, c = x.shape[:2]
    oh, ow = size
    t_y = torch.linspace(0, 1, oh, dtype=torch.float32, device=x.device)
    t_x = torch.linspace(0, 1, ow, dtype=torch.float32, device=x.device)
    b = boxes.to(x.device, torch.float32)
    ys = torch.lerp(b[:, 0:1], b[:, 2:3], t_y) * 2 - 1  # [N, oh]
    xs = torch.lerp(b[:, 1:2], b[:, 3:4], t_x) * 2 - 1  # [N, ow]
    grid = torch.stack([xs[:, None, :].expand(n, oh, ow), ys[:, :, None].expand(n, oh, ow)], dim=-1)
    src = x if x.is_floating_point() else x.float()
    out = F.grid_sample(src, grid, mode=mode, padding_mode="border", align_corners=True)
    return out.to(x.dtype)


def crop_intrinsics_batch(k: torch.Tensor, boxes: torch.Tensor, in_hw: tuple[int, int], out_hw: tuple[int, int]
                          ) -> torch.Tensor:
    """`crop_intrinsics` with one box per matrix: `k` `[N, 3, 3]`, `boxes` `[N, 4]`."""
    (h, w), (oh, ow) = in_hw, out_hw
    b = boxes.to(k.dtype)
    sy = (oh - 1) / ((b[:, 2] - b[:, 0]) * (h - 1))
    sx = (ow - 1) / ((b[:, 3] - b[:, 1]) * (w - 1))
    out = k.clone()
    out[:, 0, :] = k[:, 0, :] * sx[:, None]
    out[:, 1, :] = k[:, 1, :] * sy[:, None]
    out[:, 0, 2] = (k[:, 0, 2] - b[:, 1] * (w - 1)) * sx
    out[:, 1, 2] = (k[:, 1, 2] - b[:, 0] * (h - 1)) * sy
    return out


def augment_batch(images: torch.Tensor, params: AugmentParams, cfg: AugmentConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of views `[N, 3, H, W]` in [0, 1] -> (augmented views, crop boxes `[N, 4]`): each view as
    `augment_view` with the amounts of `params` (crop, then the colour jitter)."""
    boxes = params.boxes(cfg.crop_area)
    cropped = crop_resize_batch(images, boxes, tuple(images.shape[-2:])).clamp(0, 1)
    if not cfg.color:
        return cropped, boxes
    return jitter(cropped, params.brightness, params.contrast, params.saturation, params.hue), boxes
