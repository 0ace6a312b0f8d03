"""VGGT as a Spatial Forcing teacher: resize to the working resolution, run the frozen aggregator,
return one layer's patch features as a grid (SPATIAL_FORCING.md §3-4, VGGT.md §6)."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from ..base import Teacher, TeacherGrid, check_images, check_pad_mask
from .config import VGGTConfig
from .model import VGGT

RESIZE_MODES = ("crop", "pad")
WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def working_size(height: int, width: int, target: int = 518, patch: int = 14,
                 mode: str = "crop") -> tuple[int, int]:
    """Size `(h, w)` an image is resized to before cropping/padding to the teacher input.

    crop: width -> target, height -> round(h*target/w/patch)*patch (then centre-cropped to
    target rows if taller). pad: the long side -> target, the other rounded to the patch size.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    if mode == "crop" or width >= height:
        new_w, new_h = target, round(height * (target / width) / patch) * patch
    else:
        new_h, new_w = target, round(width * (target / height) / patch) * patch
    if min(new_h, new_w) < patch:
        raise ValueError(f"an image of {height}x{width} pixels becomes {new_h}x{new_w} at the teacher's "
                         f"{target}-pixel working size, smaller than one {patch}x{patch} patch; "
                         "use a less elongated image")
    return new_h, new_w


def prepare_images(images: torch.Tensor, pad_mask: torch.Tensor | None, target: int = 518, patch: int = 14,
                   mode: str = "crop") -> tuple[torch.Tensor, torch.Tensor]:
    """`[B,V,3,H,W]` in [0,1] -> teacher input `[B,V,3,H',W']` and real-pixel mask `[B,V,H',W']`.

    Non-real pixels (pad_mask False, and the teacher's own padding in pad mode) are white (1.0).
    Upsampling is bicubic without antialias and without clamping (as upstream SF); downsampling
    adds antialias (as VGGT's PIL loader does for files).
    """
    b, v, c, height, width = images.shape
    new_h, new_w = working_size(height, width, target, patch, mode)
    x = images.reshape(b * v, c, height, width)
    real = (torch.ones(b * v, 1, height, width, device=images.device) if pad_mask is None
            else pad_mask.reshape(b * v, 1, height, width).to(images.dtype))
    if pad_mask is not None:
        x = torch.where(real.bool(), x, torch.ones_like(x))
    if (new_h, new_w) != (height, width):
        shrink = new_h < height or new_w < width
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=shrink)
        real = F.interpolate(real, size=(new_h, new_w), mode="nearest")
    if new_h > target:  # crop mode, tall image: keep the centre rows
        top = (new_h - target) // 2
        x, real = x[..., top:top + target, :], real[..., top:top + target, :]
    elif mode == "pad" and (new_h < target or new_w < target):
        top, left = (target - new_h) // 2, (target - new_w) // 2
        pads = (left, target - new_w - left, top, target - new_h - top)
        x = F.pad(x, pads, value=1.0)
        real = F.pad(real, pads, value=0.0)
    out_h, out_w = x.shape[-2:]
    return x.reshape(b, v, c, out_h, out_w), real.reshape(b, v, out_h, out_w) > 0.5


def patch_validity(real: torch.Tensor, patch: int) -> torch.Tensor:
    """`[B,V,H,W]` real-pixel mask -> `[B,V,H/p,W/p]`: a patch is valid iff all its pixels are real."""
    b, v, h, w = real.shape
    fake = (~real).float().reshape(b * v, 1, h, w)
    return (F.max_pool2d(fake, patch) == 0).reshape(b, v, h // patch, w // patch)


class VGGTTeacher(Teacher):
    """Frozen VGGT aggregator returning the patch grid of one block pair.

    layer: index into the aggregator's block pairs (-1 = last, the SF recipe).
    resize_mode: "crop" (SF default) or "pad" (letterbox with white, padded patches invalid).
    weights_dtype: "float32" (the SF recipe: fp32 weights under bf16 autocast on CUDA, fp32
        residual stream, exact upstream numerics) or "bfloat16" (weights and activations in bf16:
        half the memory; RoPE tables stay fp32, so positions remain exact; features differ from the
        recipe by bf16 rounding). Features are always returned as float32.
    """

    name = "vggt"

    def __init__(self, model: VGGT, layer: int = -1, resize_mode: str = "crop",
                 weights_dtype: str = "float32") -> None:
        super().__init__()
        depth = model.config.depth
        if not -depth <= layer < depth:
            raise ValueError(f"VGGT layer {layer} is out of range for {depth} block pairs (use -{depth}..{depth - 1})")
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        if weights_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"weights_dtype must be one of {sorted(WEIGHT_DTYPES)}, got {weights_dtype!r}")
        self.model = model.to(WEIGHT_DTYPES[weights_dtype])
        self.weights_dtype = weights_dtype
        self.layer = layer
        self.resize_mode = resize_mode
        self.dim = model.config.feature_dim
        self.freeze()

    @classmethod
    def from_pretrained(cls, path: str | Path, layer: int = -1, resize_mode: str = "crop",
                        config: VGGTConfig | None = None, weights_dtype: str = "float32") -> "VGGTTeacher":
        return cls(VGGT.from_pretrained(path, config=config), layer, resize_mode, weights_dtype)

    @classmethod
    def from_config(cls, config: VGGTConfig, layer: int = -1, resize_mode: str = "crop",
                    weights_dtype: str = "float32") -> "VGGTTeacher":
        """Randomly initialised (benchmarks and tests)."""
        return cls(VGGT(config), layer, resize_mode, weights_dtype)

    @torch.no_grad()
    def features(self, images: torch.Tensor, pad_mask: torch.Tensor | None = None, **extras) -> TeacherGrid:
        check_images(images)
        check_pad_mask(pad_mask, images)
        cfg = self.model.config
        device = next(self.model.parameters()).device
        x, real = prepare_images(images.to(device=device, dtype=torch.float32),
                                 None if pad_mask is None else pad_mask.to(device),
                                 cfg.img_size, cfg.patch_size, self.resize_mode)
        bf16_weights = self.weights_dtype == "bfloat16"
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and not bf16_weights
                    else nullcontext())
        with autocast:
            tokens = self.model.aggregator(x.to(WEIGHT_DTYPES[self.weights_dtype]), layers=[self.layer])[self.layer]
        b, v = x.shape[:2]
        h, w = x.shape[-2] // cfg.patch_size, x.shape[-1] // cfg.patch_size
        feats = tokens[:, :, cfg.patch_start_idx:].float().reshape(b, v, h, w, self.dim)
        return TeacherGrid(feats=feats, valid=patch_validity(real, cfg.patch_size))
