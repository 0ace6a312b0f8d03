"""`CNNConfig`: the compact convolutional student, every size explicit, with named presets."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

NORM_TYPES = ("bounds_q99", "bounds")


@dataclass
class CNNConfig:
    """A small convolutional visuomotor policy sized for CPU training.

    One encoder shared by every view: a stride-2 stem, then `len(channels) - 1` stages, each a
    stride-2 3x3 convolution followed by `blocks[i]` residual blocks, GroupNorm and SiLU throughout.
    Each stage output is modulated (FiLM) by the instruction embedding plus a learned view embedding.
    Layer `k` (the Spatial Forcing `student_layer`) is the output of the stem (k = 0) or of stage k: a
    grid of side `image_size / 2**(k+1)` with `channels[k]` features per cell, one grid per view.
    The last grid feeds a spatial softmax (`keypoints` expected image positions per view) and a global
    average; with the proprio state and the instruction they feed an MLP that regresses the whole
    normalised action chunk (L1), as OpenVLA-OFT's parallel decoding does.
    The instruction is read as UTF-8 bytes: an embedding, a width-3 convolution and max pooling.
    """

    image_size: int = 96
    num_images: int = 2
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    blocks: list[int] = field(default_factory=lambda: [0, 1, 1])  # residual blocks of each stage
    groups: int = 8
    text_dim: int = 64
    max_text_bytes: int = 128
    keypoints: int = 32
    head_hidden: int = 256
    head_layers: int = 2
    use_proprio: bool = True
    proprio_dim: int = 8
    action_dim: int = 7
    chunk_len: int = 8
    norm_type: str = "bounds_q99"
    center_crop: bool = True

    def __post_init__(self) -> None:
        problems = []
        self.channels = [int(c) for c in self.channels]
        if len(self.channels) < 2:
            problems.append(f"channels needs a stem and at least one stage, found {self.channels}")
        if any(c < 1 or c % self.groups for c in self.channels):
            problems.append(f"every width in channels {self.channels} must be a positive multiple of groups={self.groups}")
        stride = 2 ** len(self.channels)
        if self.image_size < stride or self.image_size % stride:
            problems.append(f"image_size {self.image_size} must be a multiple of {stride} "
                            f"(stem + {len(self.channels) - 1} stride-2 stages)")
        if self.norm_type not in NORM_TYPES:
            problems.append(f"norm_type must be one of {NORM_TYPES}, found {self.norm_type!r}")
        for name in ("num_images", "action_dim", "chunk_len", "text_dim", "keypoints", "head_hidden", "head_layers",
                     "max_text_bytes"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, found {getattr(self, name)}")
        if isinstance(self.blocks, int):
            self.blocks = [self.blocks] * (len(self.channels) - 1)
        self.blocks = [int(b) for b in self.blocks]
        if len(self.blocks) != len(self.channels) - 1 or min(self.blocks, default=0) < 0:
            problems.append(f"blocks: expected one count >= 0 per stage ({len(self.channels) - 1}), found {self.blocks}")
        if self.use_proprio and self.proprio_dim < 1:
            problems.append(f"use_proprio needs proprio_dim >= 1, found {self.proprio_dim}")
        if problems:
            raise ValueError("invalid CNNConfig: " + "; ".join(problems))

    @property
    def num_layers(self) -> int:
        return len(self.channels) - 1

    def grid_side(self, layer: int) -> int:
        return self.image_size // 2 ** (layer + 1)

    # presets and files ----------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "CNNConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown CNN preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CNNConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"model_type"})
        if unknown:
            raise ValueError(f"unknown CNNConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"model_type": "cnn", **self.to_dict()}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "CNNConfig":
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(d, dict) or d.get("model_type") != "cnn":
            raise ValueError(f"{path}: model_type is {d.get('model_type') if isinstance(d, dict) else d!r}, "
                             "expected 'cnn'")
        return cls.from_dict(d)


PRESETS: dict[str, dict] = {
    # The quickstart / study student: 2 views at 96 px + proprio, chunk 8 x 7 (LIBERO), ~0.7M parameters.
    "cnn": dict(),
    # The same at 128 px (one more stage keeps the last grid at 4 x 4).
    "cnn-128": dict(image_size=128, channels=[16, 32, 64, 128, 128], blocks=[1, 1, 1, 1]),
}
