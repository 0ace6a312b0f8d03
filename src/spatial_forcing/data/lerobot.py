"""LeRobotDataset v3.0 on disk: a writer and an `EpisodeSource` reader (spec: DATA.md Part B).

Layout written and read (B.1)::

    meta/info.json                                   DatasetInfo (written LAST, see below)
    meta/stats.json                                  min/max/mean/std/count/q01/q10/q50/q90/q99
    meta/tasks.parquet                               index `task` (string) + column `task_index`
    meta/episodes/chunk-000/file-000.parquet         one row per episode (+ flattened `stats/...`)
    data/chunk-000/file-000.parquet                  frames, one row group per episode
    videos/<key>/chunk-000/file-000.mp4              frames of many episodes, concatenated

Decisions (documented here because the spec leaves them open):

* **Video codec.** LeRobot's default: AV1 via ``libsvtav1``, ``yuv420p``, ``g=2``, ``crf=30``,
  ``preset=12`` (B.3). PyAV's wheels ship ``libsvtav1`` (encode) and ``libdav1d`` (decode); when
  ``libsvtav1`` is missing ``vcodec="auto"`` falls back to H.264 with B-frames off (B-frames would
  make the per-file concatenation by remuxing produce non-monotonic DTS). Each episode is encoded
  to its own temporary MP4 and the episodes of one output file are concatenated by remuxing
  (no re-encode) when the file is closed, so the B.8 size rule is applied with exact sizes.
* **Depth.** LeRobot 0.6.1 can store depth as a 12-bit quantised HEVC video (``is_depth_map``);
  that is lossy (log quantisation) and needs a 12-bit HEVC build. We store depth, in metres, as a
  plain numeric feature ``observation.depth.<cam>`` of shape ``(H, W)`` (an ``Array2D`` column of
  the data parquet, which any LeRobot reads as a tensor). ``float32`` (default) round-trips
  exactly; ``float16`` halves the size with a relative error <= 2**-11 (<= 0.49 mm at 1 m) for
  depths in [6.1e-5, 65504] m. The reader always returns float32.
* **Statistics.** Per-episode statistics (``stats/<feature>/<stat>`` in the episode table) are
  exact (numpy ``linear`` quantiles) instead of LeRobot's 5,000-bin histograms. Dataset-level
  statistics are exact as well for image/video features (per-channel 256-bin histograms of all
  pixels, divided by 255, shape ``(C, 1, 1)``) and for numeric features of at most
  ``EXACT_STATS_MAX_ELEMENTS`` values per frame. Larger numeric features (depth maps) use
  LeRobot's aggregation (B.7): pooled mean/std, count-weighted average of per-episode quantiles.
  A numeric feature of shape ``(..., n)`` gets statistics of shape ``(n,)`` (LeRobot reduces all
  but the last axis).
* **Interruption safety.** The writer works in a hidden sibling folder ``.<name>.partial-<id>``;
  ``finalize()`` writes ``meta/info.json`` last and then renames the folder onto ``root``
  (an existing dataset there is replaced only with ``overwrite=True``, by two renames: old ->
  ``.<name>.old-<id>``, new -> ``root``; then the old copy is deleted). An exception or
  KeyboardInterrupt before that leaves the previous dataset (or nothing) at ``root``; the
  ``with`` form and ``abort()`` remove the partial folder. The reader refuses a folder without
  ``meta/info.json`` and one whose counts disagree with the files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np

from spatial_forcing.data.schema import (
    ACTION,
    DEPTH,
    EXTRINSICS,
    IMAGE,
    INTRINSICS,
    PAD_MASK,
    STATE,
    TASK,
)
from spatial_forcing.data.standardize import ACTION_MASKS, libero_action, libero_state
from spatial_forcing.data.standardize import check as check_standardize

logger = logging.getLogger(__name__)

CODEBASE_VERSION = "v3.0"
DEFAULT_CHUNK_SIZE = 1000
DEFAULT_DATA_FILE_SIZE_IN_MB = 100
DEFAULT_VIDEO_FILE_SIZE_IN_MB = 200
INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"
EPISODES_DIR = "meta/episodes"
EPISODES_PATH = EPISODES_DIR + "/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
IMAGE_FRAME_NAME = "frame-{frame_index:06d}.png"

DEFAULT_FEATURES: dict[str, dict[str, Any]] = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
QUANTILES: dict[str, float] = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}
STAT_KEYS: tuple[str, ...] = ("min", "max", "mean", "std", "count", *QUANTILES)
EXACT_STATS_MAX_ELEMENTS = 1024
VIDEO_TOLERANCE_S = 1e-4
VISUAL_DTYPES = ("image", "video")
STRING_DTYPES = ("string", "language")

# LeRobot's LIBERO datasets (B.12) name the cameras differently; these are mapped by default.
LIBERO_CAMERA_ALIASES: dict[str, str] = {"image": "agentview", "image2": "wrist", "wrist_image": "wrist"}
LIBERO_KEY_ALIASES: dict[str, str] = {"state": STATE, "actions": ACTION}
_PER_CAMERA_PREFIXES = (DEPTH, INTRINSICS, EXTRINSICS, PAD_MASK)
_FLOAT32_KEYS_PREFIXES = (DEPTH, INTRINSICS, EXTRINSICS)

_HF_ARRAY_TYPES = {2: "Array2D", 3: "Array3D", 4: "Array4D", 5: "Array5D"}


class LeRobotFormatError(ValueError):
    """A folder is not a complete, consistent LeRobotDataset v3.0 (or a frame does not fit one)."""


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------


def canonical_features(
    cameras: Mapping[str, tuple[int, int]],
    state_dim: int,
    action_dim: int,
    *,
    depth: bool | Iterable[str] = False,
    intrinsics: bool | Iterable[str] = False,
    extrinsics: bool | Iterable[str] = False,
    pad_mask: bool | Iterable[str] = False,
    depth_dtype: str = "float32",
    video: bool = True,
) -> dict[str, dict[str, Any]]:
    """Build a LeRobot features dict for the canonical schema of `schema.py`.

    `cameras` maps a camera name to its (height, width), in token order. `depth` etc. are True for
    every camera or an iterable of camera names. Depth is metres, `depth_dtype` float32 or float16.
    """
    if depth_dtype not in ("float32", "float16"):
        raise ValueError(f"depth_dtype: expected 'float32' or 'float16', found {depth_dtype!r}")
    visual = "video" if video else "image"
    feats: dict[str, dict[str, Any]] = {}
    for cam, (h, w) in cameras.items():
        feats[IMAGE + cam] = {"dtype": visual, "shape": [h, w, 3], "names": ["height", "width", "channel"]}
    feats[STATE] = {"dtype": "float32", "shape": [state_dim], "names": None}
    feats[ACTION] = {"dtype": "float32", "shape": [action_dim], "names": None}
    extras = (
        (depth, DEPTH, depth_dtype, None, ["height", "width"]),
        (intrinsics, INTRINSICS, "float32", (3, 3), None),
        (extrinsics, EXTRINSICS, "float32", (4, 4), None),
        (pad_mask, PAD_MASK, "bool", None, ["height", "width"]),
    )
    for which, prefix, dtype, shape, names in extras:
        for cam in _select_cameras(which, cameras):
            h, w = cameras[cam]
            feats[prefix + cam] = {"dtype": dtype, "shape": list(shape or (h, w)), "names": names}
    return feats


def _select_cameras(which: bool | Iterable[str], cameras: Mapping[str, Any]) -> list[str]:
    """Resolve a `True`/`False`/iterable-of-names option against the camera names."""
    if which is True:
        return list(cameras)
    if which is False or which is None:
        return []
    chosen = list(which)
    unknown = [c for c in chosen if c not in cameras]
    if unknown:
        raise ValueError(f"unknown cameras {unknown}: expected some of {list(cameras)}")
    return chosen


def _is_visual(spec: Mapping[str, Any]) -> bool:
    return spec.get("dtype") in VISUAL_DTYPES


def _numpy_dtype(dtype: str, where: str) -> np.dtype:
    """The numpy dtype of a numeric feature dtype string, or a format error."""
    try:
        return np.dtype(dtype)
    except TypeError as err:
        raise LeRobotFormatError(f"{where}: unsupported dtype {dtype!r}") from err


def _hwc(key: str, spec: Mapping[str, Any]) -> tuple[int, int, int]:
    """(H, W, C) of a visual feature; LeRobot allows (H, W, C) and channel-first (C, H, W)."""
    shape = tuple(spec["shape"])
    if len(shape) == 3 and shape[2] in (1, 3):
        return shape  # type: ignore[return-value]
    if len(shape) == 3 and shape[0] in (1, 3):
        return (shape[1], shape[2], shape[0])
    raise ValueError(f"feature {key!r}: visual shape expected (H, W, 3) or (3, H, W), found {shape}")


def _normalise_spec(key: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """Copy a feature spec with the shape as a list of ints and a `names` entry; validate it."""
    if "/" in key:
        raise ValueError(f"feature {key!r}: names must not contain '/'")
    if "dtype" not in spec or "shape" not in spec:
        raise ValueError(f"feature {key!r}: expected keys 'dtype' and 'shape', found {sorted(spec)}")
    out = dict(spec)
    out["shape"] = [int(s) for s in spec["shape"]]
    out.setdefault("names", None)
    dtype = out["dtype"]
    if dtype in VISUAL_DTYPES:
        _hwc(key, out)
    elif dtype not in STRING_DTYPES:
        _numpy_dtype(dtype, f"feature {key!r}")
        if not 1 <= len(out["shape"]) <= 5:
            raise ValueError(f"feature {key!r}: expected 1 to 5 dimensions, found shape {out['shape']}")
    return out


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Arrow helpers (lazy imports: pyarrow / av / PIL are only needed when data is touched)
# --------------------------------------------------------------------------------------------


def _pa():
    import pyarrow as pa

    return pa


@contextlib.contextmanager
def _reading(path: Path | str, what: str = "parquet file") -> Iterator[None]:
    """Name the file when a reader library fails on a damaged one (their messages do not)."""
    try:
        yield
    except LeRobotFormatError:
        raise
    except (OSError, ValueError, _pa().lib.ArrowException) as exc:
        raise LeRobotFormatError(f"{path}: expected a readable {what}, found a damaged one "
                                 f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") \
            from exc


def _pq():
    import pyarrow.parquet as pq

    return pq


def _arrow_value_type(dtype: str):
    pa = _pa()
    if dtype in STRING_DTYPES:
        return pa.string()
    return pa.from_numpy_dtype(np.dtype(dtype))


def _arrow_field(key: str, spec: Mapping[str, Any]):
    """The arrow field of a non-video feature, laid out as HF `datasets` (what LeRobot writes)."""
    pa = _pa()
    dtype, shape = spec["dtype"], tuple(spec["shape"])
    if dtype == "image":
        return pa.field(key, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    value = _arrow_value_type(dtype)
    if dtype in STRING_DTYPES or shape == (1,):
        return pa.field(key, value)
    if len(shape) == 1:
        return pa.field(key, pa.list_(value, shape[0]))
    nested = value
    for _ in shape:
        nested = pa.list_(nested)
    meta = {
        b"ARROW:extension:name": f"datasets.features.features.{_HF_ARRAY_TYPES[len(shape)]}ExtensionType".encode(),
        b"ARROW:extension:metadata": json.dumps([list(shape), dtype]).encode(),
    }
    return pa.field(key, nested, metadata=meta)


def _hf_feature_json(spec: Mapping[str, Any]) -> dict[str, Any]:
    """HF `datasets` 4.x feature JSON for the parquet's `huggingface` schema metadata."""
    dtype, shape = spec["dtype"], tuple(spec["shape"])
    if dtype == "image":
        return {"_type": "Image"}
    if dtype in STRING_DTYPES:
        return {"dtype": "string", "_type": "Value"}
    if shape == (1,):
        return {"dtype": dtype, "_type": "Value"}
    if len(shape) == 1:
        return {"feature": {"dtype": dtype, "_type": "Value"}, "length": shape[0], "_type": "List"}
    return {"shape": list(shape), "dtype": dtype, "_type": _HF_ARRAY_TYPES[len(shape)]}


def _data_schema(features: Mapping[str, Mapping[str, Any]]):
    pa = _pa()
    keys = [k for k, s in features.items() if s["dtype"] != "video"]
    hf = {"info": {"features": {k: _hf_feature_json(features[k]) for k in keys}}}
    return pa.schema([_arrow_field(k, features[k]) for k in keys], metadata={b"huggingface": json.dumps(hf).encode()})


def _column_from_numpy(values: np.ndarray, field):
    """An arrow array for `values` `[N, *shape]` with the type of `field`."""
    pa = _pa()
    n = values.shape[0]
    typ = field.type
    if not pa.types.is_list(typ) and not pa.types.is_fixed_size_list(typ):
        return pa.array(values.reshape(n), type=typ)
    flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    if pa.types.is_fixed_size_list(typ):
        return pa.FixedSizeListArray.from_arrays(flat, typ.list_size)
    arr = flat
    for dim in reversed(values.shape[1:]):
        rows = len(arr) // dim
        arr = pa.ListArray.from_arrays(pa.array(np.arange(0, rows * dim + 1, dim, dtype=np.int32)), arr)
    return arr


def _list_depth(typ) -> int:
    pa = _pa()
    depth = 0
    while pa.types.is_list(typ) or pa.types.is_fixed_size_list(typ) or pa.types.is_large_list(typ):
        typ = typ.value_type
        depth += 1
    return depth


def _leaf_type(typ):
    pa = _pa()
    while pa.types.is_list(typ) or pa.types.is_fixed_size_list(typ) or pa.types.is_large_list(typ):
        typ = typ.value_type
    return typ


def _column_to_numpy(column, spec: Mapping[str, Any], where: str) -> np.ndarray:
    """`[N, *shape]` numpy values of a numeric column (`[N]` for shape (1,)); checks sizes."""
    pa = _pa()
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.null_count:
        raise LeRobotFormatError(f"{where}: {arr.null_count} null values")
    n = len(arr)
    for _ in range(_list_depth(arr.type)):
        arr = arr.flatten()
    values = arr.to_numpy(zero_copy_only=False)
    shape = tuple(spec["shape"])
    if values.size != n * int(np.prod(shape)):
        raise LeRobotFormatError(
            f"{where}: expected {n} x shape {shape} = {n * int(np.prod(shape))} values, found {values.size}"
        )
    return values.reshape(n) if shape == (1,) else values.reshape(n, *shape)


def _tasks_table(tasks: Sequence[str]):
    """`meta/tasks.parquet` as pandas `to_parquet` writes a frame indexed by `task` (B.5)."""
    pa = _pa()
    pandas_meta = {
        "index_columns": ["task"],
        "column_indexes": [
            {"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
             "metadata": {"encoding": "UTF-8"}}
        ],
        "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64",
             "numpy_type": "int64", "metadata": None},
            {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object",
             "metadata": None},
        ],
        "attributes": {},
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.2.3",
    }
    schema = pa.schema(
        [("task_index", pa.int64()), ("task", pa.string())],
        metadata={b"pandas": json.dumps(pandas_meta).encode()},
    )
    return pa.table({"task_index": list(range(len(tasks))), "task": list(tasks)}, schema=schema)


# --------------------------------------------------------------------------------------------
# Video
# --------------------------------------------------------------------------------------------


@dataclass
class VideoEncoding:
    """Encoder settings recorded in each video feature's `info` (B.3)."""

    vcodec: str = "auto"
    pix_fmt: str = "yuv420p"
    g: int = 2
    crf: int = 30
    preset: int | str | None = None
    fast_decode: int = 0
    extra_options: dict[str, str] = field(default_factory=dict)

    def resolved(self) -> VideoEncoding:
        """A copy with `vcodec='auto'` resolved to an encoder this PyAV build has."""
        import av

        codec = self.vcodec
        if codec in ("auto", "av1"):
            codec = "libsvtav1" if "libsvtav1" in av.codecs_available else "h264"
        if codec not in av.codecs_available:
            raise LeRobotFormatError(f"video codec {codec!r} is not available in this PyAV build")
        preset = self.preset
        if preset is None and codec == "libsvtav1":
            preset = 12
        return VideoEncoding(codec, self.pix_fmt, self.g, self.crf, preset, self.fast_decode, dict(self.extra_options))

    def options(self) -> dict[str, str]:
        """Codec options as strings (mirrors LeRobot's `get_codec_options`)."""
        opts = {"g": str(self.g), "crf": str(self.crf)}
        if self.preset is not None:
            opts["preset"] = str(self.preset)
        if self.vcodec == "libsvtav1":
            opts["svtav1-params"] = f"fast-decode={max(0, min(2, self.fast_decode))}"
        elif self.vcodec in ("h264", "libx264", "hevc", "libx265"):
            opts["bf"] = "0"  # no B-frames: keeps DTS monotonic when episodes are concatenated
        for k, v in self.extra_options.items():
            opts.setdefault(k, str(v))
        return opts

    def info(self) -> dict[str, Any]:
        return {
            "video.g": self.g,
            "video.crf": self.crf,
            "video.preset": self.preset,
            "video.fast_decode": self.fast_decode,
            "video.video_backend": "pyav",
            "video.extra_options": dict(self.extra_options),
        }


@contextlib.contextmanager
def _quiet_av() -> Iterator[None]:
    """Silence libav/SVT chatter (e.g. the faststart 'second pass' notice) while encoding."""
    import av.logging

    os.environ.setdefault("SVT_LOG", "1")
    previous = av.logging.get_level()
    av.logging.set_level(av.logging.ERROR)
    try:
        yield
    finally:
        av.logging.set_level(previous)


class _EpisodeVideoEncoder:
    """Encodes one camera of one episode into its own temporary MP4."""

    def __init__(self, path: Path, fps: int, height: int, width: int, enc: VideoEncoding):
        import av

        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.frames = 0
        with _quiet_av():
            self._container = av.open(str(path), "w")
            self._stream = self._container.add_stream(enc.vcodec, rate=fps, options=enc.options())
        self._stream.pix_fmt = enc.pix_fmt
        self._stream.width = width
        self._stream.height = height

    def add(self, image: np.ndarray) -> None:
        import av

        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        with _quiet_av():
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        with _quiet_av():
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._container.close()


def _concatenate_videos(parts: Sequence[tuple[Path, int]], out: Path, fps: int) -> None:
    """Concatenate MP4 episodes (same encoder settings) by remuxing, each shifted to its start."""
    import av

    out.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_av(), av.open(str(out), "w", options={"movflags": "faststart"}) as oc:
        ostream = None
        offset_s = 0.0
        for path, frames in parts:
            with av.open(str(path)) as ic:
                istream = ic.streams.video[0]
                if ostream is None:
                    ostream = oc.add_stream_from_template(istream, opaque=True)
                    ostream.time_base = istream.time_base
                offset = round(offset_s / istream.time_base)
                for packet in ic.demux(istream):
                    if packet.dts is None:
                        continue
                    packet.pts += offset
                    packet.dts += offset
                    packet.stream = ostream
                    oc.mux(packet)
            offset_s += frames / fps


def _probe_video(path: Path, fps: int) -> dict[str, Any]:
    """The stream-derived `video.*` entries of a video feature's info (as LeRobot's)."""
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return {
            "video.height": s.height,
            "video.width": s.width,
            "video.codec": s.codec_context.codec.canonical_name,
            "video.pix_fmt": s.pix_fmt,
            "video.fps": int(s.base_rate or s.average_rate or fps),
            "video.channels": 3,
            "has_audio": len(c.streams.audio) > 0,
        }


class _VideoReader:
    """Random access to frames of one MP4 by timestamp, with PyAV.

    Keeps the container open and the frames decoded since the last seek (the last GOP and
    whatever followed): a request at or shortly after the last decoded frame decodes forward
    without seeking, which makes sequential access cost one decode per frame.
    """

    def __init__(self, path: Path, fps: int, *, cache_frames: int = 32, forward_frames: int = 16):
        self.path = path
        self._fps = fps
        self._cache_frames = cache_frames
        self._forward_s = forward_frames / fps
        self._container = None
        self._pid = -1
        self._cache: OrderedDict[float, Any] = OrderedDict()
        self._last_ts: float | None = None

    def _open(self) -> None:
        import av

        if self._container is not None and self._pid == os.getpid():
            return
        self._container = av.open(str(self.path))
        self._stream = self._container.streams.video[0]
        # one decoding thread: random access decodes one or two frames after each seek, where frame
        # threading only adds latency, and DataLoader workers already fill the cores
        self._stream.codec_context.thread_count = 1
        self._tb = self._stream.time_base
        self._pid = os.getpid()
        self._reset()

    def _reset(self) -> None:
        self._cache.clear()
        self._frames = self._container.decode(self._stream)
        self._last_ts = None

    def close(self) -> None:
        if self._container is not None and self._pid == os.getpid():
            self._container.close()
        self._container = None

    def _lookup(self, ts: float, tol: float) -> float | None:
        """The cached frame time within `tol` of `ts`, if any."""
        return next((t for t in self._cache if abs(t - ts) < tol), None)

    def _seek(self, ts: float, tol: float) -> None:
        # the last keyframe at or before ts + tol: the wanted frame itself when it is a keyframe
        self._container.seek(max(0, int((ts + tol) / self._tb)), backward=True, any_frame=False, stream=self._stream)
        self._reset()

    def _decode_until(self, ts: float, tol: float) -> None:
        for frame in self._frames:
            if frame.pts is None:
                continue
            t = float(frame.pts * self._tb)
            self._cache[t] = frame
            while len(self._cache) > self._cache_frames:
                self._cache.popitem(last=False)
            self._last_ts = t
            if t >= ts - tol:
                return

    def frame(self, ts: float, tol: float = VIDEO_TOLERANCE_S) -> np.ndarray:
        """The RGB uint8 `[H, W, 3]` frame at `ts` seconds (within `tol`)."""
        import av

        try:
            return self._frame(ts, tol)
        except av.error.FFmpegError as exc:
            self.close()
            raise LeRobotFormatError(f"{self.path}: expected a readable video, found a damaged one ({exc})") from exc

    def _frame(self, ts: float, tol: float) -> np.ndarray:
        self._open()
        hit = self._lookup(ts, tol)
        if hit is None:
            ahead = self._last_ts is not None and self._last_ts < ts <= self._last_ts + self._forward_s
            if not ahead:
                self._seek(ts, tol)
            self._decode_until(ts, tol)
            hit = self._lookup(ts, tol)
        if hit is None:
            near = min(self._cache, key=lambda t: abs(t - ts), default=None)
            raise LeRobotFormatError(
                f"{self.path}: no frame at t={ts:.6f}s within {tol}s (nearest decoded: {near})"
            )
        frame = self._cache[hit]
        if not isinstance(frame, np.ndarray):
            frame = frame.to_ndarray(format="rgb24")
            self._cache[hit] = frame
        return frame


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


@dataclass
class _VideoFileState:
    """The output MP4 of one camera currently being filled, and its episode parts."""

    chunk: int = 0
    file: int = 0
    parts: list[tuple[Path, int]] = field(default_factory=list)
    size_mb: float = 0.0
    duration_s: float = 0.0


def _next_chunk_file(chunk: int, file: int, chunks_size: int) -> tuple[int, int]:
    """B.8: the next file index, wrapping into the next chunk at `chunks_size`."""
    return (chunk + 1, 0) if file == chunks_size - 1 else (chunk, file + 1)


class LeRobotWriter:
    """Writes a LeRobotDataset v3.0 (B.9 protocol: add_frame* -> save_episode, ..., finalize).

    `features` is a LeRobot features dict (see `canonical_features`); visual features are stored
    as MP4 video when `video` is True, else as PNG images inside the data parquet. `camera_keys`
    (full keys or camera names) fixes the camera order in info.json, which is the order readers
    report. Nothing appears at `root` until `finalize()` succeeds (see the module docstring).
    Use as a context manager to finalize on success and clean up on an exception.
    """

    def __init__(
        self,
        root: str | Path,
        fps: int,
        features: Mapping[str, Mapping[str, Any]],
        robot_type: str | None = None,
        video: bool = True,
        camera_keys: Sequence[str] | None = None,
        *,
        overwrite: bool = False,
        encoding: VideoEncoding | None = None,
        png_compress_level: int = 6,
        chunks_size: int = DEFAULT_CHUNK_SIZE,
        data_files_size_in_mb: float = DEFAULT_DATA_FILE_SIZE_IN_MB,
        video_files_size_in_mb: float = DEFAULT_VIDEO_FILE_SIZE_IN_MB,
    ):
        if int(fps) != fps or fps <= 0:
            raise ValueError(f"fps: expected a positive integer, found {fps!r}")
        self.root = Path(root)
        if self.root.exists() and not overwrite:
            raise FileExistsError(f"{self.root} already exists (pass overwrite=True to replace it on finalize)")
        self.fps = int(fps)
        self.video = video
        self.robot_type = robot_type
        self.features = self._build_features(features, camera_keys)
        self.camera_keys = [k for k, s in self.features.items() if _is_visual(s)]
        self._user_keys = [k for k in self.features if k not in DEFAULT_FEATURES]
        self._encoding = (encoding or VideoEncoding()).resolved() if video and self.camera_keys else None
        self._png_level = png_compress_level
        self._chunks_size = chunks_size
        self._data_mb = data_files_size_in_mb
        self._video_mb = video_files_size_in_mb
        self._schema = _data_schema(self.features)
        self._staging = self.root.parent / f".{self.root.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._staging.mkdir(parents=True)
        self._finalized = False
        self._closed = False
        self._tasks: dict[str, int] = {}
        self._episodes: list[dict[str, Any]] = []
        self._episode_stats: list[dict[str, dict[str, np.ndarray]]] = []
        self._exact_values: dict[str, list[np.ndarray]] = {}
        self._image_hist: dict[str, np.ndarray] = {}
        self._total_frames = 0
        self._data_writer = None
        self._data_loc = (0, 0)
        self._data_file_start = 0
        self._videos = {k: _VideoFileState() for k in self.camera_keys} if self._encoding else {}
        self._video_info: dict[str, dict[str, Any]] = {}
        self._reset_buffer()

    # ---- setup -------------------------------------------------------------------------

    def _build_features(
        self, features: Mapping[str, Mapping[str, Any]], camera_keys: Sequence[str] | None
    ) -> dict[str, dict[str, Any]]:
        """Normalise specs, set the visual dtype, order cameras, append the auto features."""
        feats: dict[str, dict[str, Any]] = {}
        for key, spec in features.items():
            if key in DEFAULT_FEATURES:
                continue
            if key == TASK:
                raise ValueError("feature 'task' is reserved: pass the task to save_episode()")
            spec = _normalise_spec(key, spec)
            if _is_visual(spec):
                if spec["shape"][2] != 3:
                    raise ValueError(f"feature {key!r}: expected shape (H, W, 3), found {tuple(spec['shape'])}")
                spec = {**spec, "dtype": "video" if self.video else "image"}
                spec.pop("info", None)
            feats[key] = spec
        if camera_keys is not None:
            feats = self._order_cameras(feats, camera_keys)
        if not feats:
            raise ValueError("features: expected at least one feature")
        return {**feats, **{k: dict(v) for k, v in DEFAULT_FEATURES.items()}}

    @staticmethod
    def _order_cameras(feats: dict[str, dict[str, Any]], camera_keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        visual = [k for k, s in feats.items() if _is_visual(s)]
        wanted = [k if k in feats else IMAGE + k for k in camera_keys]
        if sorted(wanted) != sorted(visual):
            raise ValueError(f"camera_keys: expected a permutation of {visual}, found {list(camera_keys)}")
        rest = {k: s for k, s in feats.items() if k not in visual}
        return {**{k: feats[k] for k in wanted}, **rest}

    def _reset_buffer(self) -> None:
        self._buffer: dict[str, list[Any]] = {k: [] for k in self._user_keys}
        self._buffer_tasks: list[str | None] = []
        self._buffer_hist: dict[str, np.ndarray] = {}
        self._encoders: dict[str, _EpisodeVideoEncoder] = {}

    # ---- frames ------------------------------------------------------------------------

    def add_frame(self, frame: Mapping[str, Any]) -> None:
        """Buffer one time step: every declared feature (canonical keys), optionally `task`."""
        self._check_open()
        extra = [k for k in frame if k not in self._buffer and k != TASK]
        missing = [k for k in self._user_keys if k not in frame]
        if missing or extra:
            raise LeRobotFormatError(
                f"frame {len(self._buffer_tasks)}: missing declared features {missing}, "
                f"undeclared keys {extra} (declared: {self._user_keys})"
            )
        values = {k: self._validated(k, frame[k]) for k in self._user_keys}
        for key, value in values.items():
            self._store(key, value)
        task = frame.get(TASK)
        if task is not None and not isinstance(task, str):
            raise LeRobotFormatError(f"frame key 'task': expected str, found {type(task).__name__}")
        self._buffer_tasks.append(task)

    def _validated(self, key: str, value: Any) -> Any:
        """`value` as numpy with exactly the declared dtype and shape (or a clear error)."""
        spec = self.features[key]
        dtype, shape = spec["dtype"], tuple(spec["shape"])
        if dtype in STRING_DTYPES:
            if not isinstance(value, str):
                raise LeRobotFormatError(f"frame key {key!r}: expected str, found {type(value).__name__}")
            return value
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        if isinstance(value, (bool, int, float)) and shape == (1,):
            value = np.asarray([value], dtype=_numpy_dtype(dtype, key))
        value = np.asarray(value)
        want = np.dtype(np.uint8) if dtype in VISUAL_DTYPES else _numpy_dtype(dtype, key)
        if want == np.float16 and np.issubdtype(value.dtype, np.floating):
            value = value.astype(np.float16)  # float16 storage of float data (e.g. depth) rounds
        if value.dtype != want:
            raise LeRobotFormatError(f"frame key {key!r}: expected dtype {want}, found {value.dtype}")
        if shape == (1,) and value.shape == ():
            value = value.reshape(1)
        if value.shape != shape:
            raise LeRobotFormatError(f"frame key {key!r}: expected shape {shape}, found {value.shape}")
        return value

    def _store(self, key: str, value: Any) -> None:
        spec = self.features[key]
        if not _is_visual(spec):
            self._buffer[key].append(value)
            return
        hist = _channel_histogram(value)
        self._buffer_hist[key] = self._buffer_hist.get(key, 0) + hist
        if spec["dtype"] == "image":
            self._buffer[key].append(_png_bytes(value, self._png_level))
            return
        if key not in self._encoders:
            ep = len(self._episodes)
            path = self._staging / ".tmp" / "videos" / key / f"episode-{ep:06d}.mp4"
            self._encoders[key] = _EpisodeVideoEncoder(path, self.fps, value.shape[0], value.shape[1], self._encoding)
        self._encoders[key].add(value)
        self._buffer[key].append(None)

    # ---- episodes ----------------------------------------------------------------------

    def save_episode(self, task: str | None = None) -> int:
        """Write the buffered frames as the next episode; returns its index.

        `task` (the instruction) applies to every frame; without it each frame's `task` is used.
        """
        self._check_open()
        length = len(self._buffer_tasks)
        if length == 0:
            raise LeRobotFormatError("save_episode: no frames were added (call add_frame first)")
        tasks = self._frame_tasks(task, length)
        ep = len(self._episodes)
        task_index = np.array([self._tasks.setdefault(t, len(self._tasks)) for t in tasks], dtype=np.int64)
        columns = self._episode_columns(ep, length, task_index)
        row: dict[str, Any] = {"episode_index": ep, "tasks": list(dict.fromkeys(tasks)), "length": length}
        row.update(self._write_data(columns, length))
        row.update(self._write_videos(ep, length))
        stats = self._episode_statistics(columns)
        row.update({f"stats/{k}/{s}": v for k, per in stats.items() for s, v in per.items()})
        self._episodes.append(row)
        self._episode_stats.append(stats)
        self._total_frames += length
        self._reset_buffer()
        return ep

    def discard_episode(self) -> None:
        """Drop the frames added since the last `save_episode`."""
        for enc in self._encoders.values():
            enc.abort()
            enc.path.unlink(missing_ok=True)
        self._reset_buffer()

    def _frame_tasks(self, task: str | None, length: int) -> list[str]:
        if task is not None:
            if not isinstance(task, str):
                raise LeRobotFormatError(f"save_episode task: expected str, found {type(task).__name__}")
            return [task] * length
        if any(t is None for t in self._buffer_tasks):
            raise LeRobotFormatError("save_episode: no task given and some frames have no 'task'")
        return list(self._buffer_tasks)  # type: ignore[arg-type]

    def _episode_columns(self, ep: int, length: int, task_index: np.ndarray) -> dict[str, Any]:
        """Stacked per-feature values of the episode, including the auto features (B.4)."""
        cols: dict[str, Any] = {}
        for key in self._user_keys:
            spec = self.features[key]
            if spec["dtype"] == "video":
                continue
            if spec["dtype"] in STRING_DTYPES or spec["dtype"] == "image":
                cols[key] = list(self._buffer[key])
            else:
                cols[key] = np.stack(self._buffer[key])
        frame_index = np.arange(length, dtype=np.int64)
        cols["timestamp"] = (frame_index / self.fps).astype(np.float32)
        cols["frame_index"] = frame_index
        cols["episode_index"] = np.full(length, ep, dtype=np.int64)
        cols["index"] = np.arange(self._total_frames, self._total_frames + length, dtype=np.int64)
        cols["task_index"] = task_index
        return cols

    def _arrow_table(self, cols: Mapping[str, Any], length: int):
        pa = _pa()
        arrays = []
        for fld in self._schema:
            value = cols[fld.name]
            if self.features[fld.name]["dtype"] == "image":
                names = [IMAGE_FRAME_NAME.format(frame_index=i) for i in range(length)]
                arrays.append(pa.StructArray.from_arrays(
                    [pa.array(value, pa.binary()), pa.array(names, pa.string())], fields=list(fld.type)))
            elif isinstance(value, list):
                arrays.append(pa.array(value, fld.type))
            else:
                arrays.append(_column_from_numpy(value, fld))
        return pa.Table.from_arrays(arrays, schema=self._schema)

    def _write_data(self, cols: Mapping[str, Any], length: int) -> dict[str, Any]:
        """Append the episode as one row group, rolling to a new file per B.8."""
        pq = _pq()
        chunk, file = self._data_loc
        if self._data_writer is not None:
            size_mb = self._data_path(chunk, file).stat().st_size / 2**20
            in_file = self._total_frames - self._data_file_start
            per_frame = size_mb / in_file if in_file else 0.0
            if size_mb + per_frame * length >= self._data_mb:
                self._data_writer.close()
                self._data_writer = None
                chunk, file = self._data_loc = _next_chunk_file(chunk, file, self._chunks_size)
                self._data_file_start = self._total_frames
        if self._data_writer is None:
            path = self._data_path(chunk, file)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._data_writer = pq.ParquetWriter(str(path), self._schema, compression="snappy", use_dictionary=True)
        self._data_writer.write_table(self._arrow_table(cols, length))
        return {
            "data/chunk_index": chunk,
            "data/file_index": file,
            "dataset_from_index": self._total_frames,
            "dataset_to_index": self._total_frames + length,
        }

    def _data_path(self, chunk: int, file: int) -> Path:
        return self._staging / DATA_PATH.format(chunk_index=chunk, file_index=file)

    def _write_videos(self, ep: int, length: int) -> dict[str, Any]:
        """Close the episode's MP4s and assign them to output files per B.8."""
        row: dict[str, Any] = {}
        for key in self.camera_keys if self._encoding else []:
            enc = self._encoders[key]
            enc.close()
            if enc.frames != length:
                raise LeRobotFormatError(f"video {key!r}: encoded {enc.frames} frames, expected {length}")
            state = self._videos[key]
            ep_mb = enc.path.stat().st_size / 2**20
            if state.parts and state.size_mb + ep_mb >= self._video_mb:
                self._flush_video(key)
                state.chunk, state.file = _next_chunk_file(state.chunk, state.file, self._chunks_size)
                state.size_mb, state.duration_s = 0.0, 0.0
            start = state.duration_s
            state.parts.append((enc.path, length))
            state.size_mb += ep_mb
            state.duration_s += length / self.fps
            row.update({
                f"videos/{key}/chunk_index": state.chunk,
                f"videos/{key}/file_index": state.file,
                f"videos/{key}/from_timestamp": start,
                f"videos/{key}/to_timestamp": start + length / self.fps,
            })
        return row

    def _flush_video(self, key: str) -> None:
        """Concatenate the pending episode parts of `key` into their output MP4."""
        state = self._videos[key]
        if not state.parts:
            return
        out = self._staging / VIDEO_PATH.format(video_key=key, chunk_index=state.chunk, file_index=state.file)
        _concatenate_videos(state.parts, out, self.fps)
        for path, _ in state.parts:
            path.unlink(missing_ok=True)
        state.parts = []
        if key not in self._video_info:
            self._video_info[key] = {**_probe_video(out, self.fps), **self._encoding.info(), "is_depth_map": False}

    def _episode_statistics(self, cols: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
        """Exact statistics of this episode; accumulate what the dataset-level stats need."""
        stats: dict[str, dict[str, np.ndarray]] = {}
        n = len(cols["index"])
        for key, spec in self.features.items():
            if spec["dtype"] in STRING_DTYPES:
                continue
            if _is_visual(spec):
                hist = self._buffer_hist[key]
                stats[key] = _image_stats_from_histogram(hist, n)
                self._image_hist[key] = self._image_hist.get(key, 0) + hist
                continue
            values = cols[key]
            stats[key] = _numeric_stats(values)
            if int(np.prod(spec["shape"])) <= EXACT_STATS_MAX_ELEMENTS:
                self._exact_values.setdefault(key, []).append(values)
        return stats

    def _dataset_statistics(self) -> dict[str, dict[str, np.ndarray]]:
        out: dict[str, dict[str, np.ndarray]] = {}
        for key, spec in self.features.items():
            if spec["dtype"] in STRING_DTYPES:
                continue
            if _is_visual(spec):
                out[key] = _image_stats_from_histogram(self._image_hist[key], self._total_frames)
            elif key in self._exact_values:
                out[key] = _numeric_stats(np.concatenate(self._exact_values[key]))
            else:
                out[key] = aggregate_stats([s[key] for s in self._episode_stats])
        return out

    # ---- finalisation ------------------------------------------------------------------

    def finalize(self) -> Path:
        """Close every file, write the metadata (info.json last), move the dataset to `root`.

        Idempotent. On any error the partial folder is removed and `root` is left as it was.
        """
        if self._finalized:
            return self.root
        self._check_open()
        if self._buffer_tasks:
            raise LeRobotFormatError(
                f"finalize: {len(self._buffer_tasks)} frames were added but not saved "
                "(call save_episode() or discard_episode() first)"
            )
        if not self._episodes:
            raise LeRobotFormatError("finalize: no episodes were saved")
        try:
            self._close_files()
            self._write_metadata()
            LeRobotEpisodeSource(self._staging).close()  # refuse to install what we cannot read
            self._install()
        except BaseException:
            self.abort()
            raise
        self._finalized = True
        self._closed = True
        return self.root

    def _close_files(self) -> None:
        if self._data_writer is not None:
            self._data_writer.close()
            self._data_writer = None
        for key in self._videos:
            self._flush_video(key)
        shutil.rmtree(self._staging / ".tmp", ignore_errors=True)

    def _write_metadata(self) -> None:
        pq = _pq()
        meta = self._staging / "meta"
        meta.mkdir(parents=True, exist_ok=True)
        pq.write_table(_tasks_table(list(self._tasks)), str(self._staging / TASKS_PATH), compression="snappy")
        self._write_episodes()
        stats = _stats_to_json(self._dataset_statistics())
        _write_json(self._staging / STATS_PATH, stats)
        _write_json(self._staging / INFO_PATH, self._info())  # last: marks the folder complete

    def _write_episodes(self) -> None:
        """The episode table (B.6), rolled over at `data_files_size_in_mb` like the data."""
        pa, pq = _pa(), _pq()
        rows = [self._episode_row(r) for r in self._episodes]
        batches: list[list[dict[str, Any]]] = [[]]
        size = 0.0
        for row in rows:
            row_mb = len(json.dumps(row, default=float)) / 2**20
            if batches[-1] and size + row_mb >= self._data_mb:
                batches.append([])
                size = 0.0
            batches[-1].append(row)
            size += row_mb
        chunk, file = 0, 0
        for i, batch in enumerate(batches):
            if i:
                chunk, file = _next_chunk_file(chunk, file, self._chunks_size)
            for row in batch:
                row["meta/episodes/chunk_index"], row["meta/episodes/file_index"] = chunk, file
            path = self._staging / EPISODES_PATH.format(chunk_index=chunk, file_index=file)
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(batch), str(path), compression="snappy")

    @staticmethod
    def _episode_row(row: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in row.items():
            if key.startswith("stats/"):
                is_count = key.endswith("/count")
                value = np.asarray(value).astype(np.int64 if is_count else np.float64).tolist()
            out[key] = value
        return out

    def _info(self) -> dict[str, Any]:
        features = {}
        for key, spec in self.features.items():
            spec = dict(spec)
            if spec["dtype"] == "video":
                spec["info"] = dict(self._video_info[key])
            features[key] = spec
        return {
            "codebase_version": CODEBASE_VERSION,
            "fps": self.fps,
            "features": features,
            "total_episodes": len(self._episodes),
            "total_frames": self._total_frames,
            "total_tasks": len(self._tasks),
            "chunks_size": self._chunks_size,
            "data_files_size_in_mb": self._data_mb,
            "video_files_size_in_mb": self._video_mb,
            "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if self._encoding else None,
            "robot_type": self.robot_type,
            "splits": {"train": f"0:{len(self._episodes)}"},
        }

    def _install(self) -> None:
        """Rename the finished staging folder onto `root` (replacing an old dataset last)."""
        if not self.root.exists():
            os.replace(self._staging, self.root)
            return
        old = self.root.parent / f".{self.root.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(self.root, old)
        try:
            os.replace(self._staging, self.root)
        except BaseException:
            os.replace(old, self.root)
            raise
        shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Stop writing and delete the partial folder; `root` is left untouched."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            if self._data_writer is not None:
                self._data_writer.close()
        for enc in self._encoders.values():
            enc.abort()
        shutil.rmtree(self._staging, ignore_errors=True)

    def _check_open(self) -> None:
        if self._closed:
            raise LeRobotFormatError(f"writer for {self.root} is closed (finalized or aborted)")

    def __enter__(self) -> LeRobotWriter:
        return self

    def __exit__(self, exc_type, *_exc) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            if not self._finalized:
                self.abort()


def _png_bytes(image: np.ndarray, level: int) -> bytes:
    from PIL import Image

    buf = BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=level)
    return buf.getvalue()


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=4)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------


def load_info(root: str | Path) -> dict[str, Any]:
    """Read and validate `meta/info.json` (v3.0 only), normalising shapes to lists of ints."""
    path = Path(root) / INFO_PATH
    if not Path(root).is_dir():
        raise LeRobotFormatError(f"{root}: dataset folder not found")
    if not path.is_file():
        raise LeRobotFormatError(
            f"{path}: missing — not a finished LeRobotDataset (an interrupted write leaves no info.json)"
        )
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise LeRobotFormatError(f"{path}: not valid JSON ({err})") from err
    version = info.get("codebase_version")
    if version != CODEBASE_VERSION:
        hint = (
            " (convert with `python -m lerobot.scripts.convert_dataset_v21_to_v30`)"
            if isinstance(version, str) and version.startswith("v2")
            else ""
        )
        raise LeRobotFormatError(f"{path}: codebase_version expected {CODEBASE_VERSION!r}, found {version!r}{hint}")
    for key in ("fps", "features", "total_episodes", "total_frames", "data_path"):
        if key not in info:
            raise LeRobotFormatError(f"{path}: missing key {key!r}")
    for key in ("data_path", "video_path"):
        template = info.get(key)
        if template is None and key == "video_path":
            continue
        parts = Path(template).parts if isinstance(template, str) else ()
        if not parts or Path(template).is_absolute() or ".." in parts:
            raise LeRobotFormatError(f"{path}: {key} expected a relative path inside the dataset folder, "
                                     f"found {template!r}")
    if not isinstance(info["fps"], (int, float)) or info["fps"] <= 0:
        raise LeRobotFormatError(f"{path}: fps expected a positive number, found {info['fps']!r}")
    known = {"codebase_version", "fps", "features", "total_episodes", "total_frames", "total_tasks",
             "chunks_size", "data_files_size_in_mb", "video_files_size_in_mb", "data_path",
             "video_path", "robot_type", "splits", "tools"}
    unknown = sorted(set(info) - known)
    if unknown:
        logger.warning("%s: ignoring unknown keys %s", path, unknown)
    for key, spec in info["features"].items():
        try:
            info["features"][key] = _normalise_spec(key, spec) if "/" not in key else spec
        except ValueError as err:
            raise LeRobotFormatError(f"{path}: {err}") from err
    missing = [k for k in DEFAULT_FEATURES if k not in info["features"]]
    if missing:
        raise LeRobotFormatError(f"{path}: features missing the auto features {missing}")
    return info


class LeRobotEpisodeSource:
    """An `EpisodeSource` over a LeRobotDataset v3.0 folder (ours or LeRobot's).

    Feature keys are reported under the canonical names of `schema.py`. LeRobot's LIBERO camera
    names are mapped by default (`image` -> `agentview`, `image2`/`wrist_image` -> `wrist`, and
    `state`/`actions` -> `observation.state`/`action`); `camera_map` adds or overrides entries
    (dataset camera key or camera name -> canonical camera name or key; non-camera keys may be
    renamed by full key too). Per-camera extras (`observation.depth.<cam>` ...) follow their
    camera's rename. `cameras` is in info.json feature order.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        camera_map: Mapping[str, str] | None = None,
        tolerance_s: float = VIDEO_TOLERANCE_S,
        max_open_videos: int = 16,
        cache_columns: int = 32,
        standardize: str | None = None,
    ):
        self.root = Path(root)
        self.standardize = check_standardize(standardize)
        self.action_mask = ACTION_MASKS.get(standardize) if standardize else None
        self.info = load_info(self.root)
        self.fps = self.info["fps"]
        self._tol = tolerance_s
        self._features = {k: v for k, v in self.info["features"].items() if v["dtype"] != "language"}
        self._key_map = self._build_key_map(camera_map or {})
        self._canon = {c: k for k, c in self._key_map.items()}
        self.features = {self._key_map[k]: dict(s) for k, s in self._features.items() if k in self._key_map}
        self._camera_keys = [k for k, s in self._features.items() if _is_visual(s) and k in self._key_map]
        self.cameras = [self._key_map[k][len(IMAGE):] for k in self._camera_keys]
        self._tasks = self._load_tasks()
        self._episodes = self._load_episodes()
        self._file_rows = self._check_files()
        self._check_data_schema()
        self.stats = self._load_stats()
        self._videos: OrderedDict[Path, _VideoReader] = OrderedDict()
        self._max_videos = max_open_videos
        self._columns: OrderedDict[tuple[int, str], Any] = OrderedDict()
        self._max_columns = cache_columns
        self._parquet: dict[Path, Any] = {}

    # ---- names -------------------------------------------------------------------------

    def _build_key_map(self, user: Mapping[str, str]) -> dict[str, str]:
        """dataset feature key -> canonical key, for every feature we expose."""
        feats = self._features
        cams = [k for k, s in feats.items() if _is_visual(s)]
        cam_names = {k: (k[len(IMAGE):] if k.startswith(IMAGE) else k) for k in cams}
        existing = set(cam_names.values())
        renamed_cams: dict[str, str] = {}
        for key in cams:
            info = feats[key].get("info") or {}
            if info.get("is_depth_map") or info.get("video.is_depth_map"):
                logger.warning("%s: skipping %r (quantised depth video is not supported)", self.root, key)
                continue
            name = cam_names[key]
            target = user.get(key, user.get(name))
            if target is None:
                alias = LIBERO_CAMERA_ALIASES.get(name)
                target = alias if alias is not None and alias not in existing else name
            renamed_cams[name] = target[len(IMAGE):] if target.startswith(IMAGE) else target
        key_map = {k: IMAGE + renamed_cams[cam_names[k]] for k in cams if cam_names[k] in renamed_cams}
        for key, spec in feats.items():
            if _is_visual(spec) or key in DEFAULT_FEATURES:
                continue
            key_map[key] = self._canonical_key(key, user, renamed_cams)
        self._check_collisions(key_map)
        return key_map

    def _canonical_key(self, key: str, user: Mapping[str, str], cams: Mapping[str, str]) -> str:
        if key in user:
            return user[key]
        alias = LIBERO_KEY_ALIASES.get(key)
        if alias is not None and alias not in self._features:
            return alias
        for prefix in _PER_CAMERA_PREFIXES:
            if key.startswith(prefix) and key[len(prefix):] in cams:
                return prefix + cams[key[len(prefix):]]
        return key

    def _check_collisions(self, key_map: Mapping[str, str]) -> None:
        seen: dict[str, str] = {}
        for key, canon in key_map.items():
            if canon in seen:
                raise LeRobotFormatError(
                    f"{self.root}: features {seen[canon]!r} and {key!r} both map to {canon!r} (fix camera_map)"
                )
            seen[canon] = key

    def require(self, keys: Iterable[str]) -> None:
        """Raise if any canonical key a caller needs is not provided by this dataset."""
        missing = [k for k in keys if k != TASK and k not in self.features]
        if missing:
            raise LeRobotFormatError(
                f"{self.root}: missing required features {missing}; available: {list(self.features)}"
            )

    # ---- metadata loading and validation -----------------------------------------------

    def _load_tasks(self) -> list[str]:
        path = self.root / TASKS_PATH
        if not path.is_file():
            raise LeRobotFormatError(f"{path}: missing")
        with _reading(path):
            table = _pq().read_table(str(path))
        cols = table.column_names
        name_col = "task" if "task" in cols else next((c for c in cols if c.startswith("__index_level")), None)
        if name_col is None or "task_index" not in cols:
            raise LeRobotFormatError(f"{path}: expected columns 'task' and 'task_index', found {cols}")
        names = table.column(name_col).to_pylist()
        index = table.column("task_index").to_pylist()
        if sorted(index) != list(range(len(index))):
            raise LeRobotFormatError(f"{path}: task_index expected 0..{len(index) - 1}, found {sorted(index)}")
        tasks = [""] * len(index)
        for i, name in zip(index, names, strict=True):
            tasks[i] = name
        total = self.info.get("total_tasks", len(tasks))
        if total != len(tasks):
            raise LeRobotFormatError(f"{path}: info.json total_tasks={total}, found {len(tasks)} tasks")
        return tasks

    def _load_episodes(self) -> list[dict[str, Any]]:
        pq = _pq()
        folder = self.root / EPISODES_DIR
        files = sorted(folder.glob("chunk-*/file-*.parquet"))
        if not files:
            raise LeRobotFormatError(f"{folder}: no episode parquet files")
        rows: list[dict[str, Any]] = []
        for path in files:
            with _reading(path):
                schema = pq.read_schema(str(path))
                cols = [c for c in schema.names if not c.startswith("stats/")]
                rows.extend(pq.read_table(str(path), columns=cols).to_pylist())
        rows.sort(key=lambda r: r["episode_index"])
        self._check_episodes(rows, folder)
        return rows

    def _check_episodes(self, rows: list[dict[str, Any]], where: Path) -> None:
        total_e, total_f = self.info["total_episodes"], self.info["total_frames"]
        if [r["episode_index"] for r in rows] != list(range(len(rows))) or len(rows) != total_e:
            raise LeRobotFormatError(
                f"{where}: expected episodes 0..{total_e - 1} (info.json total_episodes={total_e}), "
                f"found {len(rows)} rows"
            )
        start = 0
        for r in rows:
            if (r["dataset_from_index"], r["dataset_to_index"]) != (start, start + r["length"]):
                raise LeRobotFormatError(
                    f"{where}: episode {r['episode_index']} index range expected [{start}, {start + r['length']}), "
                    f"found [{r['dataset_from_index']}, {r['dataset_to_index']})"
                )
            start += r["length"]
        if start != total_f:
            raise LeRobotFormatError(f"{where}: episodes hold {start} frames, info.json total_frames={total_f}")

    def _check_files(self) -> dict[Path, int]:
        """Every referenced file exists and each data file has as many rows as its episodes."""
        pq = _pq()
        expected: dict[Path, int] = {}
        first: dict[Path, int] = {}
        for r in self._episodes:
            path = self._data_file(r)
            expected[path] = expected.get(path, 0) + r["length"]
            first.setdefault(path, r["dataset_from_index"])
            for key in self._camera_keys:
                if self._features[key]["dtype"] == "video":
                    video = self._video_file(r, key)
                    if not video.is_file():
                        raise LeRobotFormatError(f"{video}: missing (episode {r['episode_index']}, {key!r})")
        for path, rows in expected.items():
            if not path.is_file():
                raise LeRobotFormatError(f"{path}: missing data file")
            with _reading(path):
                found = pq.read_metadata(str(path)).num_rows
            if found != rows:
                raise LeRobotFormatError(f"{path}: expected {rows} rows from the episode table, found {found}")
        return first

    def _check_data_schema(self) -> None:
        """Columns of the first data file against info.json dtypes and shapes."""
        pa = _pa()
        path = next(iter(self._file_rows))
        with _reading(path):
            schema = _pq().read_schema(str(path))
        for key, spec in self._features.items():
            if spec["dtype"] == "video":
                continue
            if key not in schema.names:
                raise LeRobotFormatError(f"{path}: missing column {key!r} declared in info.json")
            typ = schema.field(key).type
            if spec["dtype"] == "image":
                if not pa.types.is_struct(typ) or typ.get_field_index("bytes") < 0:
                    raise LeRobotFormatError(f"{path}: column {key!r} expected struct<bytes, path>, found {typ}")
                continue
            self._check_numeric_type(path, key, spec, typ)

    @staticmethod
    def _check_numeric_type(path: Path, key: str, spec: Mapping[str, Any], typ) -> None:
        pa = _pa()
        shape = tuple(spec["shape"])
        want = _arrow_value_type(spec["dtype"])
        leaf = _leaf_type(typ)
        if spec["dtype"] in STRING_DTYPES:
            ok = pa.types.is_string(leaf) or pa.types.is_large_string(leaf)
        else:
            ok = leaf == want
        if not ok:
            raise LeRobotFormatError(f"{path}: column {key!r} dtype expected {spec['dtype']} (info.json), found {leaf}")
        depth = _list_depth(typ)
        want_depth = 0 if shape == (1,) else len(shape)
        if depth != want_depth and not (shape == (1,) and depth == 1):
            raise LeRobotFormatError(
                f"{path}: column {key!r} expected shape {shape} (info.json), found {depth}-level nested {typ}"
            )
        if pa.types.is_fixed_size_list(typ) and len(shape) == 1 and typ.list_size != shape[0]:
            raise LeRobotFormatError(
                f"{path}: column {key!r} expected length {shape[0]} (info.json), found {typ.list_size}"
            )

    def _load_stats(self) -> dict[str, dict[str, np.ndarray]] | None:
        """`meta/stats.json` (canonical names), checked against the features."""
        path = self.root / STATS_PATH
        if not path.is_file():
            return None
        raw = json.loads(path.read_text())
        out: dict[str, dict[str, np.ndarray]] = {}
        for key, per in raw.items():
            if self.info["features"].get(key, {}).get("dtype") == "language":
                continue
            if key not in self._features:
                raise LeRobotFormatError(f"{path}: statistics for {key!r}, which is not a feature in info.json")
            shape = expected_stats_shape(self._features[key])
            for name, value in per.items():
                arr = np.atleast_1d(np.asarray(value, dtype=np.float64))
                want = (1,) if name == "count" else shape
                if shape is None or arr.shape != want:
                    raise LeRobotFormatError(
                        f"{path}: {key!r} {name} expected shape {want}, found {arr.shape}"
                    )
            if key in self._key_map:
                out[self._key_map[key]] = {n: np.atleast_1d(np.asarray(v)) for n, v in per.items()}
        return out

    # ---- paths -------------------------------------------------------------------------

    def _data_file(self, row: Mapping[str, Any]) -> Path:
        return self.root / self.info["data_path"].format(
            chunk_index=row["data/chunk_index"], file_index=row["data/file_index"]
        )

    def _video_file(self, row: Mapping[str, Any], key: str) -> Path:
        template = self.info.get("video_path")
        if not template:
            raise LeRobotFormatError(f"{self.root / INFO_PATH}: video feature {key!r} but video_path is null")
        return self.root / template.format(
            video_key=key,
            chunk_index=row[f"videos/{key}/chunk_index"],
            file_index=row[f"videos/{key}/file_index"],
        )

    # ---- EpisodeSource -----------------------------------------------------------------

    def data_files(self) -> list[Path]:
        """The parquet files that hold the frames (the statistics cache keys on them)."""
        return list(self._file_rows)

    @property
    def num_episodes(self) -> int:
        return len(self._episodes)

    @property
    def total_frames(self) -> int:
        return self.info["total_frames"]

    def _row(self, episode: int) -> dict[str, Any]:
        if not 0 <= episode < len(self._episodes):
            raise IndexError(f"episode {episode} out of range [0, {len(self._episodes)})")
        return self._episodes[episode]

    def episode_length(self, episode: int) -> int:
        return int(self._row(episode)["length"])

    def task(self, episode: int) -> str:
        tasks = self._row(episode)["tasks"]
        if len(tasks) == 1:
            return tasks[0]
        return self._tasks[int(self._column(episode, "task_index")[0])]

    def episode_arrays(self, episode: int, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Whole-episode `[T, ...]` arrays (canonical names) of the non-visual numeric features.

        By default everything but per-pixel maps (depth, pad masks), which `frame()` returns.
        """
        if keys is None:
            keys = [c for k, c in self._key_map.items() if self._is_array_feature(k)
                    and not c.startswith((DEPTH, PAD_MASK))]
        self.require(keys)
        return {c: self._canonical_value(c, self._column(episode, self._canon[c])) for c in keys}

    def _is_array_feature(self, key: str) -> bool:
        spec = self._features[key]
        return not _is_visual(spec) and spec["dtype"] not in STRING_DTYPES and key not in DEFAULT_FEATURES

    def frame(self, episode: int, t: int, keys: list[str] | None = None) -> dict[str, Any]:
        """One decoded time step in the canonical schema (all features, or just `keys`)."""
        length = self.episode_length(episode)
        if not 0 <= t < length:
            raise IndexError(f"frame {t} out of range [0, {length}) of episode {episode}")
        if keys is None:
            keys = [*self.features, TASK]
        self.require(keys)
        out: dict[str, Any] = {}
        for canon in keys:
            if canon == TASK:
                out[TASK] = self._frame_task(episode, t)
            elif canon.startswith(IMAGE) and self._features[self._canon[canon]]["dtype"] in VISUAL_DTYPES:
                out[canon] = self._image(episode, t, self._canon[canon])
            else:
                out[canon] = self._canonical_value(canon, self._column(episode, self._canon[canon])[t])
        return out

    def _frame_task(self, episode: int, t: int) -> str:
        tasks = self._row(episode)["tasks"]
        if len(tasks) == 1:
            return tasks[0]
        return self._tasks[int(self._column(episode, "task_index")[t])]

    def _canonical_value(self, canon: str, value: Any) -> Any:
        if canon in (STATE, ACTION) or canon.startswith(_FLOAT32_KEYS_PREFIXES):
            arr = np.asarray(value, dtype=np.float32)
            if self.standardize == "libero" and canon in (STATE, ACTION):
                arr = libero_state(arr) if canon == STATE else libero_action(arr)
            return arr
        if canon.startswith(PAD_MASK):
            return np.asarray(value, dtype=bool)
        return value

    # ---- data access -------------------------------------------------------------------

    def _parquet_file(self, path: Path):
        pf = self._parquet.get(path)
        if pf is None:
            with _reading(path):
                pf = self._parquet[path] = _pq().ParquetFile(str(path))
        return pf

    def _read_episode_column(self, episode: int, key: str):
        """The rows of `episode` of one data column, via the row groups that hold them."""
        row = self._row(episode)
        path = self._data_file(row)
        pf = self._parquet_file(path)
        start = row["dataset_from_index"] - self._file_rows[path]
        stop = start + row["length"]
        groups, offset, first = [], 0, None
        for i in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(i).num_rows
            if offset < stop and offset + n > start:
                groups.append(i)
                first = offset if first is None else first
            offset += n
        with _reading(path):
            table = pf.read_row_groups(groups, columns=[key, "episode_index"])
        table = table.slice(start - first, row["length"])
        found = set(table.column("episode_index").to_pylist())
        if found != {episode}:
            raise LeRobotFormatError(f"{path}: rows for episode {episode} hold episode_index {sorted(found)}")
        return table.column(key)

    def _column(self, episode: int, key: str) -> Any:
        """Cached decoded column of one episode: numpy for numbers, arrow for images/strings."""
        cache_key = (episode, key)
        if cache_key in self._columns:
            self._columns.move_to_end(cache_key)
            return self._columns[cache_key]
        spec = self._features[key]
        column = self._read_episode_column(episode, key)
        where = f"{self._data_file(self._row(episode))} column {key!r} (episode {episode})"
        if spec["dtype"] == "image":
            value = column.combine_chunks()
        elif spec["dtype"] in STRING_DTYPES:
            value = column.to_pylist()
        else:
            value = _column_to_numpy(column, spec, where)
        self._columns[cache_key] = value
        while len(self._columns) > self._max_columns:
            self._columns.popitem(last=False)
        return value

    def _image(self, episode: int, t: int, key: str) -> np.ndarray:
        spec = self._features[key]
        if spec["dtype"] == "video":
            image = self._video_frame(episode, t, key)
        else:
            image = self._png_frame(episode, t, key)
        want = _hwc(key, spec)
        if image.shape != want:
            raise LeRobotFormatError(
                f"{key!r} episode {episode} frame {t}: expected shape {want} (info.json), found {image.shape}"
            )
        return image

    def _png_frame(self, episode: int, t: int, key: str) -> np.ndarray:
        from PIL import Image

        cell = self._column(episode, key)[t].as_py()
        data = cell.get("bytes") if cell else None
        if data is None:
            raise LeRobotFormatError(f"{key!r} episode {episode} frame {t}: image bytes are missing")
        with _reading(f"{self._data_file(self._row(episode))} ({key!r} episode {episode} frame {t})", "PNG image"), \
                Image.open(BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))

    def _video_frame(self, episode: int, t: int, key: str) -> np.ndarray:
        row = self._row(episode)
        ts = float(row[f"videos/{key}/from_timestamp"]) + float(self._column(episode, "timestamp")[t])
        return self._video_reader(self._video_file(row, key)).frame(ts, self._tol)

    def _video_reader(self, path: Path) -> _VideoReader:
        reader = self._videos.get(path)
        if reader is None:
            reader = self._videos[path] = _VideoReader(path, self.fps)
            while len(self._videos) > self._max_videos:
                self._videos.popitem(last=False)[1].close()
        self._videos.move_to_end(path)
        return reader

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (e.g. for DataLoader workers): open files and caches are not carried."""
        state = dict(self.__dict__)
        state["_videos"], state["_columns"], state["_parquet"] = OrderedDict(), OrderedDict(), {}
        return state

    def close(self) -> None:
        """Close the open video containers and drop caches."""
        for reader in self._videos.values():
            reader.close()
        self._videos.clear()
        self._columns.clear()
        self._parquet.clear()

    def __enter__(self) -> LeRobotEpisodeSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"LeRobotEpisodeSource({str(self.root)!r}, episodes={self.num_episodes}, "
            f"frames={self.total_frames}, cameras={self.cameras})"
        )


__all__ = [
    "CODEBASE_VERSION",
    "LeRobotEpisodeSource",
    "LeRobotFormatError",
    "LeRobotWriter",
    "VideoEncoding",
    "aggregate_stats",
    "canonical_features",
    "compute_stats",
    "expected_stats_shape",
    "load_info",
]
