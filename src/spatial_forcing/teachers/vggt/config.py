"""VGGT configuration with named presets, and inference of the architecture from a state dict."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

HEAD_NAMES = ("camera", "depth", "point", "track")


@dataclass
class VGGTConfig:
    """Architecture of VGGT (defaults = VGGT-1B, VGGT.md §3.1).

    `img_size` is the working resolution (long side) and sets the size of the DINOv2 position
    table, `(img_size / patch_size)^2 + 1` entries. Head switches choose which heads are built;
    the track head is never built (its keys are skipped on load).
    """

    img_size: int = 518
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    rope_freq: float = 100.0
    patch_embed_depth: int = 24
    patch_embed_heads: int = 16
    enable_camera: bool = False
    enable_depth: bool = False
    enable_point: bool = False
    dpt_features: int = 256
    dpt_out_channels: tuple[int, int, int, int] = (256, 512, 1024, 1024)
    dpt_layers: tuple[int, int, int, int] = (4, 11, 17, 23)
    camera_trunk_depth: int = 4
    camera_heads: int = 16

    def __post_init__(self) -> None:
        self.dpt_out_channels = tuple(int(c) for c in self.dpt_out_channels)
        self.dpt_layers = tuple(int(i) for i in self.dpt_layers)
        problems = []
        if self.img_size % self.patch_size:
            problems.append(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 4:
            problems.append(f"embed_dim {self.embed_dim} / num_heads {self.num_heads} must give a head width "
                            "divisible by 4 (2-D RoPE)")
        if self.embed_dim % self.patch_embed_heads:
            problems.append(f"embed_dim {self.embed_dim} is not divisible by patch_embed_heads {self.patch_embed_heads}")
        if (self.enable_depth or self.enable_point) and any(not 0 <= i < self.depth for i in self.dpt_layers):
            problems.append(f"dpt_layers {self.dpt_layers} must lie in [0, {self.depth})")
        if problems:
            raise ValueError("invalid VGGTConfig: " + "; ".join(problems))

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def feature_dim(self) -> int:
        """Width of every aggregator output: frame half + global half."""
        return 2 * self.embed_dim

    @property
    def patch_start_idx(self) -> int:
        """Camera token + registers precede the patch tokens of each frame."""
        return 1 + self.num_register_tokens

    def skipped_head_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of the heads this config does not build (skipped on load, on purpose)."""
        built = {"camera": self.enable_camera, "depth": self.enable_depth, "point": self.enable_point, "track": False}
        return tuple(f"{name}_head." for name in HEAD_NAMES if not built[name])

    @classmethod
    def preset(cls, name: str, **overrides) -> "VGGTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown VGGT preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dpt_out_channels"] = list(self.dpt_out_channels)
        d["dpt_layers"] = list(self.dpt_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VGGTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"model_type"})
        if unknown:
            raise ValueError(f"unknown VGGT config keys {unknown}; known keys: {sorted(known)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"model_type": "vggt", **self.to_dict()}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "VGGTConfig":
        d = json.loads(Path(path).read_text())
        if d.get("model_type", "vggt") != "vggt":
            raise ValueError(f"{path}: model_type is {d.get('model_type')!r}, expected 'vggt'")
        return cls.from_dict(d)


PRESETS: dict[str, dict] = {
    "vggt-1b": {},
    # Same classes, tiny widths: for tests and CPU benchmarks. Keeps the 518 px / 37x37 layout.
    "tiny": dict(embed_dim=32, depth=2, num_heads=2, patch_embed_depth=2, patch_embed_heads=2,
                 dpt_features=16, dpt_out_channels=(8, 16, 32, 32), dpt_layers=(0, 0, 1, 1),
                 camera_trunk_depth=1, camera_heads=2),
}


_BLOCK = re.compile(r"^aggregator\.(frame_blocks|global_blocks|patch_embed\.blocks)\.(\d+)\.")


def config_from_state_dict(sd: dict, **overrides) -> VGGTConfig:
    """Infer the architecture from tensor shapes.

    The aggregator's head count comes from the qk-norm width (64 at 1B); the DINOv2 blocks have
    no qk-norm, so they are assumed to use the same head count (true for VGGT-1B). Head switches
    follow the keys present unless overridden. DPT layer indices and the camera head's head count
    are not stored in a state dict: the 1B values are assumed for the 1B shape; other shapes need
    a config.json next to the weights (our `save_pretrained` writes one).
    """
    need = ["aggregator.camera_token", "aggregator.register_token", "aggregator.patch_embed.pos_embed",
            "aggregator.patch_embed.patch_embed.proj.weight", "aggregator.frame_blocks.0.attn.q_norm.weight",
            "aggregator.frame_blocks.0.mlp.fc1.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        example = ", ".join(list(sd)[:5]) or "(no keys)"
        raise ValueError(f"not a VGGT checkpoint: missing {missing}; the file's first keys are: {example}")
    embed_dim = sd["aggregator.camera_token"].shape[-1]
    patch = sd["aggregator.patch_embed.patch_embed.proj.weight"].shape[-1]
    n_pos = sd["aggregator.patch_embed.pos_embed"].shape[1] - 1
    side = math.isqrt(n_pos)
    if side * side != n_pos:
        raise ValueError(f"aggregator.patch_embed.pos_embed has {n_pos} patch entries, expected a square number")
    head_dim = sd["aggregator.frame_blocks.0.attn.q_norm.weight"].shape[0]
    depths = {}
    for key in sd:
        m = _BLOCK.match(key)
        if m:
            depths[m.group(1)] = max(depths.get(m.group(1), 0), int(m.group(2)) + 1)
    d = dict(img_size=side * patch, patch_size=patch, embed_dim=embed_dim, depth=depths.get("frame_blocks", 0),
             num_heads=embed_dim // head_dim, mlp_ratio=sd["aggregator.frame_blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
             num_register_tokens=sd["aggregator.register_token"].shape[2],
             patch_embed_depth=depths.get("patch_embed.blocks", 0), patch_embed_heads=embed_dim // head_dim)
    for name in ("camera", "depth", "point"):
        d[f"enable_{name}"] = any(k.startswith(f"{name}_head.") for k in sd)
    if "depth_head.scratch.layer1_rn.weight" in sd or "point_head.scratch.layer1_rn.weight" in sd:
        pre = "depth_head" if "depth_head.scratch.layer1_rn.weight" in sd else "point_head"
        d["dpt_features"] = sd[f"{pre}.scratch.layer1_rn.weight"].shape[0]
        d["dpt_out_channels"] = tuple(sd[f"{pre}.projects.{i}.weight"].shape[0] for i in range(4))
    if "camera_head.trunk.0.norm1.weight" in sd:
        d["camera_trunk_depth"] = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("camera_head.trunk."))
    d.update(overrides)
    if d["depth"] != depths.get("global_blocks", 0):
        raise ValueError(f"not a VGGT checkpoint: {d['depth']} frame blocks but {depths.get('global_blocks', 0)} "
                         "global blocks (they must be equal)")
    wants_dpt = d.get("enable_depth") or d.get("enable_point")
    if wants_dpt and "dpt_layers" not in overrides and d["depth"] != 24:
        raise ValueError(f"a {d['depth']}-block VGGT with depth/point heads needs its dpt_layers from a config.json "
                         "next to the weights (only the 24-block default (4, 11, 17, 23) can be assumed)")
    if d.get("enable_camera") and "camera_heads" not in overrides and d["embed_dim"] != 1024:
        raise ValueError("a VGGT whose width is not 1024 with a camera head needs camera_heads from a config.json "
                         "next to the weights (a head count cannot be read from tensor shapes)")
    return VGGTConfig(**d)


