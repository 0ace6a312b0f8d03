"""Linear depth probe: how much metric depth a policy's visual tokens carry, layer by layer.

For every frame, the policy's visual-token grid at layer L (the student protocol's `visual_hidden`,
`[V, g, g, D]`, exactly the tokens Spatial Forcing aligns) is paired with the metric depth of each
token's patch (the mean of the patch's valid depth pixels; a patch needs half its pixels valid).
A ridge regression (closed form, with intercept) is fitted on the training episodes and scored on
held-out episodes: R^2 = 1 - SSE / SST around the held-out mean, and RMSE in metres.

    RidgeStats(D).add(X, y) ... .solve(lam) -> (w [D], b)   streaming: memory D x D, any token count
    patch_depth(depth [B, V, H, W], g) -> ([B, V, g, g] metres, valid)
    probe(policy, train, test, layers, cameras) -> {layer: {"r2", "rmse_m", "train_tokens", "test_tokens"}}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


class RidgeStats:
    """Streaming sufficient statistics of a ridge regression (float64): feed `(X [N, D], y [N])`
    batches with `add`, then `solve`. Memory is D x D whatever the number of tokens."""

    def __init__(self, dim: int) -> None:
        self.n = 0
        self.sx = torch.zeros(dim, dtype=torch.float64)
        self.sy = torch.zeros((), dtype=torch.float64)
        self.xx = torch.zeros(dim, dim, dtype=torch.float64)
        self.xy = torch.zeros(dim, dtype=torch.float64)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or x.shape[1] != len(self.sx):
            raise ValueError(f"RidgeStats.add: expected X [N, {len(self.sx)}] and y [N], "
                             f"got {tuple(x.shape)} and {tuple(y.shape)}")
        x, y = x.double(), y.double()
        self.n += len(x)
        self.sx += x.sum(0)
        self.sy += y.sum()
        self.xx += x.T @ x
        self.xy += x.T @ y

    def solve(self, lam: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
        """Centre, then ``(Xc^T Xc + lam * s * I) w = Xc^T yc`` with ``s = mean(diag(Xc^T Xc))`` (so
        `lam` does not depend on the features' scale); intercept ``b = mean(y) - mean(X) w``."""
        if self.n < 2:
            raise ValueError(f"ridge probe: need at least 2 samples, got {self.n}")
        mx, my = self.sx / self.n, self.sy / self.n
        gram = self.xx - self.n * torch.outer(mx, mx)
        rhs = self.xy - self.n * mx * my
        scale = gram.diagonal().mean().clamp_min(1e-12)
        w = torch.linalg.solve(gram + lam * scale * torch.eye(len(gram), dtype=gram.dtype), rhs)
        return w, my - mx @ w


class Score:
    """Streaming R^2 (against the scored set's own mean) and RMSE of predictions."""

    def __init__(self) -> None:
        self.n, self.sse, self.sy, self.syy = 0, 0.0, 0.0, 0.0

    def add(self, y: torch.Tensor, pred: torch.Tensor) -> None:
        y, pred = y.double(), pred.double()
        self.n += len(y)
        self.sse += float(((y - pred) ** 2).sum())
        self.sy += float(y.sum())
        self.syy += float((y * y).sum())

    def result(self) -> tuple[float, float]:
        sst = self.syy - self.sy * self.sy / max(self.n, 1)
        r2 = 1.0 - self.sse / sst if sst > 1e-12 else float("nan")
        return r2, float(np.sqrt(self.sse / max(self.n, 1)))


def fit_ridge(x: torch.Tensor, y: torch.Tensor, lam: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    stats = RidgeStats(x.shape[1] if x.ndim == 2 else 0)
    stats.add(x, y)
    return stats.solve(lam)


def r2_rmse(y: torch.Tensor, pred: torch.Tensor) -> tuple[float, float]:
    score = Score()
    score.add(y, pred)
    return score.result()


def patch_depth(depth: torch.Tensor, grid: int, min_valid: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean valid depth per patch of a `grid x grid` tiling: `[B, V, H, W]` -> `[B, V, g, g]` and a
    validity mask (at least `min_valid` of the patch's pixels finite and > 0). H, W multiples of g."""
    b, v, h, w = depth.shape
    if h % grid or w % grid:
        raise ValueError(f"depth {h}x{w} does not tile into a {grid}x{grid} token grid")
    ok = torch.isfinite(depth) & (depth > 0)
    d = torch.where(ok, depth, torch.zeros_like(depth)).reshape(b * v, 1, h, w).float()
    m = ok.reshape(b * v, 1, h, w).float()
    k = (h // grid, w // grid)
    total = F.avg_pool2d(d, k) * (k[0] * k[1])
    count = F.avg_pool2d(m, k) * (k[0] * k[1])
    mean = total / count.clamp_min(1)
    valid = count / (k[0] * k[1]) >= min_valid
    return mean.reshape(b, v, grid, grid), valid.reshape(b, v, grid, grid)


@torch.no_grad()
def visual_batches(policy: Any, dataset: Any, layers: Sequence[int], cameras: Sequence[str], batch_size: int,
                   device: torch.device):
    """Yield `({layer: X [T, D]}, {layer: y [T]}, samples)` per batch: the valid tokens' states and their patch
    depths (each layer on its own grid)."""
    from torch.utils.data import DataLoader

    from spatial_forcing.data.schema import DEPTH
    from spatial_forcing.train.loop import prepare_batch

    policy.model.eval()
    for batch in DataLoader(dataset, batch_size=batch_size):
        inputs = prepare_batch(batch, list(cameras), policy, device)
        depth = torch.stack([batch[DEPTH + c] for c in cameras], 1)
        out, targets, grids = {}, {}, {}
        for layer in layers:
            hidden = policy(inputs.policy, align_layer=layer).visual_hidden  # [B, V, g, g, D]
            side = hidden.shape[2]  # a layer's own grid (a convolutional student's grids shrink with depth)
            if side not in grids:
                grids[side] = patch_depth(depth, side)
            target, valid = grids[side]
            out[layer] = hidden.float().cpu()[valid]
            targets[layer] = target[valid]
        yield out, targets, len(depth)


def probe(policy: Any, train: Any, test: Any, layers: Sequence[int], cameras: Sequence[str], lam: float = 1e-2,
          batch_size: int = 16, device: torch.device | str = "cpu", progress: Any = None) -> dict[int, dict[str, float]]:
    """Fit a ridge probe per layer on `train` (a dataset of samples with depth), score it on `test`.
    Two streaming passes; `progress(n)` is called with the samples of every batch."""
    device = torch.device(device)
    stats: dict[int, RidgeStats] = {}
    for feats, ys, n in visual_batches(policy, train, layers, cameras, batch_size, device):
        for layer, x in feats.items():
            stats.setdefault(layer, RidgeStats(x.shape[1])).add(x, ys[layer])
        if progress is not None:
            progress(n)
    fits = {layer: s.solve(lam) for layer, s in stats.items()}
    scores = {layer: Score() for layer in layers}
    for feats, ys, n in visual_batches(policy, test, layers, cameras, batch_size, device):
        for layer, x in feats.items():
            w, b = fits[layer]
            scores[layer].add(ys[layer], x.double() @ w + b)
        if progress is not None:
            progress(n)
    out = {}
    for layer in layers:
        r2, rmse = scores[layer].result()
        out[layer] = {"r2": r2, "rmse_m": rmse, "train_tokens": stats[layer].n, "test_tokens": scores[layer].n}
    return out


def default_layers(num_layers: int) -> list[int]:
    """Every layer of a shallow student; quartiles (and the last) of a deep one."""
    if num_layers <= 8:
        return list(range(num_layers + 1))
    return sorted({0, num_layers // 4, num_layers // 2, 3 * num_layers // 4, num_layers})


def run_probe(policies: dict[str, Any], dataset: str, *, layers: Sequence[int] | None = None, val_episodes: int = 2,
              max_samples: int = 512, lam: float = 1e-2, batch_size: int = 16, cameras: Sequence[str] | None = None,
              standardize: str = "libero", device: str | torch.device = "cpu", progress: bool = True) -> dict[str, Any]:
    """Probe each named policy on the same split of `dataset` (the last `val_episodes` held out).
    Returns {"split": ..., "policies": {name: {layer: scores}}}."""
    from spatial_forcing.data.dataset import ChunkedDataset, PipelineConfig
    from spatial_forcing.data.schema import DEPTH
    from spatial_forcing.train.loop import open_source

    source = open_source(dataset, standardize)
    n = source.num_episodes
    if not 0 < val_episodes < n:
        raise ValueError(f"val_episodes {val_episodes}: the probe needs held-out and training episodes "
                         f"({n} in {dataset})")
    results: dict[str, Any] = {}
    split = {"train_episodes": n - val_episodes, "test_episodes": val_episodes}
    for name, policy in policies.items():
        cfg = policy.spec
        cams = list(cameras or source.cameras[:cfg.num_images])
        no_depth = [c for c in cams if DEPTH + c not in getattr(source, "features", {})]
        if no_depth:
            raise ValueError(f"the depth probe needs metric depth; {dataset} has none for cameras {no_depth}")
        pipe = PipelineConfig(chunk_len=cfg.chunk_len, chunk_mode="drop_last", image_size=cfg.image_size,
                              augment=False, norm_type=cfg.norm_type, depth=True)
        stats = policy.dataset_stats()
        parts = []
        for eps in (range(n - val_episodes), range(n - val_episodes, n)):
            full = ChunkedDataset(source, stats, pipe, cameras=cams, episodes=list(eps))
            k = min(len(full), max_samples)
            parts.append(torch.utils.data.Subset(full, np.linspace(0, len(full) - 1, k).round().astype(int).tolist()))
        chosen = list(layers) if layers is not None else default_layers(cfg.num_layers)
        bad = [layer for layer in chosen if not 0 <= layer <= cfg.num_layers]
        if bad:
            raise ValueError(f"layers {bad} are outside policy {name!r} (0..{cfg.num_layers})")
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(parts[0]) + len(parts[1]), desc=f"probe {name}", unit="frame", dynamic_ncols=True)
        policy.to(device)
        scores = probe(policy, parts[0], parts[1], chosen, cams, lam, batch_size, device,
                       progress=bar.update if bar is not None else None)
        if bar is not None:
            bar.close()
        results[name] = {int(k): v for k, v in scores.items()}
        split.update({"train_samples": len(parts[0]), "test_samples": len(parts[1]), "cameras": cams})
    return {"dataset": dataset, "ridge_lambda": lam, "split": split, "policies": results}


def plot_probe(result: dict[str, Any], path: str) -> None:
    """R^2 per layer, one line per policy (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    for name, scores in result["policies"].items():
        layers = sorted(scores)
        ax.plot(layers, [scores[k]["r2"] for k in layers], marker="o", label=name)
        ax.set_xticks(layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("held-out R$^2$ (patch depth)")
    ax.set_title("linear depth probe of the visual tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
