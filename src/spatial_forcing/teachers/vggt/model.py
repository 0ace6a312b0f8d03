"""VGGT: the aggregator plus optional camera/depth/point heads, loadable from `facebook/VGGT-1B`."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .aggregator import Aggregator
from .config import VGGTConfig, config_from_state_dict
from .heads import CameraHead, DPTHead
from .weights import LoadReport, load_strict, read_state_dict, resolve_weights


class VGGT(nn.Module):
    """Attributes and state-dict names as upstream: `aggregator`, `camera_head`, `depth_head`,
    `point_head` (the last three only when enabled in the config; no track head)."""

    def __init__(self, cfg: VGGTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.aggregator = Aggregator(cfg)
        dim_in = cfg.feature_dim
        dpt = dict(features=cfg.dpt_features, out_channels=cfg.dpt_out_channels,
                   intermediate_layer_idx=cfg.dpt_layers, patch_size=cfg.patch_size)
        self.camera_head = (CameraHead(dim_in, trunk_depth=cfg.camera_trunk_depth, num_heads=cfg.camera_heads)
                            if cfg.enable_camera else None)
        self.depth_head = DPTHead(dim_in, 2, "exp", "expp1", **dpt) if cfg.enable_depth else None
        self.point_head = DPTHead(dim_in, 4, "inv_log", "expp1", **dpt) if cfg.enable_point else None
        self.load_report: LoadReport | None = None

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images `[B, S, 3, H, W]` (or `[S, 3, H, W]`) in [0, 1] at a multiple of the patch size.

        Returns `features` (list of all aggregator outputs) and whatever the enabled heads predict:
        `pose_enc [B,S,9]`, `depth [B,S,H,W,1]` + `depth_conf`, `world_points [B,S,H,W,3]` + conf.
        """
        if images.ndim == 4:
            images = images[None]
        features = self.aggregator(images)
        out: dict = {"features": features, "patch_start_idx": self.aggregator.patch_start_idx}
        hw = images.shape[-2:]
        if self.camera_head is not None:
            out["pose_enc_list"] = self.camera_head(features)
            out["pose_enc"] = out["pose_enc_list"][-1]
        if self.depth_head is not None:
            out["depth"], out["depth_conf"] = self.depth_head(features, hw, self.aggregator.patch_start_idx)
        if self.point_head is not None:
            out["world_points"], out["world_points_conf"] = self.point_head(features, hw, self.aggregator.patch_start_idx)
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path, config: VGGTConfig | None = None,
                        heads: tuple[str, ...] = ()) -> "VGGT":
        """Load weights from `model.pt`, a `.safetensors` file or a folder, strictly.

        The architecture comes from `config`, else from a `config.json` next to the weights, else
        from the tensor shapes. `heads` picks which of camera/depth/point to build (default none);
        the keys of the heads not built are skipped on purpose and reported in `load_report`.
        """
        weights, cfg_file = resolve_weights(path)
        sd = read_state_dict(weights)
        switches = {f"enable_{h}": (h in heads) for h in ("camera", "depth", "point")}
        unknown = sorted(set(heads) - {"camera", "depth", "point"})
        if unknown:
            raise ValueError(f"unknown VGGT heads {unknown}; choose from camera, depth, point")
        if config is None:
            if cfg_file is not None:
                config = VGGTConfig.from_dict({**VGGTConfig.load(cfg_file).to_dict(), **switches})
            else:
                config = config_from_state_dict(sd, **switches)
        model = cls(config)
        model.load_report = load_strict(model, sd, config.skipped_head_prefixes(), source=str(weights))
        return model.eval()

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write `model.safetensors` (upstream key names) and `config.json`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / "model.safetensors"))
        self.config.save(folder / "config.json")
        return folder
