"""`LeRobotEpisodeSource`: an `EpisodeSource` over a LeRobotDataset v3.0 folder, ours or LeRobot's."""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np

from spatial_forcing.data.schema import ACTION, DEPTH, IMAGE, INTRINSICS, PAD_MASK, STATE, TASK
from spatial_forcing.data.standardize import ACTION_MASKS, libero_action, libero_state
from spatial_forcing.data.standardize import check as check_standardize

from .layout import (
    _FLOAT32_KEYS_PREFIXES, _PER_CAMERA_PREFIXES, CODEBASE_VERSION, DEFAULT_FEATURES, EPISODES_DIR, INFO_PATH,
    LIBERO_CAMERA_ALIASES, LIBERO_KEY_ALIASES, STATS_PATH, STRING_DTYPES, TASKS_PATH, VIDEO_TOLERANCE_S,
    VISUAL_DTYPES, LeRobotFormatError, _arrow_value_type, _column_to_numpy, _hwc, _is_visual, _leaf_type,
    _list_depth, _normalise_spec, _pa, _pq, _reading,
)
from .depth import DepthQuantizer, depth_camera, depth_unit_factor, is_depth_map
from .stats import expected_stats_shape
from .video import _VideoReader

logger = logging.getLogger(__name__)



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


def check_intrinsics(k: Any, what: str) -> np.ndarray:
    """A 3x3 pixel camera matrix `[[fx, s, cx], [0, fy, cy], [0, 0, 1]]` (fx, fy > 0) as float32."""
    try:
        arr = np.asarray(k, dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.shape != (3, 3) or not np.isfinite(arr).all():
        raise LeRobotFormatError(f"{what}: expected a finite 3x3 pixel matrix [[fx, s, cx], [0, fy, cy], [0, 0, 1]], "
                                 f"found {k!r}")
    if not (arr[0, 0] > 0 and arr[1, 1] > 0) or np.abs(arr[2] - [0, 0, 1]).max() > 1e-6 or abs(arr[1, 0]) > 1e-6:
        raise LeRobotFormatError(f"{what}: expected [[fx, s, cx], [0, fy, cy], [0, 0, 1]] with fx, fy > 0, "
                                 f"found {arr.tolist()}")
    return arr.astype(np.float32)


def read_intrinsics(spec: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """camera -> a 3x3 matrix given as a nested list or as a `.json` / `.npy` file -> float32 matrices."""
    out = {}
    for cam, value in spec.items():
        what = f"intrinsics for {cam!r}"
        if isinstance(value, str):
            path = Path(value).expanduser()
            if not path.is_file():
                raise LeRobotFormatError(f"{what}: {value!r} is neither a 3x3 matrix nor a .json / .npy file")
            try:
                value = np.load(path) if path.suffix == ".npy" else json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise LeRobotFormatError(f"{what}: {path} is not a readable .json / .npy matrix ({exc})") from None
        out[cam] = check_intrinsics(value, what)
    return out


class LeRobotEpisodeSource:
    """An `EpisodeSource` over a LeRobotDataset v3.0 folder (ours or LeRobot's).

    Feature keys are reported under the canonical names of `schema.py`. LeRobot's LIBERO camera
    names are mapped by default (`image` -> `agentview`, `image2`/`wrist_image` -> `wrist`, and
    `state`/`actions` -> `observation.state`/`action`); `camera_map` adds or overrides entries
    (dataset camera key or camera name -> canonical camera name or key; non-camera keys may be
    renamed by full key too). Per-camera extras (`observation.depth.<cam>` ...) follow their
    camera's rename. `cameras` is in info.json feature order.

    Depth comes as float32 metres `[H, W]` under `observation.depth.<cam>` from either storage: our
    float parquet columns, or LeRobot's depth-map features (`info.is_depth_map`: the 12-bit depth video,
    decoded and dequantised exactly as LeRobot does (`depth.py`), or depth images), where
    `observation.images.<cam>_depth` is the depth of camera `<cam>` (LeRobot's robots name it so) and a
    depth stream of another name is a camera of its own; `camera_map` may name its camera.
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
        intrinsics: Mapping[str, Any] | None = None,
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
        self._depth_maps = {k: DepthQuantizer.from_info(s.get("info") or s.get("video_info"))
                            for k, s in self._features.items() if _is_visual(s) and is_depth_map(s)}
        self.features = {self._key_map[k]: self._canonical_spec(k, s) for k, s in self._features.items()
                         if k in self._key_map}
        self._camera_keys = [k for k, s in self._features.items() if _is_visual(s) and k in self._key_map
                             and k not in self._depth_maps]
        self._video_keys = [k for k, s in self._features.items() if s["dtype"] == "video" and k in self._key_map]
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
        self._given: dict[str, np.ndarray] = {}
        for cam, k in (intrinsics or {}).items():
            self._give_intrinsics(cam, k)

    def _give_intrinsics(self, cam: str, k: Any) -> None:
        """Constant pixel intrinsics of a camera whose dataset records none (LeRobot's own datasets do not)."""
        if cam not in self.cameras:
            raise LeRobotFormatError(f"intrinsics for {cam!r}: {self.root} has no such camera; its cameras are "
                                     f"{self.cameras}")
        if INTRINSICS + cam in self.features:
            raise LeRobotFormatError(f"intrinsics for {cam!r}: {self.root} records its own "
                                     f"({INTRINSICS + cam}); drop the given ones")
        self._given[INTRINSICS + cam] = check_intrinsics(k, f"intrinsics for {cam!r}")
        self.features[INTRINSICS + cam] = {"dtype": "float32", "shape": [3, 3], "names": None, "given": True}

    # ---- names -------------------------------------------------------------------------

    def _build_key_map(self, user: Mapping[str, str]) -> dict[str, str]:
        """dataset feature key -> canonical key, for every feature we expose."""
        feats = self._features
        cams = [k for k, s in feats.items() if _is_visual(s) and not is_depth_map(s)]
        depths = [k for k, s in feats.items() if _is_visual(s) and is_depth_map(s)]
        cam_names = {k: (k[len(IMAGE):] if k.startswith(IMAGE) else k) for k in cams}
        existing = set(cam_names.values())
        renamed_cams: dict[str, str] = {}
        for key in cams:
            name = cam_names[key]
            target = user.get(key, user.get(name))
            if target is None:
                alias = LIBERO_CAMERA_ALIASES.get(name)
                target = alias if alias is not None and alias not in existing else name
            renamed_cams[name] = target[len(IMAGE):] if target.startswith(IMAGE) else target
        key_map = {k: IMAGE + renamed_cams[cam_names[k]] for k in cams if cam_names[k] in renamed_cams}
        for key in depths:  # LeRobot's depth maps: `observation.images.<cam>_depth` is the depth of <cam>
            target = user.get(key, user.get(key[len(IMAGE):] if key.startswith(IMAGE) else key))
            if target is None:
                cam = depth_camera(key)
                target = renamed_cams.get(cam, cam)
            for prefix in (DEPTH, IMAGE):
                target = target[len(prefix):] if target.startswith(prefix) else target
            key_map[key] = DEPTH + target
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

    def _canonical_spec(self, key: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        """The spec reported under the canonical key: a depth map as the float32 `[H, W]` metres it reads as."""
        if key not in self._depth_maps:
            return dict(spec)
        h, w, _ = _hwc(key, spec)
        return {"dtype": "float32", "shape": [h, w], "names": ["height", "width"], "stored_as": spec["dtype"],
                "info": dict(spec.get("info") or {})}

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
            for key in self._video_keys:
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
                scale = 1.0
                if key in self._depth_maps:  # LeRobot keeps depth statistics in the recorded unit: metres here
                    scale = depth_unit_factor((self._features[key].get("info") or {}).get("depth_unit"), str(path))
                out[self._key_map[key]] = {n: np.atleast_1d(np.asarray(v)) * (scale if n != "count" else 1)
                                           for n, v in per.items()}
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
            elif canon in self._given:
                out[canon] = self._given[canon].copy()
            elif self._canon[canon] in self._depth_maps:
                out[canon] = self._depth(episode, t, self._canon[canon])
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

    def _depth(self, episode: int, t: int, key: str) -> np.ndarray:
        """A LeRobot depth map in metres, float32 `[H, W]`: a depth video's codes dequantised, or a depth image
        (TIFF in the parquet) scaled from its unit."""
        spec = self._features[key]
        h, w, _ = _hwc(key, spec)
        where = f"{key!r} episode {episode} frame {t}"
        if spec["dtype"] == "video":
            codes = self._video_frame(episode, t, key, depth=True)
            if codes.shape != (h, w):
                raise LeRobotFormatError(f"{where}: expected a depth frame of shape {(h, w)} (info.json), "
                                         f"found {codes.shape}")
            return self._depth_maps[key].dequantize(codes)
        from PIL import Image

        cell = self._column(episode, key)[t].as_py()
        data = cell.get("bytes") if cell else None
        if data is None:
            raise LeRobotFormatError(f"{where}: image bytes are missing")
        with _reading(f"{self._data_file(self._row(episode))} ({where})", "depth image"), \
                Image.open(BytesIO(data)) as img:
            raw = np.asarray(img)
        raw = raw[..., 0] if raw.ndim == 3 else raw
        if raw.shape != (h, w):
            raise LeRobotFormatError(f"{where}: expected a depth image of shape {(h, w)} (info.json), found {raw.shape}")
        unit = (spec.get("info") or {}).get("depth_unit")
        if unit is None:  # LeRobot's rule for unlabelled frames: floats are metres, integers millimetres
            unit = "m" if np.issubdtype(raw.dtype, np.floating) else "mm"
        return (raw.astype(np.float32) * np.float32(depth_unit_factor(unit, where))).astype(np.float32)

    def _png_frame(self, episode: int, t: int, key: str) -> np.ndarray:
        from PIL import Image

        cell = self._column(episode, key)[t].as_py()
        data = cell.get("bytes") if cell else None
        if data is None:
            raise LeRobotFormatError(f"{key!r} episode {episode} frame {t}: image bytes are missing")
        with _reading(f"{self._data_file(self._row(episode))} ({key!r} episode {episode} frame {t})", "PNG image"), \
                Image.open(BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))

    def _video_frame(self, episode: int, t: int, key: str, depth: bool = False) -> np.ndarray:
        row = self._row(episode)
        ts = float(row[f"videos/{key}/from_timestamp"]) + float(self._column(episode, "timestamp")[t])
        return self._video_reader(self._video_file(row, key), depth).frame(ts, self._tol)

    def _video_reader(self, path: Path, depth: bool = False) -> _VideoReader:
        reader = self._videos.get(path)
        if reader is None:
            reader = self._videos[path] = _VideoReader(path, self.fps, depth=depth)
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

