"""The LeRobotDataset v3.0 layout shared by the writer and the reader: path templates, the auto
features, feature specs (`canonical_features`), the parquet/arrow column layout of HF `datasets`, and
the format error."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spatial_forcing.data.schema import DEPTH, EXTRINSICS, INTRINSICS, PAD_MASK, STATE, ACTION, IMAGE

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
DEPTH_FORMATS = ("video", "float32", "float16")  # how depth is stored (canonical_features)
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
    depth_format: str | None = None,
    video: bool = True,
) -> dict[str, dict[str, Any]]:
    """Build a LeRobot features dict for the canonical schema of `schema.py`.

    `cameras` maps a camera name to its (height, width), in token order. `depth` etc. are True for
    every camera or an iterable of camera names. Depth is metres, stored as `depth_format`:

    * ``"video"`` (the default with `video`): LeRobot 0.6's depth video, `observation.images.<cam>_depth`
      (12-bit log-quantised HEVC, `depth.py`; LeRobot opens it as depth; <= 0.74 mm error at 1 m);
    * ``"float32"`` (the default without `video`): `observation.depth.<cam>` parquet columns, lossless;
    * ``"float16"``: the same columns at half the size (relative error <= 2**-11).
    """
    if depth_format is None:
        depth_format = "video" if video else "float32"
    if depth_format not in DEPTH_FORMATS:
        raise ValueError(f"depth_format: expected one of {DEPTH_FORMATS}, found {depth_format!r}")
    if depth_format == "video" and not video and depth:
        raise ValueError("depth_format 'video' stores depth as a video stream: it needs video=True "
                         "(or depth_format 'float32' / 'float16' for parquet columns)")
    visual = "video" if video else "image"
    feats: dict[str, dict[str, Any]] = {}
    for cam, (h, w) in cameras.items():
        feats[IMAGE + cam] = {"dtype": visual, "shape": [h, w, 3], "names": ["height", "width", "channel"]}
    feats[STATE] = {"dtype": "float32", "shape": [state_dim], "names": None}
    feats[ACTION] = {"dtype": "float32", "shape": [action_dim], "names": None}
    if depth_format == "video":
        for cam in _select_cameras(depth, cameras):
            h, w = cameras[cam]
            feats[IMAGE + cam + "_depth"] = {"dtype": "video", "shape": [h, w, 1],
                                             "names": ["height", "width", "channels"],
                                             "info": {"is_depth_map": True, "depth_unit": "m"}}
    extras = (
        (depth if depth_format != "video" else False, DEPTH, depth_format, None, ["height", "width"]),
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



def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=4)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

