"""Training checkpoints: atomic folders, keep-last-k, and the pieces `--resume` needs.

Layout of ``<output_dir>/checkpoints/step-<N>/``::

    policy/                      the inference export (LoRA merged): OFTPolicy.from_pretrained(...) loads it
    align_projector.safetensors  the SF projector (upstream key names: vlm_norm.*, fc1.*, fc2.*)
    trainable.safetensors        LoRA runs: every trained tensor (adapters + heads), fp32, for resuming
    trainer_state.pt             step, optimizer, scheduler, sampler position, RNG states
    train_config.json            the resolved TrainConfig
    COMPLETE                     written last: a folder without it is not a checkpoint

A checkpoint is written into ``step-<N>.partial-<pid>`` and renamed into place only when complete (a
rename within one file system is atomic), so a crash mid-write leaves the previous checkpoint intact and
the partial folder is ignored (and removed by the next save).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

COMPLETE = "COMPLETE"
_STEP = re.compile(r"^step-(\d+)$")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP.match(p.name)
        if m and p.is_dir() and (p / COMPLETE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_resume(resume: str, output_dir: str | Path) -> Path:
    """``--resume latest`` (the newest complete checkpoint under `output_dir`) or a checkpoint folder."""
    if resume == "latest":
        ckpt = latest_checkpoint(output_dir)
        if ckpt is None:
            raise FileNotFoundError(f"--resume latest: no complete checkpoint under {checkpoints_dir(output_dir)}")
        return ckpt
    ckpt = Path(resume)
    if not (ckpt / COMPLETE).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint folder (no {COMPLETE} file)")
    return ckpt


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def save_checkpoint(output_dir: str | Path, step: int, write: Any, keep_last: int) -> Path:
    """Create ``step-<step>`` atomically: `write(folder)` fills a partial folder, which is completed,
    synced and renamed into place; then all but the newest `keep_last` checkpoints are removed."""
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("step-*.partial-*"):  # left by a crash
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:07d}"
    partial = root / f"{final.name}.partial-{os.getpid()}"
    partial.mkdir()
    try:
        write(partial)
        (partial / COMPLETE).write_text(f"{step}\n")
        _fsync_tree(partial)
        if final.exists():  # re-saving a step (e.g. the final save right after a periodic one)
            shutil.rmtree(final)
        os.rename(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    for _, old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
