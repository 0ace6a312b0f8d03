"""`AlignConfig`: every Spatial Forcing setting in one typed record (SPATIAL_FORCING.md §10)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

LOSS_TYPES = ("cosine",)
RESAMPLE_MODES = ("bilinear",)


@dataclass
class AlignConfig:
    """Spatial Forcing settings.

    student_layer: hidden-state index of the student, Hugging Face convention: 0 = embedding
        output, k = output of decoder block k, last = final-normed state; negative from the end.
        24 for OpenVLA-7B (24th of 32 blocks), 12 for pi0 (12th of 18).
    teacher_layer: block pair of the teacher (VGGT: 0..23, -1 = last).
    use_pos_embed / pos_embed_ratio: add `ratio * UV sin-cos` to the teacher grid before resampling.
    loss_type: only "cosine" (1 - cosine similarity, per-sample mean then batch mean).
    coeff: alpha in `loss = action_loss + alpha * align_loss`.
    projector_norm: LayerNorm on the student states before the projector MLP (upstream use_vlm_norm).
    resample: how the teacher grid is resized to the student grid (only "bilinear", align_corners=True).
    """

    student_layer: int = 24
    teacher_layer: int = -1
    use_pos_embed: bool = True
    pos_embed_ratio: float = 0.1
    loss_type: str = "cosine"
    coeff: float = 0.5
    projector_norm: bool = True
    resample: str = "bilinear"

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"AlignConfig.loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.resample not in RESAMPLE_MODES:
            raise ValueError(f"AlignConfig.resample must be one of {RESAMPLE_MODES}, got {self.resample!r}")
        for name in ("student_layer", "teacher_layer"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"AlignConfig.{name}: expected an integer layer index, found {value!r}")
        for name in ("use_pos_embed", "projector_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"AlignConfig.{name}: expected true or false, found {getattr(self, name)!r}")
        for name in ("coeff", "pos_embed_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"AlignConfig.{name}: expected a finite number >= 0, found {value!r}")

    @classmethod
    def preset(cls, name: str) -> "AlignConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown align preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AlignConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown AlignConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)


PRESETS: dict[str, dict] = {
    # openvla-SF finetune_align.py flags of the published LIBERO runs.
    "openvla-oft-sf": dict(student_layer=24, teacher_layer=-1, use_pos_embed=True, pos_embed_ratio=0.1,
                           loss_type="cosine", coeff=0.5, projector_norm=True),
    # openpi-SF pi0_align_aloha_place_block.
    "pi0-sf": dict(student_layer=12, teacher_layer=-1, use_pos_embed=True, pos_embed_ratio=0.1,
                   loss_type="cosine", coeff=0.5, projector_norm=True),
}
