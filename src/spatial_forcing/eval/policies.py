"""Policies as the LIBERO harness sees them: ``reset(context)`` + ``infer(observation) -> [K, 7]``.

    info = policy.info                      # PolicyInfo: cameras, image side, chunk, action convention, ...
    policy.reset(EpisodeContext(...))       # before every episode (after env.reset, before the wait steps)
    chunk = policy.infer({"images": [agentview, wrist],   # uint8 HxWx3, rot180, JPEG + Lanczos3 to info.image_size
                          "state": proprio,                # float64 [8]: eef pos, axis-angle, gripper qpos
                          "instruction": "put the bowl on the plate"})
    # chunk: [K, 7] float; the harness turns it into env actions with info.action_convention (§3.3)

Implementations: ``CheckpointEvalPolicy`` (a policy of any registered family, ``policies/registry.py``: this
project's checkpoints, upstream OpenVLA-OFT / Spatial-Forcing folders or hub ids, converted on the fly) and ``ExpertPolicy`` (the scripted pick-and-place
expert, privileged state, for verifying the harness without a model). Worker processes rebuild a policy from
a picklable ``PolicyRef`` once per process; ``POLICY_KINDS`` maps a kind to ``(describe, build)``.

``RemotePolicy`` (``--policy-server ws://HOST:PORT``) is a policy served by ``sf serve``: ``describe_remote``
reads the server's metadata frame (views, image side, chunk, action convention) into a ``PolicyInfo``, and
``infer`` sends the observation above under the server's observation-map keys. Each worker process holds
one connection, so one GPU server feeds many CPU simulators. The secret, if the server has one, comes from
``SF_SERVE_SECRET``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from spatial_forcing.eval.protocol import base_suite
from spatial_forcing.envs.libero import ACTION_DIM, STATE_DIM, TaskInfo

LIBERO_CAMERAS: tuple[str, ...] = ("agentview", "wrist")  # what LIBERO renders, in the OFT view order


@dataclass(frozen=True)
class PolicyInfo:
    """What the harness needs to know about a policy; saved with the results (``identity`` must match on
    resume)."""

    name: str  # e.g. "oft:/ckpt/libero-spatial", "expert"
    cameras: tuple[str, ...]  # LIBERO cameras read, in order; () = no images (privileged experts)
    image_size: int | None  # side the harness resizes each view to (JPEG + Lanczos3); None = as rendered
    chunk_len: int  # actions per query
    action_convention: str  # "oft": gripper 1 open / 0 close (binarised + inverted); "raw": env units
    state_dim: int = STATE_DIM  # 8 (OFT proprio) or 0
    action_dim: int = ACTION_DIM
    center_crop: bool = False  # applied by the policy's own processor; recorded only
    image_ops: str = "oft"  # "oft": JPEG + Lanczos3 to image_size; "openpi": resize-with-pad (PIL bilinear), no JPEG
    replan_steps: int = 0  # the policy's default actions per query (0 = the whole chunk); --replan-steps overrides
    privileged: bool = False  # reads the simulator through EpisodeContext.env
    details: dict[str, Any] = field(default_factory=dict)  # recorded (unnorm key, dtype, device, ...)

    def identity(self) -> dict[str, Any]:
        """The fields that change what an episode does (``details`` minus where things are: device, folder)."""
        d = asdict(self)
        d["cameras"] = list(self.cameras)
        d["details"] = {k: v for k, v in self.details.items() if k not in ("device", "folder")}
        return d


@dataclass
class EpisodeContext:
    """Given to ``reset`` before each episode. ``env`` is the live ``LiberoEnv``: only privileged policies
    (scripted experts) may read it; learned and remote policies must ignore it."""

    suite: str
    task: TaskInfo
    episode: int
    instruction: str
    env: Any = None


class EvalPolicy(Protocol):
    info: PolicyInfo

    def reset(self, context: EpisodeContext) -> None: ...

    def infer(self, observation: dict[str, Any]) -> np.ndarray: ...


def check_fits_libero(info: PolicyInfo) -> None:
    """Refuse policies whose inputs or outputs LIBERO cannot supply or execute (ValueError, named)."""
    if info.action_dim != ACTION_DIM:
        raise ValueError(f"policy {info.name} predicts {info.action_dim}-D actions; LIBERO executes {ACTION_DIM}-D "
                         "[dx, dy, dz, drx, dry, drz, gripper]")
    if len(info.cameras) > len(LIBERO_CAMERAS) or len(set(info.cameras)) != len(info.cameras) \
            or any(c not in LIBERO_CAMERAS for c in info.cameras):
        raise ValueError(f"policy {info.name} expects {len(info.cameras)} camera images {list(info.cameras)}; "
                         f"LIBERO renders {len(LIBERO_CAMERAS)}: {list(LIBERO_CAMERAS)}")
    if info.state_dim not in (0, STATE_DIM):
        raise ValueError(f"policy {info.name} expects a {info.state_dim}-D state; the LIBERO proprio is {STATE_DIM}-D "
                         "(eef pos, axis-angle, gripper qpos)")
    if info.image_ops not in ("oft", "openpi"):
        raise ValueError(f"policy {info.name}: image ops must be 'oft' or 'openpi', found {info.image_ops!r}")
    if info.action_convention not in ("oft", "raw"):
        raise ValueError(f"policy {info.name}: action convention must be 'oft' or 'raw', found "
                         f"{info.action_convention!r}")
    if info.chunk_len < 1 or (info.cameras and info.image_size is not None and info.image_size < 8):
        raise ValueError(f"policy {info.name}: expected chunk_len >= 1 and an image side >= 8, found "
                         f"{info.chunk_len} and {info.image_size}")


# ------------------------------------------------------------------------------------------------ OFT

def _auto_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    return device


def _auto_dtype(dtype: str, device: str) -> str:
    """OFT evaluates in pure bf16 on the GPU (OPENVLA_OFT.md §10); float32 on the CPU."""
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"--dtype: expected auto, bfloat16 or float32, found {dtype!r}")
    return dtype


def resolve_unnorm_key(keys: list[str], suite: str, requested: str | None) -> str:
    """OFT's rule: the suite's statistics, else ``<suite>_no_noops`` (a LIBERO-PRO suite uses its base suite's);
    a checkpoint with a single entry uses it; otherwise the user must choose."""
    if requested is not None:
        if requested in keys:
            return requested
        if f"{requested}_no_noops" in keys:
            return f"{requested}_no_noops"
        raise ValueError(f"--unnorm-key {requested!r} is not in the policy's dataset statistics; available: {keys}")
    base = base_suite(suite) or suite
    for key in (suite, f"{suite}_no_noops", base, f"{base}_no_noops"):
        if key in keys:
            return key
    if len(keys) == 1:
        return keys[0]
    raise ValueError(f"the policy's dataset statistics hold {keys}, none for suite {suite!r}; pass --unnorm-key")


def libero_cameras(num_images: int) -> tuple[str, ...]:
    """The OFT view order on LIBERO: agentview, then wrist (more views than LIBERO has stay unnamed)."""
    if num_images > len(LIBERO_CAMERAS):
        return tuple(f"camera{i}" for i in range(num_images))
    return LIBERO_CAMERAS[:num_images]


def describe_checkpoint(ref: PolicyRef, suite: str) -> PolicyInfo:
    """PolicyInfo of a checkpoint of any registered family from its files (config, statistics), without
    loading weights."""
    from spatial_forcing.normalize import STATS_FILE
    from spatial_forcing.policies.registry import describe_checkpoint as describe

    spec, keys, folder = describe(ref.source)
    if not keys:
        raise FileNotFoundError(f"{folder}: missing {STATS_FILE} (the statistics that un-normalise actions)")
    device = _auto_device(ref.device)
    return PolicyInfo(name=f"{spec.family}:{ref.source}", cameras=libero_cameras(spec.num_images),
                      image_size=spec.image_size, chunk_len=spec.chunk_len, action_convention=spec.action_convention,
                      state_dim=spec.state_dim, action_dim=spec.action_dim, center_crop=spec.center_crop,
                      image_ops=spec.image_ops, replan_steps=spec.replan_steps,
                      details={"unnorm_key": resolve_unnorm_key(keys, suite, ref.unnorm_key),
                               "dtype": _auto_dtype(ref.dtype, device), "weights": checkpoint_fingerprint(folder),
                               "device": device, "folder": str(folder)})


def checkpoint_fingerprint(folder: Path) -> str:
    """Short hash of a checkpoint's config.json and the names, sizes and modification times of its weight
    files: a re-saved checkpoint in the same folder is another policy for resuming purposes."""
    h = hashlib.sha1((folder / "config.json").read_bytes())
    for f in sorted(folder.iterdir()):
        if f.suffix in (".safetensors", ".pt", ".bin") and f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


class CheckpointEvalPolicy:
    """A learned policy of any registered family behind the harness protocol. Images arrive
    JPEG-round-tripped and Lanczos-resized to the model's side; the policy's processor applies its centre
    crop, prompt and state normalisation; actions come back un-normalised in the policy's convention."""

    def __init__(self, policy: Any, info: PolicyInfo) -> None:
        self.policy = policy
        self.info = info
        self.unnorm_key = info.details["unnorm_key"]

    @classmethod
    def load(cls, ref: PolicyRef, suite: str) -> CheckpointEvalPolicy:
        import torch

        from spatial_forcing.policies.registry import load_policy

        info = describe_checkpoint(ref, suite)
        d = info.details
        policy = load_policy(d["folder"], unnorm_key=d["unnorm_key"], dtype=getattr(torch, d["dtype"]),
                             device=d["device"]).eval()
        loaded = cls.from_policy(policy, suite, name=info.name, unnorm_key=d["unnorm_key"])
        for key in ("cameras", "image_size", "chunk_len", "action_dim", "state_dim", "center_crop", "image_ops",
                    "replan_steps"):
            if getattr(loaded.info, key) != getattr(info, key):
                raise ValueError(f"{ref.source}: the loaded policy has {key}={getattr(loaded.info, key)!r} but its "
                                 f"files say {getattr(info, key)!r}")
        loaded.info = info
        return loaded

    @classmethod
    def from_policy(cls, policy: Any, suite: str, name: str | None = None,
                    unnorm_key: str | None = None) -> CheckpointEvalPolicy:
        """Wrap a policy already in memory (this process only)."""
        spec = policy.spec
        param = next(policy.model.parameters())
        key = resolve_unnorm_key(sorted(policy.stats), suite, unnorm_key)
        info = PolicyInfo(name=name or f"{spec.family}:<in-memory>", cameras=libero_cameras(spec.num_images),
                          image_size=spec.image_size, chunk_len=spec.chunk_len,
                          action_convention=spec.action_convention, state_dim=spec.state_dim,
                          action_dim=spec.action_dim, center_crop=spec.center_crop, image_ops=spec.image_ops,
                          replan_steps=spec.replan_steps,
                          details={"unnorm_key": key, "dtype": str(param.dtype).replace("torch.", ""),
                                   "device": str(param.device)})
        return cls(policy, info)

    def reset(self, context: EpisodeContext) -> None:
        pass  # the learned policies here are stateless between queries

    def infer(self, observation: dict[str, Any]) -> np.ndarray:
        return self.policy.predict_action_chunk(observation, unnorm_key=self.unnorm_key)


# --------------------------------------------------------------------------------------------- expert

class ExpertPolicy:
    """The scripted pick-and-place expert (``envs/experts.py``; LIBERO-Object and -Spatial) as a closed-loop
    policy: one raw env action per query, planned from privileged simulator state after the wait steps.
    Re-plans (regrasps) when its script ends without success, at most ``max_attempts`` times, as
    ``run_expert_episode`` does. Seeded per episode with ``seed + episode``."""

    def __init__(self, seed: int = 0, max_attempts: int = 3) -> None:
        self.seed = int(seed)
        self.max_attempts = int(max_attempts)
        self.info = PolicyInfo(name="expert", cameras=(), image_size=None, chunk_len=1, action_convention="raw",
                               state_dim=STATE_DIM, privileged=True, details={"seed": self.seed})
        self._env: Any = None
        self._episode = 0
        self._expert: Any = None
        self._attempts = 0

    def reset(self, context: EpisodeContext) -> None:
        if context.env is None:
            raise ValueError("the scripted expert reads the simulator: EpisodeContext.env must be the LiberoEnv")
        self._env, self._episode, self._expert = context.env, context.episode, None

    def infer(self, observation: dict[str, Any]) -> np.ndarray:
        from spatial_forcing.envs.experts import ScriptedExpert

        if self._expert is None:  # plan on the settled scene (the first query comes after the wait steps)
            self._expert = ScriptedExpert(self._env, seed=self.seed + self._episode)
            self._expert.reset()
            self._attempts = 1
        elif self._expert.done and self._expert._wp_steps > 15 and self._attempts < self.max_attempts:
            self._attempts += 1  # the script ended without success: re-plan from the current state
            self._expert.reset()
        return self._expert.act()[None]


# --------------------------------------------------------------------------------------------- remote

def _remote_info(ref: PolicyRef, meta: dict[str, Any]) -> PolicyInfo:
    needed = ("num_images", "action_horizon", "action_dim", "observation_map", "image_size")
    missing = [k for k in needed if k not in meta]
    if missing:
        raise ValueError(f"policy server {ref.source}: its metadata lacks {missing} (an sf serve server sends them; "
                         f"got keys {sorted(meta)})")
    omap = meta["observation_map"]
    if len(omap.get("images", ())) < int(meta["num_images"]) or not omap.get("prompt"):
        raise ValueError(f"policy server {ref.source}: its observation map {omap} does not name "
                         f"{meta['num_images']} image keys and a prompt key")
    return PolicyInfo(name=f"remote:{ref.source}", cameras=libero_cameras(int(meta["num_images"])),
                      image_size=int(meta["image_size"]), chunk_len=int(meta["action_horizon"]),
                      action_convention=str(meta.get("action_convention", "oft")),
                      state_dim=int(meta.get("state_dim") or 0), action_dim=int(meta["action_dim"]),
                      center_crop=bool(meta.get("center_crop", False)),
                      image_ops=str(meta.get("image_ops", (meta.get("observation") or {}).get("image_ops", "oft"))),
                      replan_steps=int(meta.get("replan_steps", (meta.get("action") or {}).get("replan_steps") or 0)),
                      details={"server_policy": meta.get("policy"), "unnorm_key": meta.get("unnorm_key"),
                               "observation_map": omap})


class RemotePolicy:
    """A policy behind the openpi websocket protocol (``sf serve``), fed exactly what a local policy gets."""

    def __init__(self, client: Any, info: PolicyInfo) -> None:
        self.client, self.info = client, info
        omap = info.details["observation_map"]
        self.image_keys = list(omap["images"])[:len(info.cameras)]
        self.state_key, self.prompt_key = omap.get("state"), omap["prompt"]

    @staticmethod
    def _client(ref: PolicyRef, connect_timeout: float = 30.0) -> Any:
        from spatial_forcing.serve.client import WebsocketClientPolicy

        return WebsocketClientPolicy(ref.source, port=None, api_key=os.environ.get("SF_SERVE_SECRET") or None,
                                     connect_timeout=connect_timeout)

    @classmethod
    def connect(cls, ref: PolicyRef, suite: str) -> RemotePolicy:
        client = cls._client(ref)
        return cls(client, _remote_info(ref, client.get_server_metadata()))

    def reset(self, context: EpisodeContext) -> None:
        pass  # the protocol has no reset; OFT is stateless between queries

    def infer(self, observation: dict[str, Any]) -> np.ndarray:
        request = {key: image for key, image in zip(self.image_keys, observation["images"])}
        request[self.prompt_key] = observation["instruction"]
        if self.state_key:
            request[self.state_key] = np.asarray(observation["state"], dtype=np.float64)
        return np.asarray(self.client.infer(request)["actions"])


def describe_remote(ref: PolicyRef, suite: str) -> PolicyInfo:
    """Connect once (waiting up to 5 s for the server), read the metadata frame, close (workers connect on
    their own)."""
    client = RemotePolicy._client(ref, connect_timeout=5.0)
    try:
        return _remote_info(ref, client.get_server_metadata())
    finally:
        client.close()


# ------------------------------------------------------------------------------------------ references

@dataclass(frozen=True)
class PolicyRef:
    """A picklable recipe for a policy, rebuilt once in every worker process. ``kind`` is a key of
    ``POLICY_KINDS``; ``source`` a path, hub id or address."""

    kind: str
    source: str = ""
    device: str = "auto"
    dtype: str = "auto"
    unnorm_key: str | None = None
    seed: int = 0

    @classmethod
    def parse(cls, text: str, **kwargs: Any) -> PolicyRef:
        """``"expert"`` -> the scripted expert; anything else -> a checkpoint folder (any registered family)
        or a hub id."""
        if text == "expert":
            return cls("expert", **kwargs)
        path = Path(text).expanduser()
        return cls("checkpoint", source=str(path.resolve()) if path.exists() else text, **kwargs)


def _describe_expert(ref: PolicyRef, suite: str) -> PolicyInfo:
    return ExpertPolicy(ref.seed).info


POLICY_KINDS: dict[str, tuple[Callable[[PolicyRef, str], PolicyInfo], Callable[[PolicyRef, str], Any]]] = {
    "checkpoint": (describe_checkpoint, CheckpointEvalPolicy.load),
    "expert": (_describe_expert, lambda ref, suite: ExpertPolicy(ref.seed)),
    "remote": (describe_remote, RemotePolicy.connect),
}


def _kind(ref: PolicyRef) -> tuple[Callable, Callable]:
    if ref.kind not in POLICY_KINDS:
        raise ValueError(f"unknown policy kind {ref.kind!r}; known: {sorted(POLICY_KINDS)}")
    return POLICY_KINDS[ref.kind]


def describe_policy(ref: PolicyRef, suite: str) -> PolicyInfo:
    """The policy's PolicyInfo without loading it (cheap; used to validate before starting workers)."""
    return _kind(ref)[0](ref, suite)


def build_policy(ref: PolicyRef, suite: str) -> EvalPolicy:
    """Load the policy (once per worker process)."""
    policy = _kind(ref)[1](ref, suite)
    check_fits_libero(policy.info)
    return policy
