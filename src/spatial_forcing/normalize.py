"""Action / proprio normalisation statistics and the OpenVLA-OFT (un)normalisation formulas.

Formulas (OPENVLA_OFT.md §6), per dimension, with `lo, hi = q01, q99` (`bounds_q99`) or `min, max`
(`bounds`):

- normalise:   `x_n = where(mask, clip(2 * (x - lo) / (hi - lo + 1e-8) - 1, -1, 1), x)`
- un-normalise: `x = where(mask, 0.5 * (x_n + 1) * (hi - lo + 1e-8) + lo, x_n)` (no clipping)
- training only: dims with `min == max` become 0 after normalising (`zero_constant_dims`); upstream
  does not apply this rule to the proprio state at inference, and neither does `normalize`.

Masked-out dims (`mask == False`, e.g. the LIBERO gripper) pass through untouched both ways, with one
exception: upstream's evaluation (`normalize_proprio` in `experiments/robot/openvla_utils.py`) clips
after the `where`, `clip(where(mask, 2 (x - lo) / (hi - lo + 1e-8) - 1, x), -1, 1)`, so a masked-out
proprio dim is clipped to [-1, 1] at inference while training passed it through. `normalize(...,
clip_masked=True)` is that evaluation rule; OFT's processor uses it for the state (the released
statistics have no proprio mask, so the two rules agree on them).

Precision and types: everything is computed in float64 (statistics are float64 arrays). numpy inputs
give float64 numpy results (upstream un-normalises actions in float64 numpy). torch inputs are
computed in float64 on their own device and returned as float64 when the input is float64, else as
float32 (never bf16/fp16: robot actions must not be rounded to 8 mantissa bits).

Files: `dataset_statistics.json` holds `{dataset_key: {"action": {mean, std, max, min, q01, q99, mask},
"proprio": {mean, std, max, min, q01, q99}, "num_transitions": int, "num_trajectories": int}}`
(OPENVLA_OFT.md §7.2). A missing `mask` means every dim is normalised.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

NORM_TYPES = ("bounds_q99", "bounds", "mean_std", "quantile")
OPENPI_EPS = 1e-6  # openpi `transforms.Normalize` / `Unnormalize`: mean_std and quantile (no clipping)
EPS = 1e-8  # added to (hi - lo) in both directions, as upstream
STAT_FIELDS = ("mean", "std", "max", "min", "q01", "q99")  # upstream key order; "mask" follows
STATS_FILE = "dataset_statistics.json"

ArrayLike = TypeVar("ArrayLike", np.ndarray, torch.Tensor)


# ------------------------------------------------------------------------------------ containers
@dataclass
class ArrayStats:
    """Per-dimension statistics of one array (action or proprio); all arrays have the same length.

    Float fields are float64 numpy vectors; `mask` is a bool vector (True = normalise this dim).
    `extra` keeps any other keys of the file entry so that a save reproduces them.
    """

    q01: np.ndarray
    q99: np.ndarray
    min: np.ndarray
    max: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    mask: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in STAT_FIELDS:
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        self.mask = np.asarray(self.mask, dtype=bool)
        _check_lengths({n: getattr(self, n) for n in (*STAT_FIELDS, "mask")}, where="ArrayStats")

    @property
    def dim(self) -> int:
        return int(self.q01.shape[0])

    def bounds(self, norm_type: str) -> tuple[np.ndarray, np.ndarray]:
        """`(lo, hi)`: `(q01, q99)` for `bounds_q99`, `(min, max)` for `bounds`."""
        if norm_type == "bounds_q99":
            return self.q01, self.q99
        if norm_type == "bounds":
            return self.min, self.max
        raise ValueError(f"norm_type must be one of {NORM_TYPES}, got {norm_type!r}")

    @classmethod
    def from_dict(cls, d: dict, where: str = "statistics") -> "ArrayStats":
        """Read one upstream entry (`{"mean": [...], ..., "mask": [...]}`); a missing mask is all True."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a dict of per-dimension statistics, found {type(d).__name__}")
        missing = [k for k in STAT_FIELDS if k not in d]
        if missing:
            raise ValueError(f"{where}: missing {missing}; an entry needs {list(STAT_FIELDS)} (+ optional 'mask')")
        arrays: dict[str, np.ndarray] = {}
        for k in STAT_FIELDS:
            try:
                arrays[k] = np.asarray(d[k], dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{where}.{k}: not a list of numbers ({exc})") from exc
        if "mask" in d:
            mask = np.asarray(d["mask"])
            if mask.dtype != bool:
                raise ValueError(f"{where}.mask: expected a list of true/false, found dtype {mask.dtype}")
        else:
            mask = np.ones(np.shape(arrays["q01"]), dtype=bool)
        _check_lengths({**arrays, "mask": mask}, where=where)
        extra = {k: v for k, v in d.items() if k not in (*STAT_FIELDS, "mask")}
        return cls(mask=mask, extra=extra, **arrays)

    def to_dict(self, with_mask: bool = True) -> dict:
        """Upstream layout: mean, std, max, min, q01, q99 (+ mask when `with_mask`) as plain lists."""
        out: dict[str, Any] = {k: getattr(self, k).tolist() for k in STAT_FIELDS}
        if with_mask:
            out["mask"] = self.mask.tolist()
        out.update(self.extra)
        return out


@dataclass
class DatasetStats:
    """One `dataset_statistics.json` entry: action statistics, optional proprio statistics, counts."""

    action: ArrayStats
    proprio: ArrayStats | None = None
    num_transitions: int | None = None
    num_trajectories: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, where: str = "statistics") -> "DatasetStats":
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a dict with 'action' (and 'proprio'), found {type(d).__name__}")
        if "action" not in d:
            raise ValueError(f"{where}: missing 'action'; keys found: {sorted(d)}")
        action = ArrayStats.from_dict(d["action"], where=f"{where}.action")
        proprio = ArrayStats.from_dict(d["proprio"], where=f"{where}.proprio") if "proprio" in d else None
        counts = {}
        for k in ("num_transitions", "num_trajectories"):
            v = d.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v):
                raise ValueError(f"{where}.{k}: expected an integer, found {v!r}")
            counts[k] = None if v is None else int(v)
        extra = {k: v for k, v in d.items() if k not in ("action", "proprio", "num_transitions", "num_trajectories")}
        return cls(action=action, proprio=proprio, extra=extra, **counts)

    def to_dict(self) -> dict:
        """Upstream layout; the proprio entry carries a mask only when it is not all True."""
        out: dict[str, Any] = {"action": self.action.to_dict(with_mask=True)}
        if self.proprio is not None:
            out["proprio"] = self.proprio.to_dict(with_mask=not bool(self.proprio.mask.all()))
        for k in ("num_transitions", "num_trajectories"):
            v = getattr(self, k)
            if v is not None:
                out[k] = int(v)
        out.update(self.extra)
        return out


def _check_lengths(arrays: dict[str, np.ndarray], where: str) -> None:
    """All arrays must be 1-D with the length of the first one (named in the error)."""
    first_name, first = next(iter(arrays.items()))
    if np.ndim(first) != 1 or len(first) == 0:
        raise ValueError(f"{where}.{first_name}: expected a non-empty 1-D list, found shape {np.shape(first)}")
    n = len(first)
    for name, arr in arrays.items():
        if np.ndim(arr) != 1 or len(arr) != n:
            raise ValueError(f"{where}.{name}: has shape {np.shape(arr)}, expected ({n},) "
                             f"(the length of {first_name})")


# ------------------------------------------------------------------------------------ files
def load_dataset_statistics(path: str | Path) -> dict[str, DatasetStats]:
    """Read `dataset_statistics.json` (a file, or a folder holding one) into `{key: DatasetStats}`."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / STATS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such statistics file (expected {STATS_FILE} as written by "
                                "OpenVLA-OFT fine-tuning)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path}: expected a non-empty object {{dataset_key: statistics}}, "
                         f"found {type(raw).__name__} {str(raw)[:80]}")
    return {key: DatasetStats.from_dict(entry, where=f"{path.name}: {key!r}") for key, entry in raw.items()}


def save_dataset_statistics(path: str | Path, stats: dict[str, DatasetStats]) -> Path:
    """Write `{key: DatasetStats}` in the upstream layout (indent 2); `path` may be a folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / STATS_FILE
    if not stats:
        raise ValueError("save_dataset_statistics: no statistics to save (empty dict)")
    for key, value in stats.items():
        if not isinstance(value, DatasetStats):
            raise TypeError(f"save_dataset_statistics: stats[{key!r}] is a {type(value).__name__}, "
                            "expected DatasetStats")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: v.to_dict() for k, v in stats.items()}, indent=2) + "\n")
    return path


def select_stats(stats: dict[str, DatasetStats], unnorm_key: str | None) -> tuple[str, DatasetStats]:
    """Pick the statistics to (un)normalise with: `(key, DatasetStats)`.

    `None` works only when there is exactly one key. As in the upstream LIBERO evaluation, a key that
    is absent but whose `f"{key}_no_noops"` is present resolves to that one.
    """
    keys = sorted(stats)
    if not keys:
        raise ValueError("select_stats: the statistics dict is empty")
    if unnorm_key is None:
        if len(keys) == 1:
            return keys[0], stats[keys[0]]
        raise ValueError(f"unnorm_key is needed: the statistics hold {len(keys)} datasets; choose one of {keys}")
    if unnorm_key in stats:
        return unnorm_key, stats[unnorm_key]
    if f"{unnorm_key}_no_noops" in stats:
        return f"{unnorm_key}_no_noops", stats[f"{unnorm_key}_no_noops"]
    raise ValueError(f"unnorm_key {unnorm_key!r} is not in the statistics; available keys: {keys}")


# ------------------------------------------------------------------------------------ formulas
def _check_last_dim(x: np.ndarray | torch.Tensor, stats: ArrayStats, what: str) -> None:
    if not isinstance(x, (np.ndarray, torch.Tensor)):
        raise TypeError(f"{what}: expected a numpy array or torch tensor, found {type(x).__name__}")
    if x.ndim == 0 or x.shape[-1] != stats.dim:
        found = "a scalar" if x.ndim == 0 else f"{x.shape[-1]} values"
        raise ValueError(f"{what} has {found} (shape {tuple(x.shape)}), statistics expect {stats.dim}")


def _mask_for(stats: ArrayStats, mask: np.ndarray | list | None, what: str) -> np.ndarray:
    if mask is None:
        return stats.mask
    m = np.asarray(mask)
    if m.dtype != bool or m.shape != (stats.dim,):
        raise ValueError(f"{what}: mask must be {stats.dim} booleans, found dtype {m.dtype} shape {m.shape}")
    return m


def _apply(x: ArrayLike, fn, stats_arrays: list[np.ndarray]) -> ArrayLike:
    """Run `fn(x64, *stats64)` in float64 for numpy or torch inputs; see the module doc for dtypes."""
    if isinstance(x, torch.Tensor):
        out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        args = [torch.as_tensor(a, device=x.device) for a in stats_arrays]
        return fn(x.to(torch.float64), *args).to(out_dtype)
    return fn(np.asarray(x, dtype=np.float64), *stats_arrays)


def _where(cond, a, b):
    return torch.where(cond, a, b) if isinstance(a, torch.Tensor) else np.where(cond, a, b)


def normalize(x: ArrayLike, stats: ArrayStats, norm_type: str, mask: np.ndarray | None = None,
              what: str = "input", clip_masked: bool = False) -> ArrayLike:
    """`where(mask, clip(2 (x - lo) / (hi - lo + 1e-8) - 1, -1, 1), x)` over the last dimension (the
    training rule); with `clip_masked`, `clip(where(mask, 2 (x - lo) / (hi - lo + 1e-8) - 1, x), -1, 1)`
    (upstream's evaluation rule for the proprio state: masked-out dims are clipped too).

    `mask` overrides `stats.mask` (True = normalise). `what` names `x` in errors ("state", "action").
    """
    if norm_type in OPENPI_NORMS:
        return _openpi(x, stats, norm_type, mask, what, inverse=False)
    lo, hi = stats.bounds(norm_type)
    _check_last_dim(x, stats, what)
    m = _mask_for(stats, mask, what)

    def clip(v):
        return v.clamp(-1.0, 1.0) if isinstance(v, torch.Tensor) else np.clip(v, -1.0, 1.0)

    def fn(v, lo_, hi_, m_):
        scaled = 2.0 * (v - lo_) / (hi_ - lo_ + EPS) - 1.0
        return clip(_where(m_, scaled, v)) if clip_masked else _where(m_, clip(scaled), v)

    return _apply(x, fn, [lo, hi, m])


def unnormalize(x: ArrayLike, stats: ArrayStats, norm_type: str, mask: np.ndarray | None = None,
                what: str = "actions") -> ArrayLike:
    """`where(mask, 0.5 (x + 1) (hi - lo + 1e-8) + lo, x)` in float64, without clipping."""
    if norm_type in OPENPI_NORMS:
        return _openpi(x, stats, norm_type, mask, what, inverse=True)
    lo, hi = stats.bounds(norm_type)
    _check_last_dim(x, stats, what)
    m = _mask_for(stats, mask, what)

    def fn(v, lo_, hi_, m_):
        return _where(m_, 0.5 * (v + 1.0) * (hi_ - lo_ + EPS) + lo_, v)

    return _apply(x, fn, [lo, hi, m])


OPENPI_NORMS = ("mean_std", "quantile")


def _openpi(x: ArrayLike, stats: ArrayStats, norm_type: str, mask: np.ndarray | None, what: str,
            inverse: bool) -> ArrayLike:
    """openpi's rules (`transforms.py`), float64, never clipped, masked-out dims untouched:
    `mean_std`: `(x - mean) / (std + 1e-6)` and `x (std + 1e-6) + mean` (π0);
    `quantile`: `(x - q01) / (q99 - q01 + 1e-6) * 2 - 1` and its inverse (π0.5)."""
    _check_last_dim(x, stats, what)
    m = _mask_for(stats, mask, what)
    lo, scale = ((stats.mean, stats.std + OPENPI_EPS) if norm_type == "mean_std"
                 else (stats.q01, stats.q99 - stats.q01 + OPENPI_EPS))
    quantile = norm_type == "quantile"

    def fn(v, lo_, scale_, m_):
        if inverse:
            y = ((v + 1.0) / 2.0 if quantile else v) * scale_ + lo_
        else:
            y = (v - lo_) / scale_
            y = y * 2.0 - 1.0 if quantile else y
        return _where(m_, y, v)

    return _apply(x, fn, [lo, scale, m])


def zero_constant_dims(x_normalised: ArrayLike, stats: ArrayStats, what: str = "input") -> ArrayLike:
    """Training rule: dims whose `min == max` become 0 (masked or not, as upstream's data pipeline)."""
    _check_last_dim(x_normalised, stats, what)
    const = stats.min == stats.max

    def fn(v, c):
        return _where(c, v.new_zeros(()) if isinstance(v, torch.Tensor) else 0.0, v)

    return _apply(x_normalised, fn, [const])
