"""The teacher protocol: a frozen feature source that turns camera views into a patch grid.

    features(images01 [B,V,3,H,W], pad_mask [B,V,H,W] | None, **extras) -> TeacherGrid

Images arrive in [0, 1] at the student's resolution (the same augmented pixels the student
sees); the teacher resizes and normalises on its own. `pad_mask` is True on real pixels.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class TeacherGrid:
    """Per-view patch features and their validity.

    feats: `[B, V, h, w, D]` float32, views in the student's camera order, rows then columns.
    valid: `[B, V, h, w]` bool, False where a patch shows padding, an empty slot or invalid depth.
    """

    feats: torch.Tensor
    valid: torch.Tensor

    def __post_init__(self) -> None:
        if self.feats.ndim != 5:
            raise ValueError(f"TeacherGrid.feats must be [B,V,h,w,D], got shape {tuple(self.feats.shape)}")
        if self.valid.shape != self.feats.shape[:4]:
            raise ValueError(f"TeacherGrid.valid must be {tuple(self.feats.shape[:4])}, got {tuple(self.valid.shape)}")
        if self.valid.dtype != torch.bool:
            raise ValueError(f"TeacherGrid.valid must be bool, got {self.valid.dtype}")

    @property
    def dim(self) -> int:
        return self.feats.shape[-1]


class Teacher(nn.Module, abc.ABC):
    """Base class of every teacher: frozen, eval mode, no gradients (subclasses set `dim`)."""

    name: str = "teacher"
    dim: int
    needs_depth: bool = False  # True: `features` needs metric depth and intrinsics (the pipeline loads them)

    def freeze(self) -> "Teacher":
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> "Teacher":
        # A teacher never leaves eval mode, whatever the trainer calls on the module tree.
        return super().train(False)

    @abc.abstractmethod
    def features(self, images: torch.Tensor, pad_mask: torch.Tensor | None = None, **extras) -> TeacherGrid:
        """Frozen features of `images` `[B,V,3,H,W]` in [0, 1] as a `TeacherGrid`."""


def check_images(images: torch.Tensor, what: str = "images") -> None:
    """Validate a `[B, V, 3, H, W]` float tensor in [0, 1] with a message naming what is wrong."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor [B,V,3,H,W], got {type(images).__name__}")
    if images.ndim != 5:
        raise ValueError(f"{what}: expected rank 5 [B,V,3,H,W], got rank {images.ndim} with shape {tuple(images.shape)}")
    b, v, c, h, w = images.shape
    if c != 3:
        raise ValueError(f"{what}: expected 3 colour channels at dim 2, got {c} (shape {tuple(images.shape)})")
    if min(b, v, h, w) < 1:
        raise ValueError(f"{what}: expected non-empty batch, views and image sides, got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"{what}: expected floating point values in [0, 1], got dtype {images.dtype} "
                        "(divide uint8 images by 255)")
    lo, hi = float(images.min()), float(images.max())
    if not (lo >= 0.0 and hi <= 1.0):  # also rejects NaN
        raise ValueError(f"{what}: expected values in [0, 1], found range [{lo:.4g}, {hi:.4g}]")


def check_pad_mask(pad_mask: torch.Tensor | None, images: torch.Tensor) -> None:
    if pad_mask is None:
        return
    b, v, _, h, w = images.shape
    if tuple(pad_mask.shape) != (b, v, h, w):
        raise ValueError(f"pad_mask: expected shape {(b, v, h, w)} (True = real pixel), got {tuple(pad_mask.shape)}")
    if pad_mask.dtype != torch.bool:
        raise TypeError(f"pad_mask: expected dtype bool (True = real pixel), got {pad_mask.dtype}")
