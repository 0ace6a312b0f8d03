"""VGGT's aggregator: a DINOv2 ViT-L/14-reg patch embed followed by alternating frame/global
attention (VGGT.md §3). Module names mirror the upstream state dict (`aggregator.*`)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .config import VGGTConfig
from .layers import Block, Rope2D

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, h*w, dim), row-major


class DinoV2(nn.Module):
    """DINOv2 ViT with registers as VGGT embeds patches: tokens `[cls, reg x R, patches]`,
    LayerNorm eps 1e-6, LayerScale, no RoPE; returns the final-normed patch tokens."""

    def __init__(self, cfg: VGGTConfig) -> None:
        super().__init__()
        dim, grid = cfg.embed_dim, cfg.grid_size
        self.patch_size = cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim), requires_grad=False)  # unused, kept for the keys
        self.blocks = nn.ModuleList(
            Block(dim, cfg.patch_embed_heads, cfg.mlp_ratio, qk_norm=False, norm_eps=1e-6, init_values=1.0)
            for _ in range(cfg.patch_embed_depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.normal_(self.register_tokens, std=1e-6)

    def position_table(self, h: int, w: int) -> torch.Tensor:
        """`pos_embed` for an `h x w` patch grid: as stored for the native square grid, else the
        patch part resized bicubic with antialias in float32 (cls entry unchanged)."""
        n = self.pos_embed.shape[1] - 1
        if h * w == n and h == w:
            return self.pos_embed
        side = int(n ** 0.5)
        table = self.pos_embed.float()
        patch = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, size=(h, w), mode="bicubic", antialias=True)
        patch = patch.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([table[:, :1], patch], dim=1).to(self.pos_embed.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, height, width = x.shape
        h, w = height // self.patch_size, width // self.patch_size
        tokens = torch.cat([self.cls_token.expand(n, -1, -1), self.patch_embed(x)], dim=1)
        tokens = tokens + self.position_table(h, w).to(tokens.dtype)
        tokens = torch.cat([tokens[:, :1], self.register_tokens.expand(n, -1, -1), tokens[:, 1:]], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 1 + self.register_tokens.shape[1]:]


def _first_and_rest(token: torch.Tensor, b: int, s: int) -> torch.Tensor:
    """`(1, 2, X, C)` -> `(b*s, X, C)`: index 0 for frame 0 of each batch element, index 1 for the rest."""
    first = token[:, :1].expand(b, 1, *token.shape[2:])
    rest = token[:, 1:].expand(b, s - 1, *token.shape[2:])
    return torch.cat([first, rest], dim=1).reshape(b * s, *token.shape[2:])


class Aggregator(nn.Module):
    """Alternating-attention trunk. `forward` returns one `[B, S, P, 2C]` tensor per block pair
    (frame half ‖ global half, no final norm); `P = 5 + h*w`, patches from `patch_start_idx`."""

    def __init__(self, cfg: VGGTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_size = cfg.patch_size
        self.patch_start_idx = cfg.patch_start_idx
        self.patch_embed = DinoV2(cfg)
        self.rope = Rope2D(cfg.rope_freq)

        def make_block() -> Block:
            return Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, qk_norm=True, norm_eps=1e-5, init_values=0.01)

        self.frame_blocks = nn.ModuleList(make_block() for _ in range(cfg.depth))
        self.global_blocks = nn.ModuleList(make_block() for _ in range(cfg.depth))
        self.camera_token = nn.Parameter(torch.randn(1, 2, 1, cfg.embed_dim) * 1e-6)
        self.register_token = nn.Parameter(torch.randn(1, 2, cfg.num_register_tokens, cfg.embed_dim) * 1e-6)
        self.register_buffer("_resnet_mean", torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("_resnet_std", torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1), persistent=False)

    def positions(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """Integer (y, x) per token of one frame: specials (0, 0), patch (r, c) -> (r+1, c+1)."""
        rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        patch = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=-1) + 1
        special = torch.zeros(self.patch_start_idx, 2, dtype=patch.dtype, device=device)
        return torch.cat([special, patch], dim=0)

    def forward(self, images: torch.Tensor, layers: Iterable[int] | None = None) -> list[torch.Tensor | None]:
        """images `[B, S, 3, H, W]` in [0, 1], H and W multiples of the patch size.

        `layers`: indices of the block pairs to return (negative allowed); the others are None and
        blocks after the last requested one are not run. Default: all.
        """
        b, s, c, height, width = images.shape
        if c != 3 or height % self.patch_size or width % self.patch_size:
            raise ValueError(f"aggregator input must be [B,S,3,H,W] with H, W multiples of {self.patch_size}, "
                             f"got {tuple(images.shape)}")
        depth = len(self.frame_blocks)
        wanted = set(range(depth)) if layers is None else {i % depth for i in layers}
        last = max(wanted) if wanted else -1
        h, w = height // self.patch_size, width // self.patch_size

        x = ((images - self._resnet_mean) / self._resnet_std).reshape(b * s, c, height, width)
        patches = self.patch_embed(x)
        tokens = torch.cat([_first_and_rest(self.camera_token, b, s), _first_and_rest(self.register_token, b, s),
                            patches], dim=1)
        p, dim = tokens.shape[1], tokens.shape[2]
        cos, sin = self.rope.tables(self.positions(h, w, images.device), dim // self.cfg.num_heads)
        frame_rope = (cos, sin)
        global_rope = (cos.repeat(s, 1), sin.repeat(s, 1))

        outputs: list[torch.Tensor | None] = [None] * depth
        for i in range(last + 1):
            tokens = self.frame_blocks[i](tokens.reshape(b * s, p, dim), frame_rope)
            frame_out = tokens.reshape(b, s, p, dim)
            tokens = self.global_blocks[i](tokens.reshape(b, s * p, dim), global_rope)
            if i in wanted:
                outputs[i] = torch.cat([frame_out, tokens.reshape(b, s, p, dim)], dim=-1)
        return outputs
