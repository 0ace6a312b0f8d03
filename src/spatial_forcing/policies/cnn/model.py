"""The compact convolutional student (`CNNConfig`): FiLM-conditioned conv encoder shared by the views,
spatial-softmax keypoints, an MLP that regresses the normalised action chunk (L1).

    inputs = {"pixels": [B,V,3,S,S] in [0, 1], "text_ids": [B,L] int64 (0 = pad), "proprio": [B,P],
              "actions": [B,K,A] (training)}
    model(inputs, align_layer=k) -> PolicyOutput(action_loss, metrics, visual_hidden [B,V,h,w,C_k], actions)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..base import PolicyOutput
from .config import CNNConfig


def conv_norm(cin: int, cout: int, stride: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.GroupNorm(groups, cout))


class ResBlock(nn.Module):
    def __init__(self, width: int, groups: int) -> None:
        super().__init__()
        self.conv1 = conv_norm(width, width, 1, groups)
        self.conv2 = conv_norm(width, width, 1, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x + self.conv2(F.silu(self.conv1(x))))


class Stage(nn.Module):
    """Stride-2 conv + residual blocks, then FiLM `x (1 + scale(c)) + shift(c)` and SiLU."""

    def __init__(self, cin: int, cout: int, blocks: int, groups: int, context_dim: int) -> None:
        super().__init__()
        self.down = conv_norm(cin, cout, 2, groups)
        self.blocks = nn.ModuleList(ResBlock(cout, groups) for _ in range(blocks))
        self.film = nn.Linear(context_dim, 2 * cout)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.down(x))
        for block in self.blocks:
            x = block(x)
        scale, shift = self.film(context)[:, :, None, None].chunk(2, dim=1)
        return F.silu(x * (1 + scale) + shift)


class TextEncoder(nn.Module):
    """UTF-8 bytes -> embedding -> width-3 convolution -> max over the real bytes -> `text_dim`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(257, dim, padding_idx=0)  # byte b is id b + 1; 0 pads
        self.conv = nn.Conv1d(dim, dim, 3, padding=1)
        self.out = nn.Linear(dim, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv(self.embed(ids).transpose(1, 2)))  # [B, D, L]
        h = h.masked_fill((ids == 0)[:, None], float("-inf")).amax(dim=2)
        return self.out(h)


def spatial_softmax(features: torch.Tensor) -> torch.Tensor:
    """`[N, K, h, w]` -> expected `(x, y)` in [-1, 1] of each channel's softmax over positions `[N, K, 2]`."""
    n, k, h, w = features.shape
    attn = features.flatten(2).softmax(dim=-1).reshape(n, k, h, w)
    ys = torch.linspace(-1, 1, h, device=features.device, dtype=attn.dtype)
    xs = torch.linspace(-1, 1, w, device=features.device, dtype=attn.dtype)
    return torch.stack([(attn.sum(2) * xs).sum(-1), (attn.sum(3) * ys).sum(-1)], dim=-1)


class CNNModel(nn.Module):
    def __init__(self, config: CNNConfig) -> None:
        super().__init__()
        self.config = config
        c, ctx = config.channels, config.text_dim
        self.text = TextEncoder(ctx)
        self.view_embed = nn.Parameter(torch.zeros(config.num_images, ctx))
        self.stem = nn.Sequential(nn.Conv2d(3, c[0], 3, stride=2, padding=1, bias=False), nn.GroupNorm(config.groups, c[0]),
                                  nn.SiLU())
        self.stages = nn.ModuleList(Stage(c[i], c[i + 1], config.blocks[i], config.groups, ctx) for i in range(len(c) - 1))
        self.keypoint_conv = nn.Conv2d(c[-1], config.keypoints, 1)
        width = config.num_images * (2 * config.keypoints + c[-1]) + ctx
        width += config.proprio_dim if config.use_proprio else 0
        layers: list[nn.Module] = []
        for _ in range(config.head_layers):
            layers += [nn.Linear(width, config.head_hidden), nn.LayerNorm(config.head_hidden), nn.SiLU()]
            width = config.head_hidden
        layers.append(nn.Linear(width, config.chunk_len * config.action_dim))
        self.head = nn.Sequential(*layers)

    def encode(self, pixels: torch.Tensor, text: torch.Tensor) -> list[torch.Tensor]:
        """Views `[B,V,3,S,S]` in [0, 1] -> the grid of every layer, `[B*V, C_k, h_k, w_k]` (layer 0 = stem)."""
        b, v = pixels.shape[:2]
        x = (pixels.reshape(b * v, *pixels.shape[2:]) - 0.5) / 0.5
        context = (text[:, None] + self.view_embed[None, :v]).reshape(b * v, -1)
        grids = [self.stem(x)]
        for stage in self.stages:
            grids.append(stage(grids[-1], context))
        return grids

    def predict_chunk(self, inputs: dict, align_layer: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised action chunks `[B,K,A]` and, if asked, the visual grid of `align_layer`."""
        pixels = inputs["pixels"]
        b, v = pixels.shape[:2]
        text = self.text(inputs["text_ids"])
        grids = self.encode(pixels, text)
        last = grids[-1]
        keypoints = spatial_softmax(self.keypoint_conv(last)).reshape(b, -1)
        pooled = last.mean(dim=(2, 3)).reshape(b, -1)
        parts = [keypoints, pooled, text]
        if self.config.use_proprio:
            parts.append(inputs["proprio"].to(last.dtype))
        chunk = self.head(torch.cat(parts, dim=-1)).reshape(b, self.config.chunk_len, self.config.action_dim)
        visual = None
        if align_layer is not None:
            g = grids[align_layer]
            visual = g.reshape(b, v, *g.shape[1:]).permute(0, 1, 3, 4, 2)  # [B, V, h, w, C]
        return chunk, visual

    def forward(self, inputs: dict, align_layer: int | None = None) -> PolicyOutput:
        pred, visual = self.predict_chunk(inputs, align_layer)
        target = inputs["actions"].to(pred.dtype)
        err = (pred - target).abs()
        metrics = {"action_loss": err.mean().detach(), "l1_current": err[:, 0].mean().detach(),
                   "l1_future": err[:, 1:].mean().detach() if err.shape[1] > 1 else err[:, 0].mean().detach()}
        return PolicyOutput(action_loss=err.mean(), metrics=metrics, visual_hidden=visual, actions=pred.detach())

    @torch.no_grad()
    def predict_normalized(self, inputs: dict) -> torch.Tensor:
        return self.predict_chunk(inputs)[0]
