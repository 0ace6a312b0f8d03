"""Training checkpoints: atomic folders, keep-last-k, the pieces `--resume` needs, and the binding of
an output folder to one run.

Layout of ``<output_dir>/``::

    run.json                     the run this folder belongs to (run id, created); written at the first step
    run.lock                     held (flock) by the process training into the folder; records its pid
    metrics.jsonl, tensorboard/  logs
    checkpoints/step-<N>/
        policy/                      the inference export (LoRA merged): policies.registry.load_policy(...) loads it
        align_projector.safetensors  the SF projector (upstream key names: vlm_norm.*, fc1.*, fc2.*)
        trainable.safetensors        LoRA runs: every trained tensor (adapters + heads), fp32, for resuming
        trainer_state.json           step, optimizer, scheduler, sampler position, RNG states: the structure
        trainer_state.safetensors    ... and its tensors (no pickle: loading a checkpoint runs no code)
        train_config.json            the resolved TrainConfig
        COMPLETE                     written last: {"step", "run_id"}; a folder without it is not a checkpoint

A checkpoint is written into ``step-<N>.partial-<pid>`` and renamed into place only when complete (a
rename within one file system is atomic), so a crash mid-write leaves the previous checkpoint intact and
the partial folder is ignored (and removed by the next save, once its writer is dead).

Run binding: a new run refuses a folder that holds anything (`--overwrite` replaces the previous run's
files), a resumed run must be the folder's own run, pruning (keep-last-k) and re-saving a step only
touch checkpoints whose ``COMPLETE`` names this run, and ``run.lock`` keeps a second process out while
one trains (the kernel drops the lock when its holder dies, so a killed run's lock is taken over).
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spatial_forcing.errors import UserError, unpickling_reason

COMPLETE = "COMPLETE"
RUN_FILE = "run.json"
LOCK_FILE = "run.lock"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LEGACY_STATE = "trainer_state.pt"
STATE_FORMAT = "spatial-forcing training state"
RUN_ARTEFACTS = ("checkpoints", "metrics.jsonl", "tensorboard", RUN_FILE)  # what --overwrite removes
_STEP = re.compile(r"^step-(\d+)$")
_PARTIAL = re.compile(r"^step-\d+\.partial-(\d+)$")
_ANY = object()


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_run_id(folder: str | Path) -> str | None:
    """The run that wrote a checkpoint (from its COMPLETE file; None for checkpoints of older versions)."""
    try:
        doc = json.loads((Path(folder) / COMPLETE).read_text())
    except (OSError, ValueError):
        return None
    return doc.get("run_id") if isinstance(doc, dict) else None


def list_checkpoints(output_dir: str | Path, run_id: Any = _ANY) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (only those of `run_id` when it is given)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP.match(p.name)
        if m and p.is_dir() and (p / COMPLETE).is_file():
            if run_id is _ANY or checkpoint_run_id(p) == run_id:
                out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of the folder's run (or of any run, in a folder of an older version)."""
    bound = read_run(output_dir)
    found = [(s, p) for s, p in list_checkpoints(output_dir)
             if bound is None or checkpoint_run_id(p) in (bound["run_id"], None)]
    return found[-1][1] if found else None


def resolve_resume(resume: str, output_dir: str | Path) -> Path:
    """``--resume latest`` (the newest complete checkpoint under `output_dir`) or a checkpoint folder."""
    if resume == "latest":
        ckpt = latest_checkpoint(output_dir)
        if ckpt is None:
            raise UserError(f"--resume latest: expected a complete checkpoint under {checkpoints_dir(output_dir)}, "
                            f"found none")
        return ckpt
    ckpt = Path(resume)
    if not (ckpt / COMPLETE).is_file():
        raise UserError(f"--resume {resume}: expected a complete checkpoint folder (with a {COMPLETE} file), "
                        f"found {'a folder without one' if ckpt.is_dir() else 'no such folder'}")
    return ckpt


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def save_checkpoint(output_dir: str | Path, step: int, write: Any, keep_last: int, run_id: str | None = None) -> Path:
    """Create ``step-<step>`` atomically: `write(folder)` fills a partial folder, which is completed,
    synced and renamed into place; then all but the newest `keep_last` checkpoints **of this run** are
    removed. A step folder of another run is never replaced."""
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.iterdir():  # left by a crash: only a dead writer's (or our own) partial folder
        m = _PARTIAL.match(stale.name)
        if m and (int(m.group(1)) == os.getpid() or not _pid_alive(int(m.group(1)))):
            shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:07d}"
    if final.exists() and checkpoint_run_id(final) != run_id:
        raise UserError(f"checkpoint {final} belongs to another run ({checkpoint_run_id(final)}, this run: "
                        f"{run_id}); it is not replaced: use another --output-dir")
    partial = root / f"{final.name}.partial-{os.getpid()}"
    partial.mkdir()
    try:
        write(partial)
        (partial / COMPLETE).write_text(json.dumps({"step": step, "run_id": run_id}) + "\n")
        _fsync_tree(partial)
        if final.exists():  # re-saving a step of this run (e.g. the final save right after a periodic one)
            shutil.rmtree(final)
        os.rename(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    for _, old in list_checkpoints(output_dir, run_id)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------------------------
# The run an output folder belongs to, and the lock of the process training into it
# ------------------------------------------------------------------------------------------------

def new_run_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"


def read_run(output_dir: str | Path) -> dict[str, Any] | None:
    path = Path(output_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"{path}: expected the run record (JSON with a run_id), found unreadable text ({exc})") \
            from None
    if not isinstance(doc, dict) or not isinstance(doc.get("run_id"), str):
        raise UserError(f"{path}: expected the run record (JSON with a run_id), found {doc!r}"[:300])
    return doc


def check_output_dir(output_dir: str | Path, run_id: str | None, resume_from: Path | None, overwrite: bool) -> None:
    """May run `run_id` (resumed from `resume_from`, or new) write into `output_dir`? Raises a UserError
    saying why not. A new run needs an empty (or absent) folder; a resumed run needs its own folder
    (or an empty one); `overwrite` allows both, except removing the checkpoint being resumed."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {out}: expected a folder, found a file")
    if overwrite:
        if resume_from is not None and checkpoints_dir(out).resolve() in resume_from.resolve().parents:
            raise UserError(f"--overwrite with --resume {resume_from}: the checkpoint lies in --output-dir {out}, "
                            f"which --overwrite would clear; resume without --overwrite")
        return
    bound = read_run(out)
    if bound is not None and bound["run_id"] == run_id:  # the run's own folder
        return
    if resume_from is None:
        if out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()):
            found = len(list_checkpoints(out))
            if bound is None and not found:
                raise UserError(f"--output-dir {out}: expected a new or empty folder for a new run, found other "
                                f"files; choose another --output-dir, or pass --overwrite to train into it anyway")
            what = f"run {bound['run_id']}" if bound else f"{found} checkpoint(s) of an earlier run"
            raise UserError(f"--output-dir {out}: expected a new or empty folder for a new run, found {what}; "
                            f"pass --resume latest to continue that run or --overwrite to replace it")
        return
    if bound is not None and bound["run_id"] != run_id:
        raise UserError(f"--output-dir {out} belongs to run {bound['run_id']}, but --resume {resume_from} continues "
                        f"run {run_id}; resume into that run's folder (or an empty one), or pass --overwrite")


def clear_run(output_dir: str | Path) -> None:
    """--overwrite: remove what a previous run wrote into the folder (checkpoints, logs, run record);
    other files are left alone."""
    out = Path(output_dir)
    for name in RUN_ARTEFACTS:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def write_run(output_dir: str | Path, run_id: str) -> None:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"run_id": run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
           "pid": os.getpid()}
    tmp = out / f".{RUN_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, out / RUN_FILE)


class RunLock:
    """`<output_dir>/run.lock`, held with flock by the one process training into the folder. The kernel
    releases it when that process ends (even by SIGKILL), so a dead run's lock is taken over; the
    file records the holder's pid and host for the message a second process gets."""

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        import fcntl

        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"--output-dir {self.path.parent}: another training is writing into this folder "
                            f"({holder}); wait for it to finish or use another --output-dir") from None
        except OSError:  # a file system without flock (some network mounts): run unlocked
            os.close(fd)
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def check(self) -> None:
        """Refuse now (before long work) if another process holds the lock; `acquire` decides for good."""
        if self._fd is None and self.path.is_file():
            self.acquire()
            self.release()

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (its content is informative)
            self._fd = None

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # interpreter shutdown
            pass


# ------------------------------------------------------------------------------------------------
# Training state: JSON for the structure, safetensors for the tensors; nothing is unpickled
# ------------------------------------------------------------------------------------------------

_MARK = "__sf__"


def _encode(obj: Any, path: list[str], tensors: dict[str, torch.Tensor], storages: set[tuple[int, int]]) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        storage = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if storage in storages or storage[1] != t.nbytes:  # safetensors refuses shared memory: copy
            t = t.clone()
        storages.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        key = "/".join(path) or "tensor"
        while key in tensors:
            key += "'"
        tensors[key] = t
        return {_MARK: "tensor", "key": key}
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError(f"training state {'/'.join(path)}: object arrays cannot be stored")
        return {_MARK: "ndarray", "dtype": obj.dtype.str, "shape": list(obj.shape), "data": obj.ravel().tolist()}
    if isinstance(obj, np.generic):
        return {_MARK: "npscalar", "dtype": obj.dtype.str, "value": obj.item()}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {_MARK: "tuple", "items": [_encode(v, [*path, str(i)], tensors, storages) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, [*path, str(i)], tensors, storages) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        kind = "counter" if isinstance(obj, collections.Counter) else "dict"
        if kind == "dict" and all(isinstance(k, str) for k in obj) and _MARK not in obj:
            return {k: _encode(v, [*path, k], tensors, storages) for k, v in obj.items()}
        return {_MARK: kind, "items": [[_encode(k, [*path, "key"], tensors, storages),
                                        _encode(v, [*path, str(k)], tensors, storages)] for k, v in obj.items()]}
    raise TypeError(f"training state {'/'.join(path)}: cannot store a {type(obj).__name__}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    kind = obj.get(_MARK)
    if kind is None:
        return {k: _decode(v, tensors, where) for k, v in obj.items()}
    try:
        if kind == "tensor":
            return tensors[obj["key"]]
        if kind == "ndarray":
            return np.asarray(obj["data"], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"])
        if kind == "npscalar":
            return np.dtype(obj["dtype"]).type(obj["value"])
        if kind == "tuple":
            return tuple(_decode(v, tensors, where) for v in obj["items"])
        if kind in ("dict", "counter"):
            items = {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in obj["items"]}
            return collections.Counter(items) if kind == "counter" else items
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{where}: a damaged {kind!r} entry ({type(exc).__name__}: {exc})") from None
    raise UserError(f"{where}: unknown entry kind {kind!r} (written by a newer version?)")


def save_state(folder: str | Path, state: dict[str, Any]) -> None:
    """`state` (nested dicts, lists, tuples, numbers, strings, numpy arrays, tensors) as
    `trainer_state.json` (structure) + `trainer_state.safetensors` (tensors)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    doc = {"format": STATE_FORMAT, "version": 1, "state": _encode(state, [], tensors, set())}
    save_file(tensors, str(Path(folder) / STATE_TENSORS))
    (Path(folder) / STATE_JSON).write_text(json.dumps(doc) + "\n")


def load_state(folder: str | Path) -> dict[str, Any]:
    """The training state of a checkpoint. Nothing in it can run code: JSON and safetensors only (a
    checkpoint of an older version, `trainer_state.pt`, is read with torch's weights-only unpickler,
    which refuses anything but tensors, plain containers and numpy arrays)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / STATE_JSON).is_file() and (folder / LEGACY_STATE).is_file():
        return _load_legacy_state(folder / LEGACY_STATE)
    for name in (STATE_JSON, STATE_TENSORS):
        if not (folder / name).is_file():
            raise UserError(f"{folder}: expected {name} in a complete checkpoint, found none")
    where = str(folder / STATE_JSON)
    try:
        doc = json.loads((folder / STATE_JSON).read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{where}: expected JSON, found unreadable text ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT or not isinstance(doc.get("state"), dict):
        raise UserError(f"{where}: expected a {STATE_FORMAT!r} document, found something else")
    try:
        tensors = load_file(str(folder / STATE_TENSORS))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{folder / STATE_TENSORS}: expected a safetensors file, found one it cannot read ({exc})") \
            from None
    return _decode(doc["state"], tensors, where)


def _load_legacy_state(path: Path) -> dict[str, Any]:
    import pickle

    numpy_core = getattr(np, "_core", None) or np.core
    allowed = [numpy_core.multiarray._reconstruct, np.ndarray, np.dtype, collections.Counter,
               *(type(np.dtype(t)) for t in (np.uint32, np.float64, np.int64, np.float32))]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise UserError(f"{path}: expected training state (tensors, numbers, plain containers), found content the "
                        f"safe loader refuses; it is not loaded because a pickle can run code "
                        f"({unpickling_reason(exc)})") from None


def rng_state() -> dict[str, Any]:
    import random

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
