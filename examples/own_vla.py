"""Spatial Forcing in your own VLA (docs/own-vla.md): a toy policy that follows the student protocol,
the weight-free geometry teacher, and the SF module in a plain training loop. Runs on a CPU in seconds.

    python examples/own_vla.py
"""

import torch
import torch.nn.functional as F
from torch import nn

from spatial_forcing.align import AlignConfig, SpatialForcing
from spatial_forcing.policies.base import PolicyOutput
from spatial_forcing.teachers import build_teacher


class TinyVLA(nn.Module):
    """Your policy. The one thing SF needs: at `align_layer`, return the visual tokens as a per-view
    grid `[B, V, h, w, D]` (`PolicyOutput.visual_hidden`)."""

    def __init__(self, dim: int = 64, patch: int = 14, layers: int = 4, action_dim: int = 7) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(dim, 4, 4 * dim, batch_first=True) for _ in range(layers))
        self.head = nn.Linear(dim, action_dim)

    def forward(self, batch: dict, align_layer: int | None = None) -> PolicyOutput:
        b, v = batch["images"].shape[:2]
        x = self.embed(batch["images"].flatten(0, 1))  # [B*V, D, g, g]
        g = x.shape[-1]
        x = x.flatten(2).transpose(1, 2).reshape(b, v * g * g, -1)  # view-major, row-major tokens
        visual = None
        for i, block in enumerate(self.blocks, start=1):
            x = block(x)
            if i == align_layer:
                visual = x.reshape(b, v, g, g, -1)
        loss = F.l1_loss(self.head(x.mean(1)), batch["actions"])
        return PolicyOutput(action_loss=loss, metrics={}, visual_hidden=visual)


def synthetic_batch(b: int = 8, v: int = 2, size: int = 56) -> dict:
    """RGB-D views of a box floating in front of a wall; actions point at the box."""
    depth = torch.full((b, v, size, size), 2.0)
    centre = torch.randint(8, size - 8, (b, 2))
    for i, (y, x) in enumerate(centre.tolist()):
        depth[i, :, y - 6:y + 6, x - 6:x + 6] = 1.0
    k = torch.tensor([[50.0, 0, size / 2], [0, 50.0, size / 2], [0, 0, 1]]).expand(b, v, 3, 3)
    images = (1.0 / depth)[:, :, None].expand(b, v, 3, size, size).clone()
    actions = torch.cat([centre.float() / size, torch.zeros(b, 5)], 1)
    return {"images": images, "depth": depth, "intrinsics": k, "actions": actions}


def main(steps: int = 30) -> dict:
    torch.manual_seed(0)
    policy = TinyVLA()
    teacher = build_teacher("geometry", patch_size=14).freeze()  # no weights: features from depth + intrinsics
    sf = SpatialForcing(AlignConfig(student_layer=2, use_pos_embed=False), student_dim=64, teacher_dim=teacher.dim)
    optimizer = torch.optim.AdamW(list(policy.parameters()) + list(sf.parameters()), lr=1e-3)
    history = []
    for _ in range(steps):
        batch = synthetic_batch()
        out = policy(batch, align_layer=sf.config.student_layer)
        with torch.no_grad():
            grid = teacher.features(batch["images"], depth=batch["depth"], intrinsics=batch["intrinsics"])
        align_loss, metrics = sf(out.visual_hidden, grid.feats, grid.valid)
        loss = out.action_loss + sf.config.coeff * align_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append((out.action_loss.item(), align_loss.item()))
    print(f"action loss {history[0][0]:.3f} -> {history[-1][0]:.3f}, align loss {history[0][1]:.3f} -> {history[-1][1]:.3f}")
    return {"first": history[0], "last": history[-1]}


if __name__ == "__main__":
    main()
