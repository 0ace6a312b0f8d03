"""Dataset statistics for normalisation: computed once over every transition, cached beside the
dataset (DATA.md A.9). Population std, `np.quantile` (linear) q01/q99, min/max, counts."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .normalize import ArrayStats, DatasetStats
from .schema import ACTION, STATE, EpisodeSource

CACHE_NAME = "sf_statistics.json"


def array_stats(x: np.ndarray, mask: np.ndarray | None = None) -> ArrayStats:
    x = np.asarray(x, dtype=np.float64)
    return ArrayStats(q01=np.quantile(x, 0.01, axis=0), q99=np.quantile(x, 0.99, axis=0), min=x.min(0),
                      max=x.max(0), mean=x.mean(0), std=x.std(0),
                      mask=np.ones(x.shape[1], dtype=bool) if mask is None else np.asarray(mask, dtype=bool))


def compute_statistics(source: EpisodeSource, action_mask: np.ndarray | list[bool] | None = None) -> DatasetStats:
    """Statistics of `action` and `observation.state` over all steps of all episodes."""
    actions, states = [], []
    for e in range(source.num_episodes):
        arrays = source.episode_arrays(e)
        actions.append(arrays[ACTION])
        states.append(arrays[STATE])
    if not actions:
        raise ValueError("the dataset has no episodes: statistics need at least one transition")
    mask = action_mask if action_mask is not None else getattr(source, "action_mask", None)
    return DatasetStats(action=array_stats(np.concatenate(actions), mask), proprio=array_stats(np.concatenate(states)),
                        num_transitions=int(sum(len(a) for a in actions)), num_trajectories=len(actions))


def fingerprint(source: EpisodeSource) -> str:
    """Identity of the data the statistics describe: kind, standardisation, episode lengths."""
    lengths = [source.episode_length(e) for e in range(source.num_episodes)]
    desc = {"kind": type(source).__name__, "standardize": getattr(source, "standardize", None),
            "lengths": lengths, "action_mask": np.asarray(getattr(source, "action_mask", []), bool).tolist()}
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def cached_statistics(source: EpisodeSource, cache_dir: str | Path | None = None,
                      action_mask: np.ndarray | list[bool] | None = None) -> DatasetStats:
    """Statistics from `<cache_dir or source.root>/sf_statistics.json`, computed and written on a miss
    (or when the fingerprint no longer matches the data). A read-only dataset folder falls back to
    `~/.cache/spatial_forcing/`."""
    root = Path(cache_dir) if cache_dir is not None else Path(getattr(source, "root"))
    key = fingerprint(source)
    candidates = [root / CACHE_NAME, Path.home() / ".cache" / "spatial_forcing" / f"stats-{key}.json"]
    for path in candidates:
        if path.is_file():
            cached = json.loads(path.read_text())
            if cached.get("fingerprint") == key:
                return DatasetStats.from_dict(cached["statistics"], where=str(path))
    stats = compute_statistics(source, action_mask)
    text = json.dumps({"fingerprint": key, "statistics": stats.to_dict()}, indent=1) + "\n"
    for path in candidates:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(path, text)
            break
        except OSError:
            continue
    return stats


def check_statistics(stats: DatasetStats, source: EpisodeSource, what: str = "statistics") -> None:
    """Fail if `stats` cannot describe `source` (dimensions of action or state differ)."""
    arrays = source.episode_arrays(0)
    for name, st, key in (("action", stats.action, ACTION), ("proprio", stats.proprio, STATE)):
        if st is None:
            raise ValueError(f"{what}: no '{name}' entry, but the dataset has {key}")
        if st.dim != arrays[key].shape[-1]:
            raise ValueError(f"{what}: '{name}' has {st.dim} dims, but the dataset's {key} has "
                             f"{arrays[key].shape[-1]}")
