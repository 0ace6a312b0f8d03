"""The trainable projector from student width to teacher width (SPATIAL_FORCING.md §7).

Names `vlm_norm`, `fc1`, `fc2` are those of upstream `AlignProjector`, so a published
`align_projector--*.pt` (after stripping DDP's `module.` prefix) loads strictly.
"""

from __future__ import annotations

import torch
from torch import nn


class AlignProjector(nn.Module):
    """`[LayerNorm(D_s), eps 1e-5]` -> Linear(D_s -> D_t) -> GELU (erf) -> Linear(D_t -> D_t).

    Xavier-uniform weights, zero biases, LayerNorm gamma 1 / beta 0.
    """

    def __init__(self, student_dim: int, teacher_dim: int, use_norm: bool = True) -> None:
        super().__init__()
        self.vlm_norm = nn.LayerNorm(student_dim, eps=1e-5) if use_norm else None
        self.fc1 = nn.Linear(student_dim, teacher_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(teacher_dim, teacher_dim)
        for linear in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.vlm_norm is not None:
            x = self.vlm_norm(x)
        return self.fc2(self.act(self.fc1(x)))

    def load_upstream_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Strictly load an openvla-SF `align_projector` state dict (DDP `module.` prefix allowed)."""
        stripped = {k.removeprefix("module."): v for k, v in sd.items()}
        self.load_state_dict(stripped, strict=True)
