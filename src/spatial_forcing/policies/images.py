"""Image operations every policy family shares: views as tensors, the TF-exact evaluation centre crop
and the resize to a policy's side (OPENVLA_OFT.md §9, LIBERO.md §3.2).

    as_view_tensor(image) -> (3, H, W) uint8 or float tensor
    crop_box(area) -> (low, high, side)                      the centred square box, float32 as in TF
    center_crop(view, size, area=0.9) -> (3, size, size)     TF `crop_and_resize`, bilinear, bit-exact
    resize_view(view, size) -> (3, size, size)               PIL bicubic for uint8, antialiased bicubic for float
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CROP_AREA = 0.9  # upstream eval `center_crop_image`: crop_scale 0.9 of the area


def as_view_tensor(image: Any, what: str = "image") -> torch.Tensor:
    """One view as a CPU tensor: uint8 `(3, H, W)` for uint8 HWC / PIL input, float32 `(3, H, W)` for float.

    Accepted: uint8 `(H, W, 3)` numpy/torch, a PIL image (converted to RGB), or float `(3, H, W)`
    numpy/torch with values in [0, 1].
    """
    if isinstance(image, Image.Image):
        image = np.array(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        image = np.ascontiguousarray(image)
        t = torch.from_numpy(image if image.flags.writeable else image.copy())
    elif isinstance(image, torch.Tensor):
        t = image.detach().cpu()
    else:
        raise TypeError(f"{what}: expected a numpy array, torch tensor or PIL image, found {type(image).__name__}")
    shape = tuple(t.shape)
    if t.dtype == torch.uint8:
        if t.ndim != 3 or shape[2] != 3:
            hint = " (uint8 images are HWC; for CHW use .permute(1, 2, 0))" if t.ndim == 3 and shape[0] == 3 else ""
            raise ValueError(f"{what}: uint8 image must have shape (H, W, 3), found {shape}{hint}")
        return t.permute(2, 0, 1).contiguous()
    if t.is_floating_point():
        if t.ndim != 3 or shape[0] != 3:
            hint = " (float images are CHW; for HWC use .permute(2, 0, 1))" if t.ndim == 3 and shape[2] == 3 else ""
            raise ValueError(f"{what}: float image must have shape (3, H, W), found {shape}{hint}")
        t = t.float()
        lo, hi = float(t.min()), float(t.max())
        if not (0.0 <= lo and hi <= 1.0):
            raise ValueError(f"{what}: float image values must lie in [0, 1], found range [{lo:.4g}, {hi:.4g}] "
                             "(pass uint8 HWC for 0..255 pixels)")
        return t
    raise ValueError(f"{what}: expected dtype uint8 (H, W, 3) or float (3, H, W) in [0, 1], found {t.dtype} "
                     f"with shape {shape}")


def crop_box(area: float = CROP_AREA) -> tuple[float, float, float]:
    """`(low, high, side)` of the centred square crop box, normalised coordinates, float32 as in TF.

    `side = sqrt(float32(area))` correctly rounded (TF and numpy give 0.94868326 for 0.9; torch's CPU
    sqrt gave the next float up here, 0.94868332, moving samples by ~7e-6 px), `low = (1 - side) / 2`,
    `high = low + side`.
    """
    side = np.clip(np.sqrt(np.float32(area)), np.float32(0), np.float32(1))
    low = (np.float32(1) - side) / np.float32(2)
    return float(low), float(low + side), float(side)


def _crop_sample_coords(n_in: int, n_out: int, area: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TF `crop_and_resize` sample positions on one axis: (low index, high index, lerp weight)."""
    low, high, _ = crop_box(area)
    lo = torch.tensor(low, dtype=torch.float32)
    hi = torch.tensor(high, dtype=torch.float32)
    scale = (hi - lo) * (n_in - 1) / (n_out - 1) if n_out > 1 else torch.zeros((), dtype=torch.float32)
    i = torch.arange(n_out, dtype=torch.float32)
    pos = lo * (n_in - 1) + i * scale if n_out > 1 else (0.5 * (lo + hi) * (n_in - 1)).expand(1)
    floor = pos.floor()
    return floor.long(), pos.ceil().long().clamp(max=n_in - 1), pos - floor


def center_crop(view: torch.Tensor, size: int, area: float = CROP_AREA) -> torch.Tensor:
    """Centre crop of `area` (fraction of the image) resampled to `size x size`, TF bilinear style.

    Bit-exact with TF in its operation order (evaluation must match the released pipeline); the
    training augmentation samples the same positions with the faster `data.augment.crop_resize`.

    `view` is a `(3, H, W)` uint8 or float tensor from `as_view_tensor`; the result has the same kind.
    """
    uint8 = view.dtype == torch.uint8
    v = view.float() * torch.tensor(1.0 / 255.0, dtype=torch.float32) if uint8 else view.float()
    _, h, w = v.shape
    top, bottom, ly = _crop_sample_coords(h, size, area)
    left, right, lx = _crop_sample_coords(w, size, area)
    rows_t, rows_b = v[:, top], v[:, bottom]  # (3, size, W)
    tl, tr, bl, br = rows_t[:, :, left], rows_t[:, :, right], rows_b[:, :, left], rows_b[:, :, right]
    t = tl + (tr - tl) * lx
    b = bl + (br - bl) * lx
    out = (t + (b - t) * ly[:, None]).clamp(0.0, 1.0)
    if uint8:
        return (out * 255.5).clamp(0, 255).to(torch.uint8)  # float -> uint8 truncates, like TF's cast
    return out


def resize_view(view: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a `(3, H, W)` view to `size x size` (bicubic, antialias); a no-op when already that size."""
    if view.shape[-2:] == (size, size):
        return view
    if view.dtype == torch.uint8:
        pil = Image.fromarray(view.permute(1, 2, 0).numpy())
        return torch.from_numpy(np.array(pil.resize((size, size), Image.Resampling.BICUBIC))).permute(2, 0, 1)
    out = F.interpolate(view[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
    return out.clamp(0.0, 1.0)


def resize_with_pad(image: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """openpi's `resize_with_pad` (openpi-client `image_tools`): uint8 HxWx3 -> `(height, width, 3)` keeping
    the aspect ratio (`ratio = max(W/width, H/height)`, sides `int(H/ratio)`, `int(W/ratio)`), PIL bilinear,
    pasted at offsets `int((height - h) / 2)`, `int((width - w) / 2)` on black; plus the letterbox mask
    (True = real pixel), openpi-SF's `image_padding_mask`. An image already of that size is unchanged."""
    h, w = image.shape[:2]
    mask = np.zeros((height, width), dtype=bool)
    if (h, w) == (height, width):
        mask[:] = True
        return image, mask
    ratio = max(w / width, h / height)
    new_h, new_w = int(h / ratio), int(w / ratio)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=Image.Resampling.BILINEAR))
    top, left = max(0, int((height - new_h) / 2)), max(0, int((width - new_w) / 2))
    out = np.zeros((height, width, image.shape[2]), dtype=image.dtype)
    out[top:top + new_h, left:left + new_w] = resized
    mask[top:top + new_h, left:left + new_w] = True
    return out, mask
