"""Dataset statistics for normalisation: computed once over every transition, cached beside the
dataset (DATA.md A.9). Population std, `np.quantile` (linear) q01/q99, min/max, counts.

The cache is keyed by the content the statistics summarise (`fingerprint`), never by shapes alone:
two datasets with the same episode lengths get their own statistics, and editing a data file
(fixing a NaN, re-converting) recomputes them. Non-finite values in the data are refused with the
episode and frame, before training starts, and non-finite statistics are never written.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from spatial_forcing.errors import UserError

from ..normalize import ArrayStats, DatasetStats
from .schema import ACTION, STATE, EpisodeSource

CACHE_NAME = "sf_statistics.json"
_SAMPLE = 1 << 16  # bytes hashed at each end of a data file


def array_stats(x: np.ndarray, mask: np.ndarray | None = None) -> ArrayStats:
    x = np.asarray(x, dtype=np.float64)
    return ArrayStats(q01=np.quantile(x, 0.01, axis=0), q99=np.quantile(x, 0.99, axis=0), min=x.min(0),
                      max=x.max(0), mean=x.mean(0), std=x.std(0),
                      mask=np.ones(x.shape[1], dtype=bool) if mask is None else np.asarray(mask, dtype=bool))


def _where(source: EpisodeSource) -> str:
    root = getattr(source, "root", None)
    return f"dataset {root}" if root is not None else f"dataset ({type(source).__name__})"


def check_finite(source: EpisodeSource, episode: int, arrays: dict[str, np.ndarray]) -> None:
    """Refuse NaN or inf in an episode's state or action, naming the episode, frame and dimension."""
    for key in (ACTION, STATE):
        x = np.asarray(arrays[key])
        bad = ~np.isfinite(x) if np.issubdtype(x.dtype, np.floating) else np.zeros(x.shape, bool)
        if bad.any():
            t, *dim = (int(i) for i in np.argwhere(bad)[0])
            raise UserError(f"{_where(source)}: episode {episode}, frame {t}: {key}{dim} is {x[(t, *dim)]} "
                            f"({int(bad.sum())} non-finite value(s) in this episode); expected finite numbers: "
                            f"fix or remove the episode")


def compute_statistics(source: EpisodeSource, action_mask: np.ndarray | list[bool] | None = None) -> DatasetStats:
    """Statistics of `action` and `observation.state` over all steps of all episodes."""
    actions, states = [], []
    for e in range(source.num_episodes):
        arrays = source.episode_arrays(e)
        check_finite(source, e, arrays)
        actions.append(arrays[ACTION])
        states.append(arrays[STATE])
    if not actions:
        raise UserError(f"{_where(source)} has no episodes: statistics need at least one transition")
    mask = action_mask if action_mask is not None else getattr(source, "action_mask", None)
    stats = DatasetStats(action=array_stats(np.concatenate(actions), mask),
                         proprio=array_stats(np.concatenate(states)),
                         num_transitions=int(sum(len(a) for a in actions)), num_trajectories=len(actions))
    if not _finite(stats.to_dict()):
        raise UserError(f"{_where(source)}: the statistics overflow (values too large for float64); "
                        f"expected action and state values of a sensible magnitude")
    return stats


def data_files(source: EpisodeSource) -> list[Path]:
    """The files a source's arrays come from: LeRobot parquet files (`data_files()`), RLDS shards
    (`shards`), plus their metadata files. Empty for a source that holds its data in memory."""
    files = list(source.data_files()) if callable(getattr(source, "data_files", None)) else \
        list(getattr(source, "shards", None) or [])
    root = getattr(source, "root", None)
    if files and root is not None:
        files += [f for f in (Path(root) / "meta" / "info.json", Path(root) / "dataset_info.json") if f.is_file()]
    return sorted(set(Path(f) for f in files))


def _file_identity(path: Path, root: Path | None) -> list[Any]:
    """(name, size, mtime_ns, hash of the first and last 64 KiB): the last bytes of a parquet file are
    its footer (row counts, column statistics); of a TFRecord shard, its last records."""
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_SAMPLE))
        if st.st_size > _SAMPLE:
            f.seek(max(_SAMPLE, st.st_size - _SAMPLE))
            h.update(f.read(_SAMPLE))
    try:
        name = str(path.relative_to(root)) if root is not None else path.name
    except ValueError:
        name = str(path)
    return [name, st.st_size, st.st_mtime_ns, h.hexdigest()]


def fingerprint(source: EpisodeSource) -> str:
    """Identity of the data the statistics describe, for the cache key.

    Files on disk (LeRobot, RLDS): every data file's size, modification time and a hash of its first
    and last 64 KiB (a parquet file's footer holds its row counts and column statistics), plus the
    reader settings. Any rewrite of a file changes its time, size or footer, and two datasets never
    share a key unless they are copies of the same files with the same times; it costs one `stat`
    and two small reads per file, where hashing every byte of a LIBERO RLDS suite would read gigabytes
    at each start. In-memory sources: a hash of the state and action arrays themselves."""
    files = data_files(source)
    root = getattr(source, "root", None)
    desc: dict[str, Any] = {
        "kind": type(source).__name__, "standardize": getattr(source, "standardize", None),
        "lengths": [source.episode_length(e) for e in range(source.num_episodes)],
        "action_mask": np.asarray(getattr(source, "action_mask", []), bool).tolist()}
    if files:
        desc["files"] = [_file_identity(f, Path(root) if root is not None else None) for f in files]
    else:
        h = hashlib.sha256()
        for e in range(source.num_episodes):
            arrays = source.episode_arrays(e)
            for key in (ACTION, STATE):
                x = np.ascontiguousarray(arrays[key])
                h.update(f"{key}{x.dtype.str}{x.shape}".encode())
                h.update(x.tobytes())
        desc["arrays"] = h.hexdigest()
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:24]


def _finite(doc: Any) -> bool:
    if isinstance(doc, dict):
        return all(_finite(v) for v in doc.values())
    if isinstance(doc, list):
        return all(_finite(v) for v in doc)
    return not isinstance(doc, float) or math.isfinite(doc)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_cached(path: Path, key: str) -> DatasetStats | None:
    """The statistics in `path` if it is a readable cache entry for `key` with finite values."""
    try:
        cached = json.loads(path.read_text())
        if not isinstance(cached, dict) or cached.get("fingerprint") != key or not _finite(cached.get("statistics")):
            return None
        return DatasetStats.from_dict(cached["statistics"], where=str(path))
    except (OSError, ValueError, KeyError, TypeError):  # a damaged cache entry is recomputed
        return None


def cached_statistics(source: EpisodeSource, cache_dir: str | Path | None = None,
                      action_mask: np.ndarray | list[bool] | None = None) -> DatasetStats:
    """Statistics from `<cache_dir or source.root>/sf_statistics.json`, computed and written on a miss
    (or when the fingerprint no longer matches the data). A read-only dataset folder falls back to
    `~/.cache/spatial_forcing/stats-<fingerprint>.json`; a source without a folder is not cached."""
    root = Path(cache_dir) if cache_dir is not None else getattr(source, "root", None)
    if root is None:
        return compute_statistics(source, action_mask)
    key = fingerprint(source)
    candidates = [Path(root) / CACHE_NAME, Path.home() / ".cache" / "spatial_forcing" / f"stats-{key}.json"]
    for path in candidates:
        if path.is_file():
            stats = _read_cached(path, key)
            if stats is not None:
                return stats
    stats = compute_statistics(source, action_mask)  # refuses non-finite data and statistics
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
