"""VGGT's optional prediction heads, with the upstream module names (VGGT.md §4, §5.1, §5.2).

- `DPTHead`: dense head used as `depth_head` (`output_dim=2`, "exp") and `point_head`
  (`output_dim=4`, "inv_log"); returns a prediction map and a confidence map.
- `CameraHead`: iterative camera-token head returning one `absT_quaR_FoV` encoding per iteration.
- `pose_encoding_to_extrinsics_intrinsics`: turns a 9-value encoding into OpenCV cameras.

Both heads run in float32 with autocast disabled, as upstream does. The track head is not included.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from spatial_forcing.align.pos_embed import add_uv_pos_embed
from spatial_forcing.teachers.vggt.layers import Block, Mlp

POSE_ENCODING_DIM = 9  # translation (3) + quaternion XYZW (4) + FoV height/width (2)
PE_RATIO = 0.1  # weight of the UV sin-cos embedding added inside the DPT head
_INTERPOLATE_MAX_ELEMENTS = 1_610_612_736  # split bilinear resizes above this many output values


def inverse_log(x: torch.Tensor) -> torch.Tensor:
    """`sign(x) * (exp(|x|) - 1)`: the inverse of `sign(y) * log(1 + |y|)`."""
    return torch.sign(x) * torch.expm1(x.abs())


VALUE_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "exp": torch.exp,
    "inv_log": inverse_log,
    "linear": lambda x: x,
    "relu": F.relu,
    "sigmoid": torch.sigmoid,
}

CONF_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "expp1": lambda x: 1 + torch.exp(x),
    "expp0": torch.exp,
    "sigmoid": torch.sigmoid,
}


def _lookup(table: dict[str, Callable], name: str, kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; expected one of {sorted(table)}")
    return table[name]


def _resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with `align_corners=True`, split over the batch when the output is huge."""
    n_out = x.shape[0] * x.shape[1] * size[0] * size[1]
    if n_out <= _INTERPOLATE_MAX_ELEMENTS:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    chunks = x.chunk(n_out // _INTERPOLATE_MAX_ELEMENTS + 1, dim=0)
    return torch.cat([F.interpolate(c, size=size, mode="bilinear", align_corners=True) for c in chunks])


# --------------------------------------------------------------------------------------------
# DPT head
# --------------------------------------------------------------------------------------------


class ResidualConvUnit(nn.Module):
    """`r = ReLU(x); return conv2(ReLU(conv1(r))) + r`.

    Upstream applies an in-place ReLU to its input before the convolutions, which overwrites `x`,
    so its residual connection adds `ReLU(x)` rather than `x`. The trained weights expect that,
    so it is reproduced here on purpose.
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rectified = F.relu(x)
        return self.conv2(F.relu(self.conv1(rectified))) + rectified


class FeatureFusionBlock(nn.Module):
    """`y = x (+ RCU1(skip)) -> RCU2 -> bilinear resize (x2 by default) -> 1x1 out_conv`."""

    def __init__(self, features: int, has_skip: bool = True) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, kernel_size=1)
        if has_skip:
            self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None,
                size: tuple[int, int] | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if size is None:
            size = (x.shape[-2] * 2, x.shape[-1] * 2)
        return self.out_conv(_resize_bilinear(x, tuple(size)))


class DPTScratch(nn.Module):
    """Multi-scale fusion of the DPT head (`scratch.*`): 3x3 projections to `features` channels,
    four fusion blocks from coarse to fine, then `output_conv1`. `output_conv2` is applied by the head.
    """

    def __init__(self, in_channels: Sequence[int], features: int, output_dim: int,
                 hidden_features: int = 32) -> None:
        super().__init__()
        self.layer1_rn = nn.Conv2d(in_channels[0], features, kernel_size=3, padding=1, bias=False)
        self.layer2_rn = nn.Conv2d(in_channels[1], features, kernel_size=3, padding=1, bias=False)
        self.layer3_rn = nn.Conv2d(in_channels[2], features, kernel_size=3, padding=1, bias=False)
        self.layer4_rn = nn.Conv2d(in_channels[3], features, kernel_size=3, padding=1, bias=False)
        self.refinenet1 = FeatureFusionBlock(features)
        self.refinenet2 = FeatureFusionBlock(features)
        self.refinenet3 = FeatureFusionBlock(features)
        self.refinenet4 = FeatureFusionBlock(features, has_skip=False)
        self.output_conv1 = nn.Conv2d(features, features // 2, kernel_size=3, padding=1)
        self.output_conv2 = nn.Sequential(
            nn.Conv2d(features // 2, hidden_features, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden_features, output_dim, kernel_size=1),
        )

    def forward(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        """Fuse four maps (finest first) into one map at the finest level's size x2."""
        l1 = self.layer1_rn(levels[0])
        l2 = self.layer2_rn(levels[1])
        l3 = self.layer3_rn(levels[2])
        l4 = self.layer4_rn(levels[3])
        y = self.refinenet4(l4, size=l3.shape[-2:])
        y = self.refinenet3(y, l3, size=l2.shape[-2:])
        y = self.refinenet2(y, l2, size=l1.shape[-2:])
        y = self.refinenet1(y, l1)
        return self.output_conv1(y)


class DPTHead(nn.Module):
    """Dense prediction head over four aggregator layers (VGGT.md §5.2).

    The last output channel is the confidence (`conf_activation`); the others are the prediction
    (`activation`): depth uses `output_dim=2, "exp"`, world points `output_dim=4, "inv_log"`.
    """

    def __init__(
        self,
        dim_in: int,
        output_dim: int = 4,
        activation: str = "inv_log",
        conf_activation: str = "expp1",
        features: int = 256,
        out_channels: Sequence[int] = (256, 512, 1024, 1024),
        intermediate_layer_idx: Sequence[int] = (4, 11, 17, 23),
        patch_size: int = 14,
    ) -> None:
        super().__init__()
        if len(out_channels) != 4 or len(intermediate_layer_idx) != 4:
            raise ValueError("DPTHead needs exactly four out_channels and four intermediate_layer_idx")
        if output_dim < 2:
            raise ValueError(f"output_dim must be >= 2 (prediction + confidence), got {output_dim}")
        self.patch_size = patch_size
        self.intermediate_layer_idx = tuple(intermediate_layer_idx)
        self.activation = activation
        self.conf_activation = conf_activation
        self._act = _lookup(VALUE_ACTIVATIONS, activation, "activation")
        self._conf_act = _lookup(CONF_ACTIVATIONS, conf_activation, "conf_activation")

        self.norm = nn.LayerNorm(dim_in, eps=1e-5)
        self.projects = nn.ModuleList([nn.Conv2d(dim_in, oc, kernel_size=1) for oc in out_channels])
        c1, c2, _, c4 = out_channels
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(c1, c1, kernel_size=4, stride=4),  # x4
            nn.ConvTranspose2d(c2, c2, kernel_size=2, stride=2),  # x2
            nn.Identity(),  # x1
            nn.Conv2d(c4, c4, kernel_size=3, stride=2, padding=1),  # x1/2
        ])
        self.scratch = DPTScratch(out_channels, features, output_dim)

    def forward(
        self,
        tokens_list: Sequence[torch.Tensor],
        image_hw: tuple[int, int],
        patch_start_idx: int,
        frames_chunk_size: int | None = 8,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Map aggregator outputs (`[B, S, P, 2C]` per layer) to `pred [B, S, H, W, output_dim - 1]`
        and `conf [B, S, H, W]`.

        Frames are processed `frames_chunk_size` at a time (`None`: all at once) to bound memory;
        the result does not depend on it.
        """
        selected = [tokens_list[i][:, :, patch_start_idx:] for i in self.intermediate_layer_idx]
        num_frames = selected[0].shape[1]
        step = frames_chunk_size if frames_chunk_size else num_frames
        if step < 1:
            raise ValueError(f"frames_chunk_size must be positive, got {frames_chunk_size}")
        with torch.autocast(device_type=selected[0].device.type, enabled=False):
            chunks = [
                self._forward_frames([x[:, start:start + step].float() for x in selected], image_hw)
                for start in range(0, num_frames, step)
            ]
        if len(chunks) == 1:
            return chunks[0]
        return torch.cat([p for p, _ in chunks], dim=1), torch.cat([c for _, c in chunks], dim=1)

    def _forward_frames(self, levels: list[torch.Tensor],
                        image_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = image_hw
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        batch, frames, num_patches, dim = levels[0].shape
        if num_patches != grid_h * grid_w:
            raise ValueError(
                f"got {num_patches} patch tokens per frame, expected {grid_h}x{grid_w} for a "
                f"{height}x{width} image with patch size {self.patch_size}")
        aspect = width / height

        maps = []
        for project, resize, x in zip(self.projects, self.resize_layers, levels):
            x = self.norm(x.reshape(batch * frames, num_patches, dim))
            x = x.transpose(1, 2).reshape(batch * frames, dim, grid_h, grid_w)
            x = add_uv_pos_embed(project(x), ratio=PE_RATIO, aspect_ratio=aspect)
            maps.append(resize(x))

        out = self.scratch(maps)
        out = _resize_bilinear(out, (grid_h * self.patch_size, grid_w * self.patch_size))
        out = add_uv_pos_embed(out, ratio=PE_RATIO, aspect_ratio=aspect)
        out = self.scratch.output_conv2(out).permute(0, 2, 3, 1)  # channels last

        pred = self._act(out[..., :-1])
        conf = self._conf_act(out[..., -1])
        return pred.reshape(batch, frames, *pred.shape[1:]), conf.reshape(batch, frames, *conf.shape[1:])


# --------------------------------------------------------------------------------------------
# Camera head
# --------------------------------------------------------------------------------------------


def activate_pose(pose_enc: torch.Tensor) -> torch.Tensor:
    """Translation and quaternion stay linear; the two FoV values go through ReLU."""
    return torch.cat([pose_enc[..., :7], F.relu(pose_enc[..., 7:])], dim=-1)


class CameraHead(nn.Module):
    """Iterative camera head over each frame's camera token (VGGT.md §5.1).

    Every iteration embeds the current encoding (the learned `empty_pose_tokens` at first),
    modulates the normalised camera tokens with it (adaLN: shift, scale, gate), runs the trunk
    over the frames and adds the predicted delta to the encoding.
    """

    def __init__(
        self,
        dim_in: int = 2048,
        trunk_depth: int = 4,
        num_heads: int = 16,
        mlp_ratio: float = 4,
        init_values: float = 0.01,
        num_iterations: int = 4,
    ) -> None:
        super().__init__()
        self.num_iterations = num_iterations
        self.trunk = nn.Sequential(*[
            Block(dim_in, num_heads, mlp_ratio=mlp_ratio, qk_norm=False, norm_eps=1e-5, init_values=init_values)
            for _ in range(trunk_depth)
        ])
        self.token_norm = nn.LayerNorm(dim_in, eps=1e-5)
        self.trunk_norm = nn.LayerNorm(dim_in, eps=1e-5)
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, POSE_ENCODING_DIM))
        self.embed_pose = nn.Linear(POSE_ENCODING_DIM, dim_in)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim_in, 3 * dim_in))
        self.adaln_norm = nn.LayerNorm(dim_in, eps=1e-6, elementwise_affine=False)
        self.pose_branch = Mlp(dim_in, dim_in // 2, POSE_ENCODING_DIM)

    def forward(self, tokens_list: Sequence[torch.Tensor], num_iterations: int | None = None) -> list[torch.Tensor]:
        """Return the activated `[B, S, 9]` encoding of every iteration; the last is the final one.

        Uses the camera token (index 0) of the last aggregator output.
        """
        iterations = self.num_iterations if num_iterations is None else num_iterations
        camera_tokens = tokens_list[-1][:, :, 0]
        with torch.autocast(device_type=camera_tokens.device.type, enabled=False):
            tokens = self.token_norm(camera_tokens.float())
            batch, frames, _ = tokens.shape
            pred = None
            outputs = []
            for _ in range(iterations):
                if pred is None:
                    cond = self.embed_pose(self.empty_pose_tokens.expand(batch, frames, -1))
                else:
                    cond = self.embed_pose(pred.detach())  # no backprop through earlier iterations
                shift, scale, gate = self.poseLN_modulation(cond).chunk(3, dim=-1)
                x = gate * (self.adaln_norm(tokens) * (1 + scale) + shift) + tokens
                delta = self.pose_branch(self.trunk_norm(self.trunk(x)))
                pred = delta if pred is None else pred + delta
                outputs.append(activate_pose(pred))
        return outputs


# --------------------------------------------------------------------------------------------
# Pose encoding
# --------------------------------------------------------------------------------------------


def quaternion_to_matrix(quat: torch.Tensor) -> torch.Tensor:
    """Rotation matrices `(..., 3, 3)` from quaternions `(..., 4)` in XYZW (scalar-last) order.

    The quaternion need not be unit length: it is normalised implicitly.
    """
    x, y, z, w = quat.unbind(-1)
    s = 2.0 / (quat * quat).sum(-1)
    rows = (
        1 - s * (y * y + z * z), s * (x * y - z * w), s * (x * z + y * w),
        s * (x * y + z * w), 1 - s * (x * x + z * z), s * (y * z - x * w),
        s * (x * z - y * w), s * (y * z + x * w), 1 - s * (x * x + y * y),
    )
    return torch.stack(rows, dim=-1).reshape(*quat.shape[:-1], 3, 3)


def pose_encoding_to_extrinsics_intrinsics(
    pose_enc: torch.Tensor, image_hw: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode `absT_quaR_FoV` encodings `[..., 9]` into cameras.

    Returns extrinsics `[..., 3, 4]` = `[R | t]` (OpenCV, camera-from-world) and intrinsics
    `[..., 3, 3]` with `fx = (W/2)/tan(fov_w/2)`, `fy = (H/2)/tan(fov_h/2)` and the principal
    point at the image centre `(W/2, H/2)`.
    """
    if pose_enc.shape[-1] != POSE_ENCODING_DIM:
        raise ValueError(f"expected a pose encoding with {POSE_ENCODING_DIM} values, "
                         f"got shape {tuple(pose_enc.shape)}")
    height, width = image_hw
    translation, quat = pose_enc[..., :3], pose_enc[..., 3:7]
    fov_h, fov_w = pose_enc[..., 7], pose_enc[..., 8]
    extrinsics = torch.cat([quaternion_to_matrix(quat), translation[..., None]], dim=-1)

    intrinsics = pose_enc.new_zeros(*pose_enc.shape[:-1], 3, 3)
    intrinsics[..., 0, 0] = (width / 2.0) / torch.tan(fov_w / 2.0)
    intrinsics[..., 1, 1] = (height / 2.0) / torch.tan(fov_h / 2.0)
    intrinsics[..., 0, 2] = width / 2.0
    intrinsics[..., 1, 2] = height / 2.0
    intrinsics[..., 2, 2] = 1.0
    return extrinsics, intrinsics
