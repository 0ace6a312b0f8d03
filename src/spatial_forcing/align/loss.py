"""The masked cosine alignment loss (SPATIAL_FORCING.md §8)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_cosine_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None,
                       eps: float = 1e-12) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`1 - cos` averaged over each sample's valid tokens, then over the samples that have any.

    pred, target: `[B, T, D]` (computed in float32); valid: `[B, T]` bool or None (all valid).
    A sample with no valid token contributes nothing; with none anywhere the loss is an exact 0
    that is still connected to `pred` (finite, zero gradients). Also returns metrics:
    `cos_sim` (mean over valid tokens) and `valid_frac`.
    """
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(f"pred and target must both be [B,T,D], got {tuple(pred.shape)} and {tuple(target.shape)}")
    b, t, _ = pred.shape
    if valid is None:
        valid = torch.ones(b, t, dtype=torch.bool, device=pred.device)
    elif tuple(valid.shape) != (b, t):
        raise ValueError(f"valid must be [B={b}, T={t}], got {tuple(valid.shape)}")
    cos = (F.normalize(pred.float(), dim=-1, eps=eps) * F.normalize(target.float(), dim=-1, eps=eps)).sum(-1)
    w = valid.float()
    count = w.sum(1)  # valid tokens per sample
    has = count > 0
    per_sample = 1.0 - (cos * w).sum(1) / count.clamp(min=1.0)
    n = has.sum()
    loss = torch.where(has, per_sample, torch.zeros_like(per_sample)).sum() / n.clamp(min=1)
    metrics = {
        "cos_sim": ((cos * w).sum() / w.sum().clamp(min=1.0)).detach(),
        "valid_frac": w.mean().detach(),
    }
    return loss, metrics
