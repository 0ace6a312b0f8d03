"""Scripted LIBERO experts and `collect_libero` on the real simulator (short: one episode)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("libero.libero")

from spatial_forcing.data.lerobot import LeRobotEpisodeSource  # noqa: E402
from spatial_forcing.envs.collect import collect_libero, parse_tasks  # noqa: E402
from spatial_forcing.envs.experts import box_gaps, fresh_env, is_noop, run_expert_episode  # noqa: E402


def test_noop_rule():
    z = np.zeros(7)
    z[6] = -1.0
    assert is_noop(z, None)
    assert is_noop(z, z)
    closing = z.copy()
    closing[6] = 1.0
    assert not is_noop(closing, z)
    moving = z.copy()
    moving[0] = 1e-3
    assert not is_noop(moving, z)


def test_box_gaps_hand_computed():
    eye = np.eye(3)[None]
    half = np.array([[0.5, 0.5, 0.5]])
    assert box_gaps(np.zeros((1, 3)), eye, half, np.array([[2.0, 0.0, 0.0]]), eye, half)[0, 0] == pytest.approx(1.0)
    assert box_gaps(np.zeros((1, 3)), eye, half, np.array([[0.9, 0.0, 0.0]]), eye, half)[0, 0] == pytest.approx(-0.1)
    c, s = np.cos(np.pi / 4), np.sin(np.pi / 4)
    rot45 = np.array([[[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]])
    # a cube turned 45 degrees about z reaches sqrt(0.5) along x
    gap = box_gaps(np.zeros((1, 3)), eye, half, np.array([[1.5, 0.0, 0.0]]), rot45, half)[0, 0]
    assert gap == pytest.approx(1.0 - np.sqrt(0.5))


def test_unknown_suite_and_task():
    with pytest.raises(ValueError, match="valid suites"):
        parse_tasks("libero_nope", "all")
    with pytest.raises(ValueError, match="valid tasks"):
        parse_tasks("libero_object", "no_such_task")
    with pytest.raises(ValueError, match="out of range"):
        parse_tasks("libero_object", "99")
    assert [t.index for t in parse_tasks("libero_object", "0,2")] == [0, 2]
    assert len(parse_tasks("libero_spatial", "all")) == 10


def test_expert_collects_a_readable_dataset(tmp_path):
    out = tmp_path / "ds"
    # two worker processes, attempts consumed in order
    summary = collect_libero("libero_object", "0", 2, out, image_size=64, depth=True, seed=0, video=True,
                             progress=False, max_attempts_factor=1, jobs=2)
    task = summary["tasks"]["pick_up_the_alphabet_soup_and_place_it_in_the_basket"]
    assert task["successes"] == 2 and task["attempts"] == 2  # the expert solves init states 0 and 1
    src = LeRobotEpisodeSource(out)
    assert src.num_episodes == 2
    assert src.cameras == ["agentview", "wrist"]
    # the same episodes as the expert run here without a renderer: workers and rendering change nothing
    for e in range(2):
        with fresh_env("libero_object", 0, e, render=False) as env:
            reference = np.stack(run_expert_episode(env, e, seed=e).actions).astype(np.float32)
        np.testing.assert_array_equal(src.episode_arrays(e, ["action"])["action"], reference)
    length = src.episode_length(0)
    assert length + src.episode_length(1) == 2 * task["mean_length"] == task["env_steps"]  # all recorded
    assert src.task(0) == "pick up the alphabet soup and place it in the basket"
    arrays = src.episode_arrays(0, ["observation.state", "action"])
    assert arrays["observation.state"].shape == (length, 8)
    assert arrays["action"].shape == (length, 7)
    a = arrays["action"]
    assert np.all(np.abs(a) <= 1.0)
    assert a[0, 6] == -1.0 and (a[:, 6] == 1.0).any()  # starts open, closes to grasp
    assert not any(is_noop(a[t], a[t - 1] if t else None) for t in range(length))
    f = src.frame(0, length - 1, ["observation.images.agentview", "observation.depth.wrist",
                                  "observation.intrinsics.agentview", "observation.extrinsics.wrist"])
    assert f["observation.images.agentview"].shape[-3:] in ((64, 64, 3), (3, 64, 64))
    assert f["observation.depth.wrist"].shape[-2:] == (64, 64)
    depth = np.asarray(f["observation.depth.wrist"])
    assert np.all(depth > 0) and np.all(depth < 10)
    assert np.asarray(f["observation.intrinsics.agentview"]).shape == (3, 3)
    assert np.asarray(f["observation.extrinsics.wrist"]).shape == (4, 4)
    # the depth is LeRobot 0.6's depth video: the features LeRobot's `meta.depth_keys` lists (`info.is_depth_map`)
    info = json.loads((out / "meta/info.json").read_text())
    depth_keys = sorted(k for k, ft in info["features"].items() if (ft.get("info") or {}).get("is_depth_map"))
    assert depth_keys == ["observation.images.agentview_depth", "observation.images.wrist_depth"]
    for key in depth_keys:
        spec = info["features"][key]
        assert spec["dtype"] == "video" and spec["shape"] == [64, 64, 1]
        assert (spec["info"]["video.codec"], spec["info"]["video.pix_fmt"], spec["info"]["depth_unit"]) == \
            ("hevc", "gray12le", "m")
        assert len(list((out / "videos" / key).rglob("*.mp4"))) == 1
    assert not [k for k in info["features"] if k.startswith("observation.depth.")]  # no parquet copy
