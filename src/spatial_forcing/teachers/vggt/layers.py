"""Transformer building blocks of VGGT, with the upstream module names (VGGT.md §3.5, §3.6).

One `Block` serves the DINOv2 patch-embed blocks (eps 1e-6, no qk-norm, no RoPE), the
aggregator's frame/global blocks (eps 1e-5, qk-norm, 2-D RoPE) and the camera head's trunk.
State-dict names: norm1, attn.{qkv,q_norm,k_norm,proj}, ls1.gamma, norm2, mlp.{fc1,fc2}, ls2.gamma.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out_dim: int | None = None, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim or dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Rope2D:
    """2-D rotary position embedding (NeoX half rotation): y rotates the first half of each head,
    x the second half; `inv_freq[k] = 1 / base^(2k/F)` per half of width `F`.

    Tables are always built and applied in float32 (VGGT.md §3.6 precision pitfall); the rotated
    tensor is cast back to the input dtype. Position (0, 0) is the identity.
    """

    def __init__(self, base: float = 100.0) -> None:
        self.base = base

    def tables(self, positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for integer positions `(N, 2)` (y, x) -> two `(N, head_dim)` float32 tensors."""
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs a head width divisible by 4, got {head_dim}")
        half = head_dim // 2
        inv_freq = 1.0 / (self.base ** (torch.arange(0, half, 2, device=positions.device).float() / half))
        ang = positions.float()[..., None] * inv_freq  # (N, 2, half/2)
        ang = torch.cat([ang, ang], dim=-1)  # (N, 2, half): [y-angles, x-angles]
        ang = ang.reshape(positions.shape[0], head_dim)
        return ang.cos(), ang.sin()

    @staticmethod
    def apply(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate `t` `(..., N, head_dim)` with tables `(N, head_dim)`; each half rotates on its own."""
        tf = t.float()
        y, x = tf.chunk(2, dim=-1)
        y1, y2 = y.chunk(2, dim=-1)
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat([-y2, y1, -x2, x1], dim=-1)
        return (tf * cos + rotated * sin).to(t.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, qkv_bias: bool = True,
                 proj_bias: bool = True, norm_eps: float = 1e-5) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = Rope2D.apply(q, *rope), Rope2D.apply(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale: `x += ls1(attn(norm1 x)); x += ls2(mlp(norm2 x))`."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False,
                 norm_eps: float = 1e-5, init_values: float = 0.01) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qk_norm=qk_norm, norm_eps=1e-5)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))
