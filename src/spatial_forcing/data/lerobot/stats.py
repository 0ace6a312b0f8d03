"""Statistics as LeRobot writes them in `meta/stats.json` and the episode table (spec B.7), computed
exactly (see the package docstring)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from spatial_forcing.data.schema import IMAGE

from .layout import QUANTILES, STAT_KEYS, STRING_DTYPES, VISUAL_DTYPES



def compute_stats(
    arrays: Mapping[str, np.ndarray], *, image_keys: Iterable[str] = ()
) -> dict[str, dict[str, np.ndarray]]:
    """LeRobot `stats.json` statistics of whole arrays, exactly (numpy `linear` quantiles).

    Each array is `[N, *shape]` (N frames). Numeric arrays reduce every axis but the last, giving
    shape `(shape[-1],)` (`(1,)` for `[N]`). Image arrays (keys starting with
    `observation.images.` or listed in `image_keys`) are uint8 `[N, H, W, C]` and give per-channel
    statistics divided by 255 with shape `(C, 1, 1)`. `count` is `[N]`.
    """
    image_keys = set(image_keys)
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in arrays.items():
        arr = np.asarray(arr)
        if key.startswith(IMAGE) or key in image_keys:
            out[key] = _image_stats_from_histogram(_channel_histogram(arr), arr.shape[0])
        else:
            out[key] = _numeric_stats(arr)
    return out


def _numeric_stats(values: np.ndarray) -> dict[str, np.ndarray]:
    """Exact statistics of `[N, *shape]` reduced over all axes but the last."""
    n = values.shape[0]
    flat = values.reshape(n, 1) if values.ndim == 1 else values.reshape(-1, values.shape[-1])
    flat = flat.astype(np.float64)
    stats = {
        "min": flat.min(axis=0),
        "max": flat.max(axis=0),
        "mean": flat.mean(axis=0),
        "std": flat.std(axis=0),
        "count": np.array([n], dtype=np.int64),
    }
    qs = np.quantile(flat, list(QUANTILES.values()), axis=0)
    stats.update({name: qs[i] for i, name in enumerate(QUANTILES)})
    return stats


def _channel_histogram(images: np.ndarray) -> np.ndarray:
    """Per-channel 256-bin histogram `[C, 256]` (int64) of uint8 images `[..., C]`."""
    if images.dtype != np.uint8:
        raise ValueError(f"image statistics: expected uint8 pixels, found {images.dtype}")
    channels = images.shape[-1]
    flat = images.reshape(-1, channels)
    return np.stack([np.bincount(flat[:, c], minlength=256) for c in range(channels)]).astype(np.int64)


def _histogram_quantile(cumsum: np.ndarray, total: int, q: float) -> float:
    """numpy's `linear` quantile of integer samples 0..255 given their cumulative histogram."""
    pos = q * (total - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    v_lo = int(np.searchsorted(cumsum, lo, side="right"))
    v_hi = int(np.searchsorted(cumsum, hi, side="right"))
    return v_lo + (pos - lo) * (v_hi - v_lo)


def _image_stats_from_histogram(hist: np.ndarray, frames: int) -> dict[str, np.ndarray]:
    """Per-channel statistics `(C, 1, 1)` in [0, 1] from `[C, 256]` pixel histograms."""
    values = np.arange(256, dtype=np.float64)
    total = hist.sum(axis=1)
    if (total == 0).any():
        raise ValueError("image statistics: empty histogram")
    mean = (hist * values).sum(axis=1) / total
    var = (hist * (values - mean[:, None]) ** 2).sum(axis=1) / total
    nonzero = [np.flatnonzero(h) for h in hist]
    stats = {
        "min": np.array([nz[0] for nz in nonzero], dtype=np.float64),
        "max": np.array([nz[-1] for nz in nonzero], dtype=np.float64),
        "mean": mean,
        "std": np.sqrt(var),
    }
    cumsums = np.cumsum(hist, axis=1)
    for name, q in QUANTILES.items():
        stats[name] = np.array([_histogram_quantile(cs, int(t), q) for cs, t in zip(cumsums, total, strict=True)])
    out = {k: (v / 255.0).reshape(-1, 1, 1) for k, v in stats.items()}
    out["count"] = np.array([frames], dtype=np.int64)
    return {k: out[k] for k in STAT_KEYS}


def aggregate_stats(stats_list: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """LeRobot's aggregation of one feature's per-episode stats (B.7).

    min/max exact, mean/std pooled exactly, quantiles the count-weighted average of the
    per-episode quantiles (an approximation of the true quantiles).
    """
    counts = np.array([int(np.asarray(s["count"]).reshape(-1)[0]) for s in stats_list], dtype=np.float64)
    total = counts.sum()
    means = np.stack([np.asarray(s["mean"], dtype=np.float64) for s in stats_list])
    variances = np.stack([np.asarray(s["std"], dtype=np.float64) ** 2 for s in stats_list])
    w = counts.reshape(-1, *([1] * (means.ndim - 1)))
    mean = (means * w).sum(axis=0) / total
    var = ((variances + (means - mean) ** 2) * w).sum(axis=0) / total
    out = {
        "min": np.min(np.stack([s["min"] for s in stats_list]), axis=0).astype(np.float64),
        "max": np.max(np.stack([s["max"] for s in stats_list]), axis=0).astype(np.float64),
        "mean": mean,
        "std": np.sqrt(var),
        "count": np.array([int(total)], dtype=np.int64),
    }
    for name in QUANTILES:
        out[name] = (np.stack([np.asarray(s[name], dtype=np.float64) for s in stats_list]) * w).sum(
            axis=0
        ) / total
    return out


def expected_stats_shape(spec: Mapping[str, Any]) -> tuple[int, ...] | None:
    """Shape of a feature's statistics (other than `count`); None for features without stats."""
    dtype = spec["dtype"]
    if dtype in STRING_DTYPES:
        return None
    shape = tuple(spec["shape"])
    if dtype in VISUAL_DTYPES:
        channels = shape[2] if shape[2] in (1, 3) else shape[0]
        return (channels, 1, 1)
    return (shape[-1],)


def _stats_to_json(stats: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, per in stats.items():
        out[key] = {}
        for name in STAT_KEYS:
            value = np.asarray(per[name])
            out[key][name] = value.astype(np.int64 if name == "count" else np.float64).tolist()
    return out


