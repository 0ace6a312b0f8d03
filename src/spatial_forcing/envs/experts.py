"""Scripted pick-and-place experts for LIBERO-Object and LIBERO-Spatial (privileged simulator state).

The expert reads the task's goal from the parsed BDDL problem (``(On obj target)`` /
``(In obj target_region)``), the object and target poses from ``sim.data`` and the objects' collision
geometry from the MuJoCo model, and emits the same 7-D OSC_POSE delta actions a teleoperator produces
(env/raw convention: ``[dx, dy, dz, drx, dry, drz, gripper]`` in [-1, 1], gripper -1 open / +1 close).

Controller scaling (robosuite 1.4 OSC_POSE, LIBERO's default): ``input_max = 1`` maps to
``output_max = 0.05 m`` (position) and ``0.5 rad`` (orientation, axis-angle applied in the world frame:
``R_goal = R(delta) @ R_eef``). The expert is a clipped P-controller on the grip site towards waypoints of
a state machine::

    align/approach above the grasp point -> descend -> close -> lift -> move above the target
    -> descend to the release height -> open -> retreat

Grasps: compact objects (LIBERO-Object groceries) are grasped top-down at their centre, the closing axis
along their narrower horizontal extent; bowls (LIBERO-Spatial) are grasped at the rim, closing radially.
Orientation is held pointing down; only the yaw is changed to align the fingers.

Public API
----------
    parse_goal(raw_env) -> Goal                 (predicate, object name, target name)
    ScriptedExpert(env: LiberoEnv, seed=0)      .reset() after env.reset()/settle(); .act() -> (7,) raw action
                                                .phase, .done (finished its script)
    is_noop(action, prev_kept) -> bool          DATA.md A.5 rule
    run_expert_episode(env, init_index, seed=0, max_steps=None, on_step=None) -> EpisodeResult
    fresh_env(suite, task, layout_seed, **env_kwargs) -> LiberoEnv   one attempt's env, layout from the seed
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from spatial_forcing.envs.libero import OFT_MAX_STEPS, LiberoEnv

ROT_SCALE = 0.5  # radians per unit action
NOOP_EPS = 1e-4
# A position waypoint the arm cannot reach (a descent blocked by the object or the table) counts as
# reached once the grip site has stopped (moved < STALL_MOVE m per step for STALL_STEPS steps) within
# STALL_RADIUS m of it. Without this rule the expert waited out the waypoint's step limit at a standstill
# and then closed the gripper: a timer no observation shows, which a memoryless policy cannot imitate.
STALL_MOVE, STALL_STEPS, STALL_RADIUS = 5e-4, 2, 0.025
GRIPPER_OPEN = -1.0
GRIPPER_CLOSE = 1.0
# Expert step cap: the suite's OFT max (the expert usually needs far fewer).
EXPERT_MAX_STEPS: dict[str, int] = dict(OFT_MAX_STEPS)


def is_noop(action: np.ndarray, prev_kept: np.ndarray | None) -> bool:
    """DATA.md A.5: a no-op iff ``||a[:6]|| < 1e-4`` and (no previous kept action or same gripper)."""
    a = np.asarray(action, dtype=np.float64)
    if np.linalg.norm(a[:6]) >= NOOP_EPS:
        return False
    return prev_kept is None or float(a[6]) == float(np.asarray(prev_kept)[6])


@dataclass(frozen=True)
class Goal:
    predicate: str  # "on" | "in"
    obj: str  # object to pick (an objects_dict name)
    target: str  # object body name (on) or site name (in)


def parse_goal(raw_env: Any) -> Goal:
    """The single pick-and-place goal of a LIBERO-Object/Spatial task from the parsed BDDL problem."""
    env = getattr(raw_env, "env", raw_env)
    goals = env.parsed_problem["goal_state"]
    if len(goals) != 1 or len(goals[0]) != 3 or goals[0][0].lower() not in ("on", "in"):
        raise ValueError(f"scripted expert: expected one (On|In obj target) goal, found {goals}")
    pred, obj, target = goals[0]
    return Goal(pred.lower(), obj, target)


# --------------------------------------------------------------------------------------------------
# Geometry helpers (MuJoCo model/data)
# --------------------------------------------------------------------------------------------------

def _subtree_bodies(model: Any, root: int) -> list[int]:
    parents = np.asarray(model.body_parentid)
    out = [root]
    for b in range(root + 1, model.nbody):
        p = b
        while p > 0 and p != root:
            p = parents[p]
        if p == root:
            out.append(b)
    return out


def body_points(sim: Any, body_id: int) -> np.ndarray:
    """World-frame corners [N, 3] of the collision-geom AABBs of the body subtree `body_id`."""
    m, d = sim.model._model, sim.data._data
    bodies = set(_subtree_bodies(m, body_id))
    geoms = [g for g in range(m.ngeom) if int(m.geom_bodyid[g]) in bodies
             and (int(m.geom_contype[g]) or int(m.geom_conaffinity[g]))]
    if not geoms:  # fall back to every geom
        geoms = [g for g in range(m.ngeom) if int(m.geom_bodyid[g]) in bodies]
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
    pts = []
    for g in geoms:
        aabb = np.asarray(m.geom_aabb[g], dtype=np.float64)
        local = aabb[:3] + signs * aabb[3:]
        rot = np.asarray(d.geom_xmat[g], dtype=np.float64).reshape(3, 3)
        pts.append(np.asarray(d.geom_xpos[g]) + local @ rot.T)
    return np.concatenate(pts, axis=0)


def _yaw_of(v: np.ndarray) -> float:
    return math.atan2(float(v[1]), float(v[0]))


def _wrap_half_pi(a: float) -> float:
    """Wrap an angle between two undirected axes into [-pi/2, pi/2)."""
    return (a + math.pi / 2) % math.pi - math.pi / 2


def _rotz(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _rot_to_axisangle(r: np.ndarray) -> np.ndarray:
    cos = np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0)
    angle = math.acos(cos)
    if angle < 1e-8:
        return np.zeros(3)
    if math.pi - angle < 1e-4:  # near pi: axis from the symmetric part
        w, v = np.linalg.eigh((r + np.eye(3)) / 2.0)
        axis = v[:, int(np.argmax(w))]
        return axis * angle
    axis = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]]) / (2.0 * math.sin(angle))
    return axis * angle


# --------------------------------------------------------------------------------------------------
# Grasp planning: candidate grasps, gripper/obstacle clearance (oriented boxes), reach
# --------------------------------------------------------------------------------------------------

CLEARANCE = 0.004  # metres between the open gripper's collision boxes and any obstacle
SHOULDER_BODY = "robot0_link2"
REACH = 0.74  # flange distance from the shoulder beyond which the Panda nears full extension
FLANGE_ABOVE_GRIP = 0.10
_ROBOT_PREFIXES = ("robot0_", "gripper0_", "mount0_")


@dataclass(frozen=True)
class _Grasp:
    xy: np.ndarray  # grip-site target (world xy)
    z: float
    close_axis: np.ndarray  # horizontal unit vector the fingers close along
    cost: float  # preference among clear grasps (0 = best)


def _grasp_candidates(pts: np.ndarray, is_bowl: bool) -> list[_Grasp]:
    """Grasps of an object whose collision-box corners are `pts`: bowls at the rim (closing radially, 24
    angles); other objects top-down, closing along the narrow footprint axis, centred or shifted along the
    long axis (round ones also at 12 yaws)."""
    lo, hi = pts.min(0), pts.max(0)
    top, height = float(hi[2]), float(hi[2] - lo[2])
    xy = pts[:, :2] - pts[:, :2].mean(0)
    _, v = np.linalg.eigh(xy.T @ xy)
    proj = xy @ v
    half = (proj.max(0) - proj.min(0)) / 2.0
    mid = pts[:, :2].mean(0) + v @ ((proj.max(0) + proj.min(0)) / 2.0)
    out = []
    if is_bowl:
        rim = float(max(half)) - 0.012
        for k in range(24):
            u = np.array([math.cos(2 * math.pi * k / 24), math.sin(2 * math.pi * k / 24)])
            out.append(_Grasp(mid + u * rim, top - 0.025, u, 0.0))
        return out
    z = max(top - min(0.04, 0.6 * height), float(lo[2]) + 0.012)
    narrow = int(np.argmin(half))
    long_axis, short_axis = v[:, 1 - narrow], v[:, narrow]
    if abs(half[0] - half[1]) < 0.004:  # round footprint: any closing direction
        axes = [np.array([math.cos(math.pi * k / 12), math.sin(math.pi * k / 12)]) for k in range(12)]
        return [_Grasp(mid, z, a, 0.001 * k) for k, a in enumerate(axes)]
    shift = max(0.0, float(half[1 - narrow]) - 0.02)
    for s in np.linspace(-shift, shift, 9) if shift > 0 else [0.0]:
        out.append(_Grasp(mid + s * long_axis, z, short_axis, abs(float(s))))
    return out


def _geom_boxes(m: Any, d: Any, geoms: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World oriented boxes (centres [N,3], rotations [N,3,3], half sizes [N,3]) of the geoms' AABBs."""
    g = np.asarray(geoms, dtype=np.int64)
    rot = np.asarray(d.geom_xmat, dtype=np.float64)[g].reshape(-1, 3, 3)
    aabb = np.asarray(m.geom_aabb, dtype=np.float64)[g]
    centre = np.asarray(d.geom_xpos, dtype=np.float64)[g] + np.einsum("nij,nj->ni", rot, aabb[:, :3])
    return centre, rot, aabb[:, 3:]


def box_gaps(ca: np.ndarray, ra: np.ndarray, ha: np.ndarray,
             cb: np.ndarray, rb: np.ndarray, hb: np.ndarray) -> np.ndarray:
    """Separating-axis gap [Na, Nb] between oriented boxes: > 0 means disjoint by at least that much along
    some axis (a lower bound on their distance); <= 0 means they overlap."""
    axa, axb = np.swapaxes(ra, 1, 2), np.swapaxes(rb, 1, 2)  # [N, 3 axes, 3]
    cross = np.cross(axa[:, None, :, None, :], axb[None, :, None, :, :]).reshape(len(ca), len(cb), 9, 3)
    axes = np.concatenate([np.broadcast_to(axa[:, None], (len(ca), len(cb), 3, 3)),
                           np.broadcast_to(axb[None, :], (len(ca), len(cb), 3, 3)), cross], axis=2)
    norm = np.linalg.norm(axes, axis=-1, keepdims=True)
    valid = norm[..., 0] > 1e-6
    axes = axes / np.maximum(norm, 1e-12)
    t = np.abs(np.einsum("abkj,abj->abk", axes, cb[None, :] - ca[:, None]))
    rad_a = np.einsum("abki,ai->abk", np.abs(np.einsum("abkj,aij->abki", axes, axa)), ha)
    rad_b = np.einsum("abki,bi->abk", np.abs(np.einsum("abkj,bij->abki", axes, axb)), hb)
    gap = np.where(valid, t - rad_a - rad_b, -np.inf)
    return gap.max(axis=-1)


class _Scene:
    """The open gripper's collision boxes in the grip-site frame, the obstacles around the object, and the
    shoulder position, captured once per plan."""

    def __init__(self, local: tuple[np.ndarray, np.ndarray, np.ndarray],
                 obstacles: tuple[np.ndarray, np.ndarray, np.ndarray], shoulder: np.ndarray) -> None:
        self.local, self.obstacles, self.shoulder = local, obstacles, shoulder

    @classmethod
    def capture(cls, sim: Any, obj_id: int, site: np.ndarray, r_site: np.ndarray, obj_bottom: float,
                radius: float = 0.35) -> _Scene:
        import mujoco

        m, d = sim.model._model, sim.data._data
        own = set(_subtree_bodies(m, obj_id))
        collide = [g for g in range(m.ngeom) if int(m.geom_contype[g]) or int(m.geom_conaffinity[g])]
        names = [mujoco.mj_id2name(m, mujoco.mjtObj.mjOBJ_BODY, int(m.geom_bodyid[g])) or "" for g in collide]
        grip = [g for g, n in zip(collide, names) if n.startswith("gripper0_")]
        c, r, h = _geom_boxes(m, d, grip)
        local = ((c - site) @ r_site, np.einsum("ji,njk->nik", r_site, r), h)
        others = [g for g, n in zip(collide, names)
                  if not n.startswith(_ROBOT_PREFIXES) and int(m.geom_bodyid[g]) not in own]
        c, r, h = _geom_boxes(m, d, others)
        ext = np.einsum("nij,nj->ni", np.abs(r), h)  # world AABB half extents of each box
        centre_xy = np.asarray(d.xpos[obj_id], dtype=np.float64)[:2]
        near_xy = np.maximum(np.abs(c[:, :2] - centre_xy) - ext[:, :2], 0.0)
        keep = (c[:, 2] + ext[:, 2] > obj_bottom + 0.004) & (np.linalg.norm(near_xy, axis=1) < radius)
        obstacles = (c[keep], r[keep], h[keep])
        shoulder = np.asarray(d.xpos[mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_BODY, SHOULDER_BODY)], np.float64)
        return cls(local, obstacles, shoulder)

    def clearance(self, grip: np.ndarray, r_grip: np.ndarray, rises: tuple[float, ...] = (0.0, 0.03, 0.06, 0.1)
                  ) -> float:
        """Smallest gap between the open gripper (grip site at `grip`, then raised by `rises`, the descent
        path) and any obstacle; +inf without obstacles."""
        if len(self.obstacles[0]) == 0:
            return math.inf
        c_l, r_l, h = self.local
        r_w = np.einsum("ij,njk->nik", r_grip, r_l)
        worst = math.inf
        for dz in rises:
            c_w = grip + np.array([0.0, 0.0, dz]) + c_l @ r_grip.T
            worst = min(worst, float(box_gaps(c_w, r_w, h, *self.obstacles).min()))
        return worst

    def reach_penalty(self, grip: np.ndarray) -> float:
        flange = grip + np.array([0.0, 0.0, FLANGE_ABOVE_GRIP])
        return 50.0 * max(0.0, float(np.linalg.norm(flange - self.shoulder)) - REACH)


# --------------------------------------------------------------------------------------------------
# Expert
# --------------------------------------------------------------------------------------------------

@dataclass
class _Waypoint:
    name: str
    pos: np.ndarray | None  # grip-site target (None: hold position)
    gripper: float
    tol: float = 0.01
    min_steps: int = 0
    max_steps: int = 60


class ScriptedExpert:
    """Pick-and-place state machine for one episode; call ``reset()`` after the env's reset/settle."""

    def __init__(self, env: LiberoEnv, seed: int = 0, *, pos_gain: float = 12.0, rot_gain: float = 1.5):
        self.env = env
        self.rng = np.random.default_rng(seed)
        self.pos_gain = pos_gain
        self.rot_gain = rot_gain
        self.goal = parse_goal(env.raw_env)
        self.phase = "init"
        self.done = False

    # ---- privileged state ----
    @property
    def _rs(self) -> Any:
        return self.env.raw_env.env

    def _eef(self) -> tuple[np.ndarray, np.ndarray]:
        sim = self.env.sim
        return (np.array(sim.data.get_site_xpos("gripper0_grip_site")),
                np.array(sim.data.get_site_xmat("gripper0_grip_site")).reshape(3, 3))

    def _body_id(self, name: str) -> int:
        return int(self._rs.obj_body_id[name])

    def _obj_pos(self) -> np.ndarray:
        return np.array(self.env.sim.data.body_xpos[self._body_id(self.goal.obj)])

    def _finger_axis(self) -> np.ndarray:
        sim = self.env.sim
        left = np.array(sim.data.get_body_xpos("gripper0_leftfinger"))
        right = np.array(sim.data.get_body_xpos("gripper0_rightfinger"))
        v = left - right
        v[2] = 0.0
        n = np.linalg.norm(v)
        return v / n if n > 1e-6 else np.array([0.0, 1.0, 0.0])

    def _target_point(self) -> tuple[np.ndarray, float]:
        """(xy centre where the object should end up, top z of the receiving surface/rim)."""
        sim = self.env.sim
        if self.goal.predicate == "in":
            site = np.array(sim.data.get_site_xpos(self.goal.target))
            parent = self.goal.target.rsplit("_contain_region", 1)[0]
            if parent in self._rs.obj_body_id:
                top = float(body_points(sim, self._body_id(parent))[:, 2].max())
            else:
                top = float(site[2]) + 0.05
            return site, top
        bid = self._body_id(self.goal.target)
        pts = body_points(sim, bid)
        return np.array(sim.data.body_xpos[bid]), float(pts[:, 2].max())

    # ---- planning ----
    def reset(self) -> None:
        sim = self.env.sim
        eef, r_eef = self._eef()
        obj_id = self._body_id(self.goal.obj)
        pts = body_points(sim, obj_id)
        scene = _Scene.capture(sim, obj_id, eef, r_eef, float(pts[:, 2].min()))
        centre, _ = self._target_point()
        to_target = centre[:2] - pts[:, :2].mean(0)  # the object's move, applied to the grip point
        finger_yaw = _yaw_of(self._finger_axis())
        best = None
        for cand in _grasp_candidates(pts, "bowl" in self.goal.obj):
            dyaw = _wrap_half_pi(_yaw_of(cand.close_axis) - finger_yaw)
            r_goal = self._downright(_rotz(dyaw) @ r_eef)
            grasp = np.array([cand.xy[0], cand.xy[1], cand.z])
            place = np.array([*(cand.xy + to_target), cand.z + 0.05])
            gap = scene.clearance(grasp, r_goal)
            cost = (cand.cost + 0.02 * abs(dyaw) + scene.reach_penalty(grasp) + scene.reach_penalty(place)
                    + (0.0 if gap >= CLEARANCE else 10.0 + 100.0 * (CLEARANCE - gap)))
            if best is None or cost < best[0]:
                best = (cost, grasp, r_goal)
        _, grasp, self.r_goal = best
        jitter = self.rng.uniform(-0.005, 0.005, size=3)
        self.grasp = grasp + np.array([jitter[0], jitter[1], 0.0]) * 0.4
        self.approach_h = 0.10 + float(jitter[2])
        self.waypoints: list[_Waypoint] = [
            _Waypoint("approach", self.grasp + [0, 0, self.approach_h], GRIPPER_OPEN, tol=0.012, max_steps=70),
            _Waypoint("descend", self.grasp, GRIPPER_OPEN, tol=0.006, max_steps=40),
            _Waypoint("close", None, GRIPPER_CLOSE, min_steps=12, max_steps=12),
            _Waypoint("lift", None, GRIPPER_CLOSE, tol=0.015, max_steps=40),
        ]
        self._wp = 0
        self._wp_steps = 0
        self._hold: np.ndarray | None = None
        self._prev_eef: np.ndarray | None = None
        self._still = 0
        self.phase = self.waypoints[0].name
        self.done = False
        self._planned_place = False

    @staticmethod
    def _downright(r: np.ndarray) -> np.ndarray:
        """Project a rotation so that its z axis points straight down, keeping its yaw."""
        x = r[:, 0].copy()
        x[2] = 0.0
        x /= np.linalg.norm(x)
        z = np.array([0.0, 0.0, -1.0])
        y = np.cross(z, x)
        return np.stack([x, y, z], axis=1)

    def _plan_place(self) -> None:
        """After the lift: waypoints above the target and down to the release height."""
        eef, _ = self._eef()
        obj = self._obj_pos()
        pts = body_points(self.env.sim, self._body_id(self.goal.obj))
        offset = eef - obj  # grip site relative to the object body
        bottom_rel = float(pts[:, 2].min()) - eef[2]  # object bottom relative to the grip site
        centre, top = self._target_point()
        if self.goal.predicate == "in":
            release_bottom = top + 0.015
            xy = centre[:2] + offset[:2]
        else:  # on a plate: lower until the bowl almost touches
            release_bottom = top + 0.01
            xy = centre[:2] + offset[:2]
        release_z = release_bottom - bottom_rel
        carry_z = max(release_z + 0.06, eef[2])
        self.waypoints += [
            _Waypoint("carry", np.array([xy[0], xy[1], carry_z]), GRIPPER_CLOSE, tol=0.01, max_steps=90),
            _Waypoint("lower", np.array([xy[0], xy[1], release_z]), GRIPPER_CLOSE, tol=0.008, max_steps=40),
            _Waypoint("open", None, GRIPPER_OPEN, min_steps=8, max_steps=8),
            _Waypoint("retreat", np.array([xy[0], xy[1], release_z + 0.10]), GRIPPER_OPEN, tol=0.02, max_steps=40),
        ]
        self._planned_place = True

    # ---- control ----
    def act(self) -> np.ndarray:
        """The next raw 7-D action (call once per env step)."""
        eef, r_eef = self._eef()
        if self._wp >= len(self.waypoints):
            self.done = True
            self.phase = "done"
            self._wp_steps += 1
            return np.array([0.0, 0.0, 0.05, 0.0, 0.0, 0.0, GRIPPER_OPEN])
        wp = self.waypoints[self._wp]
        self.phase = wp.name
        if wp.name == "lift" and wp.pos is None:
            wp.pos = eef + np.array([0.0, 0.0, max(0.0, self.grasp[2] + 0.12 - eef[2])])
        target = wp.pos
        if target is None:
            if self._hold is None:
                self._hold = eef.copy()
            target = self._hold
        err = target - eef
        a = np.zeros(7)
        a[:3] = np.clip(self.pos_gain * err, -1.0, 1.0)
        rot_err = _rot_to_axisangle(self.r_goal @ r_eef.T)
        a[3:6] = np.clip(self.rot_gain * rot_err / ROT_SCALE, -1.0, 1.0)
        a[6] = wp.gripper
        self._wp_steps += 1
        reached = wp.pos is None or np.linalg.norm(err) < wp.tol
        moved = np.inf if self._prev_eef is None else float(np.linalg.norm(eef - self._prev_eef))
        self._prev_eef = eef.copy()
        self._still = self._still + 1 if moved < STALL_MOVE else 0
        if wp.pos is not None and self._still >= STALL_STEPS and np.linalg.norm(err) < STALL_RADIUS:
            reached = True  # blocked short of the target (see STALL_MOVE)
        if wp.name in ("approach", "descend"):
            reached = reached and np.linalg.norm(rot_err) < 0.08
        if (reached and self._wp_steps >= wp.min_steps) or self._wp_steps >= wp.max_steps:
            self._wp += 1
            self._wp_steps = 0
            self._still = 0
            self._hold = None
            if wp.name == "lift" and not self._planned_place:
                self._plan_place()
        # avoid emitting exact no-ops (a teleoperator's hand is never perfectly still)
        if np.linalg.norm(a[:6]) < NOOP_EPS:
            a[2] = 2 * NOOP_EPS
        return a


@dataclass
class EpisodeResult:
    success: bool
    steps: int
    actions: list[np.ndarray] = field(default_factory=list)
    phase: str = ""


def fresh_env(suite: str, task: int | str, layout_seed: int, **kwargs: Any) -> LiberoEnv:
    """A new env for one expert attempt. LIBERO lays fixtures out (cabinets, stoves, ...) from numpy's
    global RNG, and every hard reset re-places them starting from the previous layout; here the layout is
    drawn once at construction from `layout_seed` and soft resets keep it, so an episode in this env is a
    function of (task, init state, seeds) alone, whichever process runs it (and a reset costs 0.4 s, not 2)."""
    np.random.seed(int(layout_seed))
    return LiberoEnv(suite, task, seed=None, hard_reset=False, **kwargs)


def run_expert_episode(env: LiberoEnv, init_index: int, seed: int = 0, max_steps: int | None = None,
                       on_step: Callable[[dict[str, Any], np.ndarray], None] | None = None,
                       settle: bool = True) -> EpisodeResult:
    """Reset to benchmark init state `init_index` with the layout RNG seeded by `seed`, settle, and run the
    expert (seeded by `seed`) until success or `max_steps`. On a freshly created env the episode is a pure
    function of (task, init_index, seed); on a reused one the fixtures' layout also depends on its past
    resets (see `LiberoEnv.reset`).

    `on_step(obs, action)` is called for every executed (non-no-op) action with the observation the
    action was chosen on (the recording convention of the published data). Stops right after success.
    """
    obs = env.reset(init_index, seed=seed)
    if settle:
        obs = env.settle()
    expert = ScriptedExpert(env, seed=seed)
    expert.reset()
    cap = int(max_steps or EXPERT_MAX_STEPS.get(env.task_info.suite, 300))
    prev: np.ndarray | None = None
    actions: list[np.ndarray] = []
    success = False
    attempts, max_attempts = 1, 3
    while len(actions) < cap:
        a = expert.act()
        if is_noop(a, prev):
            continue
        if on_step is not None:
            on_step(obs, a)
        obs, _, done, _ = env.step(a, convention="raw")
        actions.append(a)
        prev = a
        if done:
            success = True
            break
        if expert.done and expert._wp_steps > 15:
            if attempts >= max_attempts:
                break
            attempts += 1  # not solved: re-plan from the current state (regrasp)
            expert.reset()
    return EpisodeResult(success=success, steps=len(actions), actions=actions, phase=expert.phase)
