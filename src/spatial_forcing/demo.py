"""`sf demo`: the smallest end-to-end Spatial Forcing run, on synthetic RGB-D scenes (CPU, ~1 min).

A tiny ViT student sees two camera views of random spheres on a checkered floor. Its visual
tokens at one layer are pulled toward the geometry teacher's features (from the rendered depth)
through the real `SpatialForcing` module. A ridge probe from those tokens to per-patch depth
on held-out scenes shows whether the tokens became spatially aware. (The quickstart, with LIBERO
demonstrations and a policy, replaces this demo.)
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .align import AlignConfig, SpatialForcing
from .teachers.geometry import GeometryConfig, GeometryTeacher


def _look_at(eye: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Camera-to-world 4x4 in OpenCV axes (x right, y down, z forward), world z up."""
    fwd = F.normalize(target - eye, dim=0)
    right = F.normalize(torch.linalg.cross(fwd, torch.tensor([0.0, 0.0, 1.0])), dim=0)
    down = torch.linalg.cross(fwd, right)
    c2w = torch.eye(4)
    c2w[:3, :3] = torch.stack([right, down, fwd], dim=1)
    c2w[:3, 3] = eye
    return c2w


def render_scenes(n: int, views: int = 2, size: int = 56, seed: int = 0) -> dict[str, torch.Tensor]:
    """Ray-cast `n` scenes of 1-3 spheres on the floor z = 0, seen by `views` cameras.

    Returns images `[n,V,3,S,S]` in [0,1], depth `[n,V,S,S]` (metres along the optical axis),
    intrinsics `[n,V,3,3]`, extrinsics `[n,V,4,4]` (camera-to-world).
    """
    g = torch.Generator().manual_seed(seed)
    focal = size / (2 * math.tan(math.radians(30)))  # 60 degree field of view
    k = torch.tensor([[focal, 0, (size - 1) / 2], [0, focal, (size - 1) / 2], [0, 0, 1.0]])
    v_, u_ = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    rays_cam = torch.stack([(u_ - k[0, 2]) / focal, (v_ - k[1, 2]) / focal, torch.ones_like(u_)], -1)  # z = 1
    out = {key: [] for key in ("images", "depth", "intrinsics", "extrinsics")}
    light = F.normalize(torch.tensor([0.4, -0.3, 1.0]), dim=0)
    for _ in range(n):
        count = int(torch.randint(1, 4, (1,), generator=g))
        centres_xy = (torch.rand(count, 2, generator=g) - 0.5) * 1.6
        radii = 0.15 + 0.25 * torch.rand(count, generator=g)
        centres = torch.cat([centres_xy, radii[:, None]], dim=1)  # resting on the floor
        albedo = 0.2 + 0.8 * torch.rand(count, 3, generator=g)
        scene = {key: [] for key in out}
        for view in range(views):
            angle = 2 * math.pi * (view / views) + float(torch.rand(1, generator=g)) * 0.6
            dist = 2.4 + 0.6 * float(torch.rand(1, generator=g))
            eye = torch.tensor([dist * math.cos(angle), dist * math.sin(angle), 1.2 + 0.6 * float(torch.rand(1, generator=g))])
            c2w = _look_at(eye, torch.tensor([0.0, 0.0, 0.2]))
            dirs = rays_cam @ c2w[:3, :3].T  # world directions with unit optical-axis component
            t_floor = torch.where(dirs[..., 2] < -1e-6, -eye[2] / dirs[..., 2], torch.full_like(u_, float("inf")))
            t_best, hit_id = t_floor, torch.full_like(u_, -1, dtype=torch.long)
            for s in range(count):  # ray-sphere: |eye + t d - c|^2 = r^2
                oc = eye - centres[s]
                a = (dirs * dirs).sum(-1)
                b = 2 * (dirs * oc).sum(-1)
                c = (oc * oc).sum() - radii[s] ** 2
                disc = b * b - 4 * a * c
                t = (-b - disc.clamp(min=0).sqrt()) / (2 * a)
                hit = (disc > 0) & (t > 0) & (t < t_best)
                t_best = torch.where(hit, t, t_best)
                hit_id = torch.where(hit, torch.full_like(hit_id, s), hit_id)
            points = eye + t_best[..., None] * dirs
            checker = ((points[..., 0].floor() + points[..., 1].floor()) % 2 == 0).float()
            colour = (0.35 + 0.3 * checker)[..., None].expand(size, size, 3).clone()
            for s in range(count):
                normal = F.normalize(points - centres[s], dim=-1)
                shade = 0.25 + 0.75 * (normal @ light).clamp(min=0)
                colour = torch.where((hit_id == s)[..., None], albedo[s] * shade[..., None], colour)
            sky = torch.isinf(t_best)
            colour[sky] = torch.tensor([0.6, 0.75, 0.95])
            scene["images"].append(colour.permute(2, 0, 1).clamp(0, 1))
            scene["depth"].append(torch.where(sky, torch.zeros_like(t_best), t_best))  # t is depth (ray z = 1)
            scene["intrinsics"].append(k)
            scene["extrinsics"].append(c2w)
        for key in out:
            out[key].append(torch.stack(scene[key]))
    return {key: torch.stack(val) for key, val in out.items()}


class TinyStudent(nn.Module):
    """A small ViT over all views' patches; returns the hidden states of every layer."""

    def __init__(self, views: int, size: int, patch: int = 8, dim: int = 64, depth: int = 4) -> None:
        super().__init__()
        self.patch, self.grid = patch, size // patch
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.pos = nn.Parameter(torch.randn(1, views * self.grid ** 2, dim) * 0.02)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True,
                                                               norm_first=True) for _ in range(depth))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        b, v = images.shape[:2]
        x = self.embed(images.flatten(0, 1)).flatten(2).transpose(1, 2).reshape(b, -1, self.pos.shape[-1]) + self.pos
        hidden = [x]
        for layer in self.layers:
            x = layer(x)
            hidden.append(x)
        return hidden  # index k = output of block k (0 = embeddings), as in the SF convention


def ridge_r2(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
             lam: float = 1e-2) -> float:
    """R^2 on the test set of a closed-form ridge regression (features standardised on train)."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a = torch.cat([(train_x - mu) / sd, torch.ones(len(train_x), 1)], 1).double()
    w = torch.linalg.solve(a.T @ a + lam * len(a) * torch.eye(a.shape[1], dtype=a.dtype), a.T @ train_y.double())
    pred = torch.cat([(test_x - mu) / sd, torch.ones(len(test_x), 1)], 1).double() @ w
    y = test_y.double()
    return float(1 - ((pred - y) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def run_demo(steps: int = 300, seed: int = 0, out: str | Path = "outputs/demo", scenes: int = 384,
             size: int = 56, batch: int = 16, layer: int = 2) -> dict:
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    print(f"rendering synthetic RGB-D scenes ({size}x{size}, 2 views) ...")
    train = render_scenes(scenes, size=size, seed=seed)
    test = render_scenes(max(1, scenes // 3), size=size, seed=seed + 1)
    teacher = GeometryTeacher(GeometryConfig(patch_size=8, num_freqs=4, scale=2.0, far=20.0))
    student = TinyStudent(views=2, size=size)
    # The geometry features already encode 3-D position, so the UV embedding is off.
    sf = SpatialForcing(AlignConfig(student_layer=layer, use_pos_embed=False), student_dim=64, teacher_dim=teacher.dim)
    grid = student.grid

    def visual(images: torch.Tensor) -> torch.Tensor:
        return student(images)[layer].reshape(len(images), 2, grid, grid, -1)

    def teacher_grid(data: dict, idx: torch.Tensor):
        return teacher.features(data["images"][idx], depth=data["depth"][idx],
                                intrinsics=data["intrinsics"][idx], extrinsics=data["extrinsics"][idx])

    def probe() -> float:
        with torch.no_grad():
            feats = {}
            for name, data in (("train", train), ("test", test)):
                x = visual(data["images"]).reshape(-1, 64)
                pts, ok = teacher.patch_points(data["depth"], data["intrinsics"])  # own camera frame
                feats[name] = (x[ok.reshape(-1)], pts[..., 2].reshape(-1)[ok.reshape(-1)])
        return ridge_r2(*feats["train"], *feats["test"])

    r2_before = probe()
    opt = torch.optim.AdamW(list(student.parameters()) + list(sf.parameters()), lr=1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    history = []
    bar = tqdm(range(steps), desc="spatial forcing", unit="step", mininterval=1.0)
    for step in bar:
        idx = torch.randint(0, len(train["images"]), (batch,), generator=gen)
        tg = teacher_grid(train, idx)
        loss, metrics = sf(visual(train["images"][idx]), tg.feats, tg.valid)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(loss.item())
        bar.set_postfix(align_loss=f"{history[-1]:.4f}", cos=f"{float(metrics['cos_sim']):.3f}")
    r2_after = probe()
    with torch.no_grad():
        idx = torch.arange(len(test["images"]))
        tg = teacher_grid(test, idx)
        test_loss, test_metrics = sf(visual(test["images"]), tg.feats, tg.valid)
    summary = {
        "steps": steps, "seed": seed, "train_scenes": scenes, "student_layer": layer, "teacher": "geometry",
        "align_loss_first_10": sum(history[:10]) / max(1, len(history[:10])),
        "align_loss_last_10": sum(history[-10:]) / max(1, len(history[-10:])),
        "test_align_loss": float(test_loss), "test_cos_sim": float(test_metrics["cos_sim"]),
        "depth_probe_r2_before": r2_before, "depth_probe_r2_after": r2_after,
        "wall_time_s": time.perf_counter() - t_start,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\nSpatial Forcing demo: summary")
    print(f"  align loss (train)      {summary['align_loss_first_10']:.4f} -> {summary['align_loss_last_10']:.4f}"
          f"  (first/last 10 of {steps} steps)")
    print(f"  held-out cosine         {summary['test_cos_sim']:.3f}  (align loss {summary['test_align_loss']:.4f})")
    print(f"  depth probe R^2 (test)  {r2_before:.3f} before -> {r2_after:.3f} after  (layer {layer} tokens)")
    print(f"  wall time               {summary['wall_time_s']:.1f} s")
    print(f"  written                 {out / 'demo_summary.json'}")
    return summary
