"""The student protocol shared by every policy family.

    policy(batch, align_layer=k) -> PolicyOutput(action_loss, metrics, visual_hidden [B,V,h,w,D] | None)
    policy.predict_action_chunk(observation) -> actions [T, A] in robot units

The policy owns its token layout: `visual_hidden` is already a per-view grid, so the Spatial
Forcing module never sees sequence offsets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PolicyOutput:
    action_loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    visual_hidden: torch.Tensor | None = None
    actions: torch.Tensor | None = None  # normalised predictions [B, T, A]
