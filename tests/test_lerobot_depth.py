"""Depth as LeRobot 0.6 stores it (issue 21): the 12-bit log-quantised HEVC depth video, both ways.

The LeRobot formulas are transcribed here a second time, literally from `lerobot/datasets/depth_utils.py`
(v0.6.1), so the project's `depth.py` is checked against an independent copy; the fixture dataset is
written by this file with PyAV and LeRobot's documented settings (not by our writer). The cross-check
against LeRobot itself (its `LeRobotDataset` reading our files, and our reader on files it wrote: equal
bit for bit) is recorded in docs/data-formats.md; LeRobot needs Python >= 3.12 and is no dependency.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")
pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from spatial_forcing.data.lerobot import (  # noqa: E402
    LeRobotEpisodeSource,
    LeRobotFormatError,
    LeRobotWriter,
    canonical_features,
)
from spatial_forcing.data.lerobot.depth import DepthQuantizer  # noqa: E402

FPS = 10
H, W = 48, 64
LENGTHS = (5, 7)
# LeRobot 0.6.1: DepthEncoderConfig defaults and what get_video_info records for a depth stream
LEROBOT_OPTIONS = {"g": "2", "crf": "30", "x265-params": "lossless=1"}
LEROBOT_DEPTH_INFO = {"is_depth_map": True, "depth_unit": "mm", "video.height": H, "video.width": W,
                      "video.codec": "hevc", "video.pix_fmt": "gray12le", "video.fps": FPS, "video.channels": 1,
                      "has_audio": False, "video.g": 2, "video.crf": 30, "video.preset": None, "video.fast_decode": 0,
                      "video.video_backend": "pyav", "video.extra_options": {"x265-params": "lossless=1"},
                      "video.depth_min": 0.01, "video.depth_max": 10.0, "video.shift": 3.5, "video.use_log": True}


def lerobot_quantize(depth: np.ndarray, unit: str) -> np.ndarray:
    """`quantize_depth` (log mode, defaults): the parameters in the frames' unit, float32 maths."""
    f = 1.0 if unit == "m" else 1000.0
    d = depth.astype(np.float32)
    d_min, d_max, shift = np.float32(0.01 * f), np.float32(10.0 * f), np.float32(3.5 * f)
    log_min, log_max = math.log(float(d_min + shift)), math.log(float(d_max + shift))
    norm = (np.log(d + shift) - log_min) / (log_max - log_min)
    return np.rint(norm * 4095).clip(0, 4095).astype(np.uint16)


def lerobot_dequantize_m(codes: np.ndarray) -> np.ndarray:
    """`dequantize_depth(..., output_unit="m")`, in float64 (compared with a float32 tolerance)."""
    log_min = math.log(0.01 + 3.5)
    step = (math.log(10.0 + 3.5) - log_min) / 4095
    return np.clip(np.exp(codes.astype(np.float64) * step + log_min) - 3.5, 0.01, 10.0)


def half_step_m(depth_m: np.ndarray) -> np.ndarray:
    """The quantisation bound: half a step in log space, at each depth (metres)."""
    return (np.asarray(depth_m, np.float64) + 3.5) * math.expm1((math.log(13.5) - math.log(3.51)) / 4095 / 2) + 2e-6


def scene_mm(e: int, t: int) -> np.ndarray:
    """A RealSense-like uint16 millimetre frame: a sloped floor, a box with sharp edges, one hole (0)."""
    yy, xx = np.mgrid[0:H, 0:W]
    d = 600.0 + 35.0 * yy + 4.0 * xx + 30.0 * t + 200.0 * e
    d[10:26, 20 + t:40 + t] = 450.0 + 10.0 * t
    d[0, 0] = 0  # no reading
    return d.astype(np.uint16)


# ---------------------------------------------------------------- our writer -> our reader (and LeRobot's layout)
@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("ours") / "ds"
    feats = canonical_features({"agentview": (H, W), "wrist": (H, W)}, 8, 7, depth=True)
    frames = []
    with LeRobotWriter(root, FPS, feats, robot_type="panda", camera_keys=["agentview", "wrist"]) as w:
        for e, n in enumerate(LENGTHS):
            for t in range(n):
                f = {"observation.state": rng.standard_normal(8).astype(np.float32),
                     "action": rng.standard_normal(7).astype(np.float32)}
                for c in ("agentview", "wrist"):
                    f[f"observation.images.{c}"] = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
                    depth = scene_mm(e, t).astype(np.float32) / 1000.0
                    depth[5:9, 5:9] = rng.uniform(0.2, 9.0, (4, 4))  # fine detail: noise
                    depth[-1, -1] = 14.0  # beyond depth_max: clamps to 10 m
                    f[f"observation.depth.{c}"] = depth  # the canonical key is accepted for the depth video
                w.add_frame(f)
                frames.append(f)
            w.save_episode(task=f"task {e}")
    return root, frames


def test_our_depth_video_is_lerobots_layout_and_reads_back_within_the_bound(ours):
    root, frames = ours
    info = json.loads((root / "meta/info.json").read_text())
    spec = info["features"]["observation.images.agentview_depth"]
    assert spec["dtype"] == "video" and spec["shape"] == [H, W, 1]
    got = spec["info"]
    assert set(got) == set(LEROBOT_DEPTH_INFO)  # the keys LeRobot records, no more, no fewer
    assert {k: got[k] for k in got if k not in ("video.g", "video.extra_options", "depth_unit")} == \
        {k: v for k, v in LEROBOT_DEPTH_INFO.items() if k not in ("video.g", "video.extra_options", "depth_unit")}
    assert got["depth_unit"] == "m" and got["video.g"] == 1  # float metres; intra-only (see DepthEncoding)
    assert "lossless=1" in got["video.extra_options"]["x265-params"]
    assert "observation.depth.agentview" not in info["features"]  # no parquet copy
    src = LeRobotEpisodeSource(root)
    assert src.cameras == ["agentview", "wrist"]
    assert src.features["observation.depth.wrist"]["shape"] == [H, W]
    q = DepthQuantizer()
    order = [(e, t) for e, n in enumerate(LENGTHS) for t in range(n)]
    for i in np.random.default_rng(1).permutation(len(order)):  # random access, backwards too
        e, t = order[i]
        want = frames[i]["observation.depth.wrist"]
        depth = src.frame(e, t, ["observation.depth.wrist"])["observation.depth.wrist"]
        assert depth.dtype == np.float32 and depth.shape == (H, W)
        codes = src._video_frame(e, t, "observation.images.wrist_depth", depth=True)
        np.testing.assert_array_equal(codes, lerobot_quantize(want, "m"))  # lossless video: the codes survive
        np.testing.assert_allclose(depth, lerobot_dequantize_m(codes), rtol=0, atol=2e-6)
        inside = (want >= 0.01) & (want <= 10.0)
        assert (np.abs(depth - want)[inside] <= half_step_m(want)[inside]).all()
        assert depth[0, 0] == pytest.approx(0.01, abs=1e-5) and depth[-1, -1] == pytest.approx(10.0, abs=1e-5)
        assert np.array_equal(depth, q.dequantize(q.quantize(want)))
    stats = json.loads((root / "meta/stats.json").read_text())["observation.images.wrist_depth"]
    values = np.stack([f["observation.depth.wrist"] for f in frames]).astype(np.float64)
    assert np.shape(stats["mean"]) == (1, 1, 1) and stats["count"] == [12]
    np.testing.assert_allclose(np.ravel(stats["mean"]), values.mean(), rtol=1e-9)


def test_depth_input_errors(tmp_path):
    feats = canonical_features({"agentview": (H, W)}, 8, 7, depth=True)
    frame = {"observation.state": np.zeros(8, np.float32), "action": np.zeros(7, np.float32),
             "observation.images.agentview": np.zeros((H, W, 3), np.uint8)}
    for bad, message in ((np.full((H, W), np.nan, np.float32), "non-finite"),
                         (np.zeros((H, W), np.uint16), "metres as floats"),
                         (np.zeros((H + 1, W), np.float32), "shape")):
        w = LeRobotWriter(tmp_path / "ds", FPS, feats)
        with pytest.raises(LeRobotFormatError, match=message):
            w.add_frame({**frame, "observation.depth.agentview": bad})
        w.abort()
    with pytest.raises(ValueError, match="needs video=True"):
        canonical_features({"agentview": (H, W)}, 8, 7, depth=True, depth_format="video", video=False)
    with pytest.raises(ValueError, match="depth_format"):
        canonical_features({"agentview": (H, W)}, 8, 7, depth=True, depth_format="png")
    # the lossless options stay: float32 columns, exact
    feats = canonical_features({"agentview": (H, W)}, 8, 7, depth=True, depth_format="float32")
    assert feats["observation.depth.agentview"]["dtype"] == "float32"
    assert "observation.images.agentview_depth" not in feats


# ---------------------------------------------------------------- a dataset in LeRobot's exact layout -> our reader
def add_lerobot_depth_video(root: Path, key: str, source: list[np.ndarray], lengths=LENGTHS) -> list[np.ndarray]:
    """Add a depth camera to a v3 dataset the way LeRobot 0.6.1 records one (uint16 millimetre frames):
    `key`'s feature with the info `get_video_info` writes, one continuous HEVC stream with LeRobot's
    `DepthEncoderConfig` settings (B-frames and all) written here with PyAV, its `videos/<key>/...`
    columns in the episodes table and its statistics in millimetres. Returns the 12-bit codes."""
    h, w = source[0].shape
    codes = [lerobot_quantize(d, "mm") for d in source]
    path = root / f"videos/{key}/chunk-000/file-000.mp4"
    path.parent.mkdir(parents=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream("hevc", FPS, options={**LEROBOT_OPTIONS, "x265-params": "lossless=1:log-level=error"})
        s.pix_fmt, s.width, s.height, s.time_base = "gray12le", w, h, Fraction(1, FPS)
        for i, q in enumerate(codes):
            frame = av.VideoFrame.from_ndarray(q, format="gray12le")
            frame.pts, frame.time_base = i, Fraction(1, FPS)
            for packet in s.encode(frame):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    info_path = root / "meta/info.json"
    info = json.loads(info_path.read_text())
    feats = list(info["features"].items())
    feats.insert(1, (key, {"dtype": "video", "shape": [h, w, 1], "names": ["height", "width", "channels"],
                           "info": {**LEROBOT_DEPTH_INFO, "video.height": h, "video.width": w}}))
    info["features"] = dict(feats)
    info["video_path"] = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    info_path.write_text(json.dumps(info, indent=4))
    (episodes_file,) = (root / "meta/episodes").rglob("*.parquet")
    table = pq.read_table(episodes_file)
    starts = np.cumsum([0, *lengths])[:-1] / FPS
    for name, values in (("chunk_index", [0] * len(lengths)), ("file_index", [0] * len(lengths)),
                         ("from_timestamp", list(starts)), ("to_timestamp", list(starts + np.array(lengths) / FPS))):
        table = table.append_column(f"videos/{key}/{name}", pa.array(values))
    pq.write_table(table, episodes_file)
    stats_path = root / "meta/stats.json"
    stats = json.loads(stats_path.read_text())
    mm = np.stack(source).astype(np.float64)
    stats[key] = {"min": [[[mm.min()]]], "max": [[[mm.max()]]], "mean": [[[mm.mean()]]], "std": [[[mm.std()]]],
                  "count": [len(source)], **{f"q{q:02d}": [[[float(np.quantile(mm, q / 100))]]]
                                             for q in (1, 10, 50, 90, 99)}}
    stats_path.write_text(json.dumps(stats))
    with av.open(str(path)) as c:  # the fixture is valid only if the stream holds the codes (smooth depth does)
        decoded = [f.to_ndarray(format="gray12le") for f in c.decode(video=0)]
    assert all(np.array_equal(a, b) for a, b in zip(decoded, codes, strict=True))
    return codes


@pytest.fixture(scope="module")
def theirs(tmp_path_factory):
    """What LeRobot 0.6.1 writes for a robot with an RGB camera `front` and its RealSense depth
    `front_depth` (uint16 mm): the non-depth parts through our PNG writer, the depth stream and its
    metadata by hand with PyAV and LeRobot's settings (B-frames and all, one continuous stream)."""
    rng = np.random.default_rng(2)
    root = tmp_path_factory.mktemp("theirs") / "ds"
    feats = canonical_features({"front": (H, W)}, 8, 7, video=False)
    with LeRobotWriter(root, FPS, feats, robot_type="so101_follower", video=False) as w:
        for e, n in enumerate(LENGTHS):
            for _ in range(n):
                w.add_frame({"observation.images.front": rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
                             "observation.state": rng.standard_normal(8).astype(np.float32),
                             "action": rng.standard_normal(7).astype(np.float32)})
            w.save_episode(task=f"task {e}")
    source = [scene_mm(e, t) for e, n in enumerate(LENGTHS) for t in range(n)]
    codes = add_lerobot_depth_video(root, "observation.images.front_depth", source)
    return root, source, codes


def test_a_lerobot_depth_video_reads_as_metric_depth(theirs):
    root, source, codes = theirs
    src = LeRobotEpisodeSource(root)
    assert src.cameras == ["front"]  # the depth stream is not a camera: it is front's depth
    assert "observation.depth.front" in src.features and src.features["observation.depth.front"]["dtype"] == "float32"
    order = [(e, t) for e, n in enumerate(LENGTHS) for t in range(n)]
    for i in np.random.default_rng(3).permutation(len(order)):  # random access into a B-frame stream
        e, t = order[i]
        depth = src.frame(e, t)["observation.depth.front"]
        np.testing.assert_allclose(depth, lerobot_dequantize_m(codes[i]), rtol=0, atol=2e-6)
        want = source[i] / 1000.0
        inside = want >= 0.01
        assert (np.abs(depth - want)[inside] <= half_step_m(want)[inside]).all()
        assert depth[0, 0] == pytest.approx(0.01, abs=1e-5)  # a sensor's "no reading" is LeRobot's lower clamp
    stats = json.loads((root / "meta/stats.json").read_text())["observation.images.front_depth"]
    np.testing.assert_allclose(src.stats["observation.depth.front"]["mean"].ravel(), np.ravel(stats["mean"]) / 1000)
    assert src.stats["observation.depth.front"]["count"].tolist() == [12]
    renamed = LeRobotEpisodeSource(root, camera_map={"front": "agentview"})
    assert renamed.cameras == ["agentview"] and "observation.depth.agentview" in renamed.features
    # LeRobot records no intrinsics: the geometry teacher gets them given (sf train --intrinsic front=K.json)
    k = [[50.0, 0.0, 31.5], [0.0, 50.0, 23.5], [0.0, 0.0, 1.0]]
    given = LeRobotEpisodeSource(root, intrinsics={"front": k})
    np.testing.assert_array_equal(given.frame(1, 3)["observation.intrinsics.front"], np.array(k, np.float32))
    with pytest.raises(LeRobotFormatError, match="no such camera"):
        LeRobotEpisodeSource(root, intrinsics={"wrist": k})


def test_older_depth_markers_and_names(theirs, tmp_path):
    """The legacy `video.is_depth_map` marker, no `depth_unit`, and a depth stream that belongs to no RGB
    camera (named by itself)."""
    import shutil

    root = Path(shutil.copytree(theirs[0], tmp_path / "ds"))
    info = json.loads((root / "meta/info.json").read_text())
    spec = info["features"]["observation.images.front_depth"]
    spec["info"]["video.is_depth_map"] = spec["info"].pop("is_depth_map")
    del spec["info"]["depth_unit"]
    (root / "meta/info.json").write_text(json.dumps(info))
    src = LeRobotEpisodeSource(root, camera_map={"observation.images.front_depth": "ceiling"})
    assert src.cameras == ["front"] and "observation.depth.ceiling" in src.features
    np.testing.assert_allclose(src.frame(1, 2)["observation.depth.ceiling"], lerobot_dequantize_m(theirs[2][7]),
                               rtol=0, atol=2e-6)
    spec["info"]["video.depth_max"] = 0.001  # below depth_min: no quantiser
    (root / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(LeRobotFormatError, match="depth_max > depth_min"):
        LeRobotEpisodeSource(root)


# ---------------------------------------------------------------- a LeRobot RGB-D recording -> sf train (SF + geometry)
RIG = ("front", "wrist")  # an SO-101-like arm with two RealSense cameras, each an RGB stream and its `<cam>_depth`
RIG_LENGTHS = (12, 10)
RIG_K = [[52.0, 0.0, 31.5], [0.0, 52.0, 23.5], [0.0, 0.0, 1.0]]  # given: LeRobot records no intrinsics


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A LeRobot 0.6.1 RGB-D recording: RGB video streams (our writer: AV1/H.264, as LeRobot's RGB cameras)
    and, per camera, the depth stream added by hand as LeRobot records it (uint16 mm, hole included)."""
    rng = np.random.default_rng(4)
    root = tmp_path_factory.mktemp("recorded") / "ds"
    source = {c: [] for c in RIG}
    feats = canonical_features({c: (H, W) for c in RIG}, 8, 7)  # no depth: added below in LeRobot's layout
    with LeRobotWriter(root, FPS, feats, robot_type="so101_follower", camera_keys=list(RIG)) as w:
        for e, n in enumerate(RIG_LENGTHS):
            state = rng.standard_normal((n, 8)).astype(np.float32)
            for t in range(n):
                frame = {"observation.state": state[t], "action": np.concatenate(
                    [np.tanh(state[t, :6]), [1.0 if t > n // 2 else -1.0]]).astype(np.float32)}
                for i, c in enumerate(RIG):
                    mm = scene_mm(e, t)
                    mm[mm > 0] += np.uint16(150 * i)  # the wrist camera sees the scene 15 cm further away
                    source[c].append(mm)
                    grey = (255.0 * 450.0 / np.maximum(mm, 450)).astype(np.uint8)
                    frame[f"observation.images.{c}"] = np.repeat(grey[..., None], 3, -1)
                w.add_frame(frame)
            w.save_episode(task=f"put box {e} on the plate")
    for c in RIG:
        add_lerobot_depth_video(root, f"observation.images.{c}_depth", source[c], RIG_LENGTHS)
    return root, source


def test_a_lerobot_rgbd_recording_trains_with_spatial_forcing_and_the_geometry_teacher(recorded, tmp_path):
    """The issue's bar: a dataset LeRobot 0.6 records with depth trains with SF and the geometry teacher.
    Two steps of `Trainer` (the mini student, streaming pipeline) on the recording above: the align loss
    is finite and positive, the depth the teacher was given is the depth video's (12-bit code depths, with
    the given intrinsics rescaled to the student's side), and the geometry teacher's targets from our
    reader's depth equal those from the recorded millimetres within the quantisation bound."""
    import torch
    from test_train import config

    from spatial_forcing.teachers.geometry import GeometryTeacher
    from spatial_forcing.train.loop import Trainer

    root, source = recorded
    intrinsics = {c: RIG_K for c in RIG}
    trainer = Trainer(config(root, tmp_path / "run", cameras=list(RIG), intrinsics=intrinsics, max_steps=2,
                             save_every=2, val_episodes=0), progress=False)
    assert trainer.teacher.name == "geometry" and trainer.sf is not None
    seen, features = [], trainer.teacher.features

    def recording(*args, **inputs):
        seen.append({k: v.detach().cpu().clone() for k, v in inputs.items() if k in ("depth", "intrinsics")})
        return features(*args, **inputs)

    trainer.teacher.features = recording
    summary = trainer.fit()
    assert summary["steps"] == 2
    align = summary["last"]["align_loss"]
    assert math.isfinite(align) and align > 0
    assert len(seen) == 2
    q = DepthQuantizer()
    side = trainer.policy.spec.image_size
    for inputs in seen:
        depth = inputs["depth"].numpy()
        assert depth.shape == (4, len(RIG), side, side) and depth.dtype == np.float32
        # every depth the teacher saw decodes a 12-bit code (nearest resizing keeps the reader's values) ...
        np.testing.assert_array_equal(q.dequantize(q.quantize(depth)), depth)
        k = inputs["intrinsics"].numpy()
        np.testing.assert_allclose(k[..., 0, 0], RIG_K[0][0] * side / W, rtol=1e-5)
        np.testing.assert_allclose(k[..., 1, 1], RIG_K[1][1] * side / H, rtol=1e-5)
    # ... which the recorded millimetres mostly are not: the check above tells the two apart
    metres = np.stack(source["front"]).astype(np.float32) / 1000.0
    assert np.mean(q.dequantize(q.quantize(metres)) == metres) < 0.1

    # the targets: the geometry teacher on our reader's depth vs on the recorded depth (as LeRobot reads a
    # sensor's 0: 0.01 m; invalid for the teacher either way), at the native 48 x 64 on 16-px patches
    teacher, reader = GeometryTeacher(patch_size=16), LeRobotEpisodeSource(root, intrinsics=intrinsics)
    k = torch.tensor([RIG_K, RIG_K])[None]
    v, u = np.mgrid[0:H, 0:W]
    ray = np.sqrt(((u - RIG_K[0][2]) / RIG_K[0][0]) ** 2 + ((v - RIG_K[1][2]) / RIG_K[1][1]) ** 2 + 1.0)
    f_max = 2.0 ** (teacher.config.num_freqs - 1) * math.pi / teacher.config.scale
    order = [(e, t) for e, n in enumerate(RIG_LENGTHS) for t in range(n)]
    for i, (e, t) in enumerate(order):
        frame = reader.frame(e, t)
        video = torch.from_numpy(np.stack([frame[f"observation.depth.{c}"] for c in RIG]))[None]
        truth_m = np.clip(np.stack([source[c][i] for c in RIG]) / 1000.0, 0.01, 10.0)
        truth = torch.from_numpy(truth_m.astype(np.float32))[None]
        p_video, valid_video = teacher.patch_points(video, k)
        p_truth, valid_truth = teacher.patch_points(truth, k)
        assert torch.equal(valid_video, valid_truth) and bool(valid_truth.all())
        bound = float((q.max_error(truth_m) * ray).max())  # |dP| <= max |dd| |ray| over a patch's pixels
        assert float((p_video - p_truth).norm(dim=-1).max()) <= bound
        blank = torch.zeros(1, len(RIG), 3, H, W)
        g_video = teacher.features(blank, depth=video, intrinsics=k)
        g_truth = teacher.features(blank, depth=truth, intrinsics=k)
        assert torch.equal(g_video.valid, g_truth.valid)
        sincos = 6 * teacher.config.num_freqs  # sin and cos are f-Lipschitz in each coordinate
        assert float((g_video.feats - g_truth.feats)[..., :sincos].abs().max()) <= f_max * bound + 1e-5
