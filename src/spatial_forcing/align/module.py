"""`SpatialForcing`: student visual states + teacher grid -> alignment loss.

    visual_hidden [B,V,h,w,Ds] --projector--> [B,V*h*w,Dt] --cosine (masked)--> loss
    teacher feats [B,V,H',W',Dt] --(+ratio*UV PE)--> bilinear to (h,w) --^

The student owns its token layout (and any one-position shift); this module only sees grids.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import AlignConfig
from .loss import masked_cosine_loss
from .projector import AlignProjector
from .resample import combine_masks, resample_features


class SpatialForcing(nn.Module):
    """Holds the projector (trained, saved with the run, never needed at inference)."""

    def __init__(self, config: AlignConfig, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        if config.use_pos_embed and teacher_dim % 4:
            raise ValueError(f"use_pos_embed needs a teacher width divisible by 4 (UV sin-cos: [sin_u, cos_u, sin_v, "
                             f"cos_v]), got {teacher_dim}; set use_pos_embed=False for this teacher")
        self.config = config
        self.student_dim = student_dim
        self.teacher_dim = teacher_dim
        self.projector = AlignProjector(student_dim, teacher_dim, use_norm=config.projector_norm)

    def targets(self, teacher_feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Teacher grid `[B,V,H',W',Dt]` -> targets on the student grid `[B,V,h,w,Dt]` (float32)."""
        ratio = self.config.pos_embed_ratio if self.config.use_pos_embed else None
        return resample_features(teacher_feats, size, ratio)

    def forward(self, visual_hidden: torch.Tensor, teacher_feats: torch.Tensor,
                teacher_valid: torch.Tensor | None = None, slot_mask: torch.Tensor | None = None,
                pad_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Alignment loss (unweighted; the trainer multiplies by `config.coeff`) and metrics.

        visual_hidden `[B,V,h,w,Ds]` (in the autograd graph); teacher_feats `[B,V,H',W',Dt]`
        (no gradient); optional masks, True = real: teacher_valid `[B,V,H',W']`, slot_mask `[B,V]`,
        pad_mask `[B,V,H,W]` on the student's pixels.
        """
        if visual_hidden.ndim != 5 or visual_hidden.shape[-1] != self.student_dim:
            raise ValueError(f"visual_hidden must be [B,V,h,w,{self.student_dim}], got {tuple(visual_hidden.shape)}")
        b, v, h, w, _ = visual_hidden.shape
        if teacher_feats.ndim != 5 or teacher_feats.shape[:2] != (b, v) or teacher_feats.shape[-1] != self.teacher_dim:
            raise ValueError(f"teacher grid must be [B={b},V={v},H',W',{self.teacher_dim}], "
                             f"got {tuple(teacher_feats.shape)}")
        target = self.targets(teacher_feats.detach(), (h, w)).reshape(b, v * h * w, self.teacher_dim)
        valid = combine_masks((h, w), b, v, visual_hidden.device, teacher_valid, slot_mask, pad_mask)
        pred = self.projector(visual_hidden.reshape(b, v * h * w, self.student_dim))
        loss, metrics = masked_cosine_loss(pred, target, valid.reshape(b, v * h * w))
        metrics["align_loss"] = loss.detach()
        return loss, metrics
