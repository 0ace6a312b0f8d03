"""LeRobotDataset v3.0 writer/reader (spatial_forcing.data.lerobot): round trips, layout, interruption, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pyarrow")
pytest.importorskip("av")

import pyarrow.parquet as pq  # noqa: E402

from spatial_forcing.data.lerobot import (  # noqa: E402
    LeRobotEpisodeSource,
    LeRobotFormatError,
    LeRobotWriter,
    canonical_features,
    compute_stats,
)
from spatial_forcing.data.lerobot.depth import DepthQuantizer  # noqa: E402
from spatial_forcing.data.schema import EpisodeSource  # noqa: E402

CAMS = {"agentview": (64, 64), "wrist": (64, 64)}
LENGTHS = (5, 7)
TASKS = ("put the bowl on the plate", "open the top drawer")
FPS = 10
MP4_MEAN_TOL = 4.0  # mean |error| in 0..255 for AV1 crf 30 yuv420p on smooth 64x64 images
MP4_MAX_TOL = 48  # max |error|; measured 32 (chroma subsampling at colour edges)


def _image(e: int, t: int, phase: float) -> np.ndarray:
    yy, xx = np.mgrid[0:64, 0:64]
    chans = [128 + 60 * np.sin(xx / 9 + t / 5 + e + phase), 128 + 60 * np.cos(yy / 7 + phase),
             128 + 50 * np.sin((xx + yy) / 11 + t / 3)]
    return np.stack(chans, -1).astype(np.uint8)


def _episodes(seed: int = 0, names: dict[str, str] | None = None) -> list[list[dict]]:
    """Frames of two episodes (5 and 7 steps) in the canonical schema (or renamed keys)."""
    rng = np.random.default_rng(seed)
    names = names or {}
    episodes = []
    for e, length in enumerate(LENGTHS):
        frames = []
        for t in range(length):
            frame = {
                "observation.images.agentview": _image(e, t, 0.0),
                "observation.images.wrist": _image(e, t, 1.5),
                "observation.state": rng.standard_normal(8).astype(np.float32),
                "action": rng.standard_normal(7).astype(np.float32),
                "observation.depth.agentview": rng.uniform(0.3, 4.0, (64, 64)).astype(np.float32),
            }
            frames.append({names.get(k, k): v for k, v in frame.items()})
        episodes.append(frames)
    return episodes


def _write(root: Path, episodes, features, **kwargs) -> Path:
    with LeRobotWriter(root, FPS, features, robot_type="panda", **kwargs) as writer:
        for e, frames in enumerate(episodes):
            for frame in frames:
                writer.add_frame(frame)
            writer.save_episode(TASKS[e])
    return root


def _features(video: bool = True, **kwargs):
    return canonical_features(CAMS, 8, 7, depth=["agentview"], video=video, **kwargs)


@pytest.fixture(scope="module")
def episodes():
    return _episodes()


@pytest.fixture(scope="module")
def video_ds(tmp_path_factory, episodes) -> Path:
    return _write(tmp_path_factory.mktemp("video") / "ds", episodes, _features(video=True))


@pytest.fixture(scope="module")
def png_ds(tmp_path_factory, episodes) -> Path:
    return _write(tmp_path_factory.mktemp("png") / "ds", episodes, _features(video=False), video=False)


def _copy(ds: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(ds, dst)
    return dst


def _edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


def _stack(episodes, key: str) -> np.ndarray:
    return np.stack([f[key] for frames in episodes for f in frames])


# ---- round trips ----------------------------------------------------------------------------


def _check_common(src: LeRobotEpisodeSource, episodes) -> None:
    assert isinstance(src, EpisodeSource)
    assert src.cameras == ["agentview", "wrist"]
    assert src.num_episodes == 2
    assert [src.episode_length(e) for e in range(2)] == list(LENGTHS)
    assert [src.task(e) for e in range(2)] == list(TASKS)
    for e, frames in enumerate(episodes):
        arrays = src.episode_arrays(e)
        for key in ("observation.state", "action"):
            assert arrays[key].dtype == np.float32
            np.testing.assert_array_equal(arrays[key], np.stack([f[key] for f in frames]))
        video_depth = src.features["observation.depth.agentview"].get("stored_as") == "video"
        for t, want in enumerate(frames):
            got = src.frame(e, t, ["observation.depth.agentview", "task"])
            depth, source = got["observation.depth.agentview"], want["observation.depth.agentview"]
            assert depth.dtype == np.float32 and depth.shape == source.shape
            if video_depth:  # LeRobot's 12-bit depth video: within half a quantisation step
                assert (np.abs(depth - source) <= DepthQuantizer().max_error(source)).all()
            else:
                np.testing.assert_array_equal(depth, source)
            assert got["task"] == TASKS[e]


def test_video_round_trip(video_ds, episodes):
    src = LeRobotEpisodeSource(video_ds)
    _check_common(src, episodes)
    errors = []
    for e, frames in enumerate(episodes):
        for t in range(len(frames)):
            got = src.frame(e, t)
            for cam in src.cameras:
                key = f"observation.images.{cam}"
                assert got[key].dtype == np.uint8 and got[key].shape == (64, 64, 3)
                errors.append(np.abs(got[key].astype(int) - frames[t][key].astype(int)))
    err = np.stack(errors)
    print(f"mp4 round trip: max abs error {err.max()}, mean {err.mean():.2f}")
    assert err.mean() < MP4_MEAN_TOL and err.max() <= MP4_MAX_TOL
    # random access backwards and across episodes decodes the right frame
    a = src.frame(1, 6, ["observation.images.wrist"])["observation.images.wrist"]
    b = src.frame(0, 0, ["observation.images.wrist"])["observation.images.wrist"]
    assert np.abs(a.astype(int) - episodes[1][6]["observation.images.wrist"]).mean() < MP4_MEAN_TOL
    assert np.abs(b.astype(int) - episodes[0][0]["observation.images.wrist"]).mean() < MP4_MEAN_TOL


def test_png_round_trip_is_exact(png_ds, episodes):
    src = LeRobotEpisodeSource(png_ds)
    _check_common(src, episodes)
    for e, frames in enumerate(episodes):
        for t in range(len(frames)):
            got = src.frame(e, t)
            for cam in src.cameras:
                key = f"observation.images.{cam}"
                np.testing.assert_array_equal(got[key], frames[t][key])
    assert not (png_ds / "videos").exists()


def test_float16_depth_within_tolerance(tmp_path, episodes):
    root = _write(tmp_path / "ds", episodes, _features(video=False, depth_format="float16"), video=False)
    src = LeRobotEpisodeSource(root)
    assert src.info["features"]["observation.depth.agentview"]["dtype"] == "float16"
    for e, frames in enumerate(episodes):
        for t, want in enumerate(frames):
            got = src.frame(e, t, ["observation.depth.agentview"])["observation.depth.agentview"]
            assert got.dtype == np.float32
            rel = np.abs(got - want["observation.depth.agentview"]) / want["observation.depth.agentview"]
            assert rel.max() <= 2.0**-11


def test_stats_equal_numpy(video_ds, episodes):
    stats = json.loads((video_ds / "meta/stats.json").read_text())
    for key in ("observation.state", "action"):
        values = _stack(episodes, key).astype(np.float64)
        for name, q in (("q01", 0.01), ("q10", 0.10), ("q50", 0.5), ("q90", 0.9), ("q99", 0.99)):
            np.testing.assert_allclose(stats[key][name], np.quantile(values, q, axis=0), rtol=1e-12)
        np.testing.assert_allclose(stats[key]["mean"], values.mean(0), rtol=1e-12)
        np.testing.assert_allclose(stats[key]["std"], values.std(0), rtol=1e-9)
        np.testing.assert_allclose(stats[key]["min"], values.min(0))
        assert stats[key]["count"] == [12]
    pixels = _stack(episodes, "observation.images.wrist").reshape(-1, 3) / 255.0
    img = stats["observation.images.wrist"]
    assert np.asarray(img["q50"]).shape == (3, 1, 1)
    for name, q in (("q01", 0.01), ("q50", 0.5), ("q99", 0.99)):
        np.testing.assert_allclose(np.asarray(img[name]).ravel(), np.quantile(pixels, q, axis=0), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(img["mean"]).ravel(), pixels.mean(0), rtol=1e-12)
    depth = stats["observation.images.agentview_depth"]  # LeRobot's depth video: per channel, metres
    values = _stack(episodes, "observation.depth.agentview").astype(np.float64)
    assert np.asarray(depth["mean"]).shape == (1, 1, 1) and depth["count"] == [12]
    np.testing.assert_allclose(np.ravel(depth["mean"]), values.mean(), rtol=1e-9)
    np.testing.assert_allclose(np.ravel(depth["max"]), values.max())
    src = LeRobotEpisodeSource(video_ds)
    np.testing.assert_allclose(src.stats["observation.state"]["q99"], stats["observation.state"]["q99"])


def test_compute_stats_matches_numpy():
    rng = np.random.default_rng(3)
    arrays = {"x": rng.standard_normal((50, 4)), "s": rng.standard_normal(50),
              "observation.images.c": rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)}
    stats = compute_stats(arrays)
    assert set(stats["x"]) == {"min", "max", "mean", "std", "count", "q01", "q10", "q50", "q90", "q99"}
    np.testing.assert_allclose(stats["x"]["q10"], np.quantile(arrays["x"], 0.1, axis=0))
    assert stats["s"]["q90"].shape == (1,) and stats["x"]["count"].tolist() == [50]
    px = arrays["observation.images.c"].reshape(-1, 3) / 255.0
    for name, q in (("q01", 0.01), ("q10", 0.1), ("q50", 0.5), ("q90", 0.9), ("q99", 0.99)):
        np.testing.assert_allclose(stats["observation.images.c"][name].ravel(), np.quantile(px, q, axis=0))
    np.testing.assert_allclose(stats["observation.images.c"]["std"].ravel(), px.std(0))


# ---- on-disk layout (B.1-B.6) ---------------------------------------------------------------


def test_layout_matches_spec(video_ds):
    info = json.loads((video_ds / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == FPS
    assert (info["total_episodes"], info["total_frames"], info["total_tasks"]) == (2, 12, 2)
    assert info["splits"] == {"train": "0:2"} and info["robot_type"] == "panda"
    assert list(info["features"])[:2] == ["observation.images.agentview", "observation.images.wrist"]
    vinfo = info["features"]["observation.images.wrist"]["info"]
    assert vinfo["video.pix_fmt"] == "yuv420p" and vinfo["video.codec"] in ("av1", "h264")
    assert vinfo["is_depth_map"] is False and vinfo["has_audio"] is False
    for key in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
        assert info["features"][key]["shape"] == [1]
    data = video_ds / "data/chunk-000/file-000.parquet"
    table = pq.read_table(data)
    assert pq.ParquetFile(data).num_row_groups == 2  # one row group per episode
    assert table.column("index").to_pylist() == list(range(12))
    assert table.column("frame_index").to_pylist() == [*range(5), *range(7)]
    np.testing.assert_allclose(table.column("timestamp").to_numpy(), np.r_[np.arange(5), np.arange(7)] / FPS)
    assert "observation.images.wrist" not in table.column_names
    assert str(table.schema.field("observation.state").type) == "fixed_size_list<element: float>[8]"
    assert b"huggingface" in table.schema.metadata
    tasks = pq.read_table(video_ds / "meta/tasks.parquet")
    assert tasks.column("task").to_pylist() == list(TASKS)
    assert json.loads(tasks.schema.metadata[b"pandas"])["index_columns"] == ["task"]
    eps = pq.read_table(video_ds / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [(r["dataset_from_index"], r["dataset_to_index"], r["length"]) for r in eps] == [(0, 5, 5), (5, 12, 7)]
    assert eps[1]["videos/observation.images.wrist/from_timestamp"] == pytest.approx(0.5)
    assert eps[1]["videos/observation.images.wrist/to_timestamp"] == pytest.approx(1.2)
    assert eps[0]["tasks"] == [TASKS[0]] and eps[0]["stats/observation.state/count"] == [5]
    assert (video_ds / "videos/observation.images.wrist/chunk-000/file-000.mp4").is_file()
    assert not list(video_ds.parent.glob(".ds.*"))  # no staging leftovers


def test_file_rollover(tmp_path, episodes):
    root = _write(tmp_path / "ds", episodes, _features(), chunks_size=2,
                  data_files_size_in_mb=0.001, video_files_size_in_mb=0.001)
    assert (root / "data/chunk-000/file-001.parquet").is_file()
    assert (root / "videos/observation.images.agentview/chunk-000/file-001.mp4").is_file()
    assert (root / "videos/observation.images.agentview_depth/chunk-000/file-001.mp4").is_file()
    src = LeRobotEpisodeSource(root)
    _check_common(src, episodes)
    got = src.frame(1, 3, ["observation.images.agentview"])["observation.images.agentview"]
    assert np.abs(got.astype(int) - episodes[1][3]["observation.images.agentview"]).mean() < MP4_MEAN_TOL


# ---- LIBERO naming (B.12) -------------------------------------------------------------------

LIBERO_NAMES = {"observation.images.agentview": "observation.images.image",
                "observation.images.wrist": "observation.images.image2"}


def test_libero_names_map_to_canonical(tmp_path):
    libero = _episodes(seed=1, names=LIBERO_NAMES)
    image = {"dtype": "image", "shape": [64, 64, 3], "names": ["height", "width", "channel"]}
    feats = {"observation.images.image": image,
             "observation.images.image2": image,
             "observation.state": {"dtype": "float32", "shape": [8], "names": {"motors": [f"s{i}" for i in range(8)]}},
             "action": {"dtype": "float32", "shape": [7], "names": {"motors": [f"a{i}" for i in range(7)]}},
             "observation.depth.agentview": {"dtype": "float32", "shape": [64, 64], "names": None}}
    root = _write(tmp_path / "libero", libero, feats, video=False)
    src = LeRobotEpisodeSource(root)
    assert src.cameras == ["agentview", "wrist"]
    frame = src.frame(1, 2)
    np.testing.assert_array_equal(frame["observation.images.agentview"], libero[1][2]["observation.images.image"])
    np.testing.assert_array_equal(frame["observation.images.wrist"], libero[1][2]["observation.images.image2"])
    assert frame["observation.state"].shape == (8,) and frame["action"].shape == (7,)
    assert "observation.images.agentview" in src.stats
    custom = LeRobotEpisodeSource(root, camera_map={"observation.images.image": "front"})
    assert custom.cameras == ["front", "wrist"]


def test_camera_order_follows_camera_keys(tmp_path, episodes):
    root = _write(tmp_path / "ds", episodes, _features(video=False), video=False, camera_keys=["wrist", "agentview"])
    assert LeRobotEpisodeSource(root).cameras == ["wrist", "agentview"]


# ---- interruption safety --------------------------------------------------------------------


def _start(root: Path, episodes, **kwargs) -> LeRobotWriter:
    writer = LeRobotWriter(root, FPS, _features(video=False), video=False, **kwargs)
    for frame in episodes[0]:
        writer.add_frame(frame)
    writer.save_episode(TASKS[0])
    writer.add_frame(episodes[1][0])
    return writer


def test_unfinalized_writer_leaves_nothing_that_opens(tmp_path, episodes):
    root = tmp_path / "ds"
    writer = _start(root, episodes)
    partial = list(tmp_path.glob(".ds.partial-*"))
    assert not root.exists() and len(partial) == 1
    with pytest.raises(LeRobotFormatError, match="info.json"):
        LeRobotEpisodeSource(partial[0])  # the work folder itself never looks finished
    with pytest.raises(LeRobotFormatError, match="not found"):
        LeRobotEpisodeSource(root)
    writer.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_crash_keeps_previous_dataset(tmp_path, png_ds, episodes, exc):
    root = _copy(png_ds, tmp_path)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    with pytest.raises(exc):
        with LeRobotWriter(root, FPS, _features(video=False), video=False, overwrite=True) as writer:
            writer.add_frame(episodes[0][0])
            writer.save_episode("other")
            raise exc()
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    assert LeRobotEpisodeSource(root).task(1) == TASKS[1]
    assert [p.name for p in tmp_path.iterdir()] == ["copy"]


def test_crash_during_finalize_keeps_previous_dataset(tmp_path, png_ds, episodes, monkeypatch):
    root = _copy(png_ds, tmp_path)
    writer = _start(root, episodes, overwrite=True)
    writer.save_episode(TASKS[1])

    def boom(self):
        raise OSError("disk full")

    monkeypatch.setattr(LeRobotWriter, "_write_episodes", boom)
    with pytest.raises(OSError, match="disk full"):
        writer.finalize()
    assert LeRobotEpisodeSource(root).num_episodes == 2
    assert [p.name for p in tmp_path.iterdir()] == ["copy"]


def test_overwrite_replaces_on_finalize(tmp_path, png_ds, episodes):
    root = _copy(png_ds, tmp_path)
    with pytest.raises(FileExistsError):
        LeRobotWriter(root, FPS, _features(video=False), video=False)
    with LeRobotWriter(root, FPS, _features(video=False), video=False, overwrite=True) as writer:
        writer.add_frame(episodes[0][0])
        writer.save_episode("only")
    src = LeRobotEpisodeSource(root)
    assert src.num_episodes == 1 and src.task(0) == "only"
    assert [p.name for p in tmp_path.iterdir()] == ["copy"]


# ---- bad input ------------------------------------------------------------------------------


def test_missing_info_json(tmp_path, png_ds):
    root = _copy(png_ds, tmp_path)
    (root / "meta/info.json").unlink()
    with pytest.raises(LeRobotFormatError, match="info.json: missing"):
        LeRobotEpisodeSource(root)


def test_v21_info_refused(tmp_path, png_ds):
    root = _copy(png_ds, tmp_path)
    _edit_json(root / "meta/info.json", lambda i: i.update(codebase_version="v2.1"))
    with pytest.raises(LeRobotFormatError, match=r"expected 'v3.0', found 'v2.1'.*convert"):
        LeRobotEpisodeSource(root)


def test_counts_disagreeing_with_files(tmp_path, png_ds):
    root = _copy(png_ds, tmp_path)
    _edit_json(root / "meta/info.json", lambda i: i.update(total_frames=13))
    with pytest.raises(LeRobotFormatError, match="total_frames=13"):
        LeRobotEpisodeSource(root)


def test_missing_files(tmp_path, video_ds):
    root = _copy(video_ds, tmp_path)
    (root / "videos/observation.images.wrist/chunk-000/file-000.mp4").unlink()
    with pytest.raises(LeRobotFormatError, match="file-000.mp4: missing"):
        LeRobotEpisodeSource(root)
    (root / "data/chunk-000/file-000.parquet").unlink()
    with pytest.raises(LeRobotFormatError, match="missing"):
        LeRobotEpisodeSource(root)


def test_dtype_and_shape_disagreeing_with_info(tmp_path, png_ds):
    root = _copy(png_ds, tmp_path)
    _edit_json(root / "meta/info.json", lambda i: i["features"]["observation.state"].update(dtype="float64"))
    with pytest.raises(LeRobotFormatError, match=r"'observation.state' dtype expected float64.*found float"):
        LeRobotEpisodeSource(root)
    root2 = _copy(png_ds, tmp_path / "b")
    _edit_json(root2 / "meta/info.json", lambda i: i["features"]["action"].update(shape=[6]))
    with pytest.raises(LeRobotFormatError, match="'action' expected length 6"):
        LeRobotEpisodeSource(root2)


def test_stats_not_matching_features(tmp_path, png_ds):
    root = _copy(png_ds, tmp_path)
    _edit_json(root / "meta/stats.json", lambda s: s.update(bogus=s["action"]))
    with pytest.raises(LeRobotFormatError, match="'bogus'"):
        LeRobotEpisodeSource(root)
    root2 = _copy(png_ds, tmp_path / "b")
    _edit_json(root2 / "meta/stats.json", lambda s: s["action"].update(mean=[0.0] * 6))
    with pytest.raises(LeRobotFormatError, match=r"'action' mean expected shape \(7,\), found \(6,\)"):
        LeRobotEpisodeSource(root2)


def test_caller_requiring_missing_feature(png_ds):
    src = LeRobotEpisodeSource(png_ds)
    with pytest.raises(LeRobotFormatError, match="observation.extrinsics.wrist"):
        src.frame(0, 0, ["observation.extrinsics.wrist"])
    with pytest.raises(IndexError):
        src.frame(0, 5)


def test_bad_frames_rejected(tmp_path, episodes):
    writer = LeRobotWriter(tmp_path / "ds", FPS, _features(video=False), video=False)
    frame = dict(episodes[0][0])
    del frame["action"]
    with pytest.raises(LeRobotFormatError, match=r"missing declared features \['action'\]"):
        writer.add_frame(frame)
    frame = {**episodes[0][0], "observation.state": episodes[0][0]["observation.state"].astype(np.float64)}
    with pytest.raises(LeRobotFormatError, match="'observation.state': expected dtype float32, found float64"):
        writer.add_frame(frame)
    frame = {**episodes[0][0], "observation.images.wrist": np.zeros((32, 64, 3), np.uint8)}
    with pytest.raises(LeRobotFormatError, match=r"expected shape \(64, 64, 3\), found \(32, 64, 3\)"):
        writer.add_frame(frame)
    with pytest.raises(LeRobotFormatError, match="undeclared"):
        writer.add_frame({**episodes[0][0], "observation.extra": np.zeros(2, np.float32)})
    with pytest.raises(LeRobotFormatError, match="no frames"):
        writer.save_episode("x")
    writer.add_frame(episodes[0][0])
    with pytest.raises(LeRobotFormatError, match="not saved"):
        writer.finalize()
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_source_pickles_after_use(video_ds, episodes):
    import pickle

    src = LeRobotEpisodeSource(video_ds)
    first = src.frame(1, 2, ["observation.images.agentview"])["observation.images.agentview"]
    clone = pickle.loads(pickle.dumps(src))
    again = clone.frame(1, 2, ["observation.images.agentview"])["observation.images.agentview"]
    np.testing.assert_array_equal(first, again)
