"""Safe by default (issue 20): bad input to any `sf` command is one line on stderr and exit status 2,
protected files are left byte for byte, nothing in a checkpoint can run code, a run never overwrites or
prunes another run's folder, statistics are keyed by content, and every `sf train` option does something.

The commands run in-process (`spatial_forcing.cli.main`); every case fails before any long work, so
the whole matrix takes seconds. The fixtures are one tiny LeRobot dataset and one 2-step training run.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pytest
import torch

from spatial_forcing.align.config import AlignConfig
from spatial_forcing.cli import main
from spatial_forcing.data.lerobot import LeRobotEpisodeSource, LeRobotWriter, canonical_features
from spatial_forcing.data.stats import CACHE_NAME, cached_statistics, compute_statistics
from spatial_forcing.train import config as config_module
from spatial_forcing.train.checkpoint import (RUN_FILE, RunLock, checkpoint_run_id, list_checkpoints, load_state,
                                              save_checkpoint, save_state)
from spatial_forcing.train.cli import _NEEDS, add_train_arguments, config_from_args
from spatial_forcing.train.config import TrainConfig
from spatial_forcing.train.loop import Trainer

from test_train import config, write_dataset  # noqa: E402 (tests/ is on sys.path)

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = Path(__file__).resolve().parents[1]


# ====================================================================== helpers and fixtures
def sf(capsys, *argv) -> tuple[int, str, str]:
    """Run `sf argv...` in this process: (exit status, stdout, stderr)."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def snapshot(*roots: Path) -> dict[str, bytes]:
    """Every file under `roots` (or the file itself), with its bytes."""
    found = {}
    for root in roots:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
        for f in files:
            found[str(f)] = f.read_bytes()
    return found


class Payload:
    """A pickle that creates `marker` when it is unpickled (what a hostile checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_small(root: Path, seed: int, lengths=(6, 7, 6), nan_at: tuple[int, int] | None = None,
                depth: bool = False) -> Path:
    """A LeRobot dataset without pictures worth the name: 8x8 images, given lengths, actions from `seed`
    (with `depth`: float32 depth columns and no intrinsics, as LeRobot's own RGB-D datasets)."""
    rng = np.random.default_rng(seed)
    feats = canonical_features({"agentview": (8, 8), "wrist": (8, 8)}, 8, 7, video=False, depth=depth)
    with LeRobotWriter(root, 20, feats, robot_type="panda", video=False,
                       camera_keys=["observation.images.agentview", "observation.images.wrist"]) as w:
        for e, n in enumerate(lengths):
            for t in range(n):
                action = rng.uniform(-3, 3, 7).astype(np.float32)
                if nan_at == (e, t):
                    action[2] = np.nan
                w.add_frame({"observation.state": rng.normal(size=8).astype(np.float32), "action": action,
                             "observation.images.agentview": np.zeros((8, 8, 3), np.uint8),
                             "observation.images.wrist": np.zeros((8, 8, 3), np.uint8),
                             **({f"observation.depth.{c}": np.ones((8, 8), np.float32) for c in ("agentview", "wrist")}
                                if depth else {})})
            w.save_episode(task="pick")
    return root


@dataclass
class Ctx:
    tmp: Path
    dataset: Path
    run: Path  # a finished 2-step run (its folder)
    run_config: Path
    ckpt: Path
    policy: Path
    occupied_dir: Path
    occupied_file: Path
    garbage: Path
    truncated: Path
    payload_pt: Path
    marker: Path
    bad_json: Path
    corrupt_ds: Path
    bad_info_ds: Path
    escape_ds: Path
    nan_ds: Path
    image: Path
    no_k_ds: Path


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> Ctx:
    tmp = tmp_path_factory.mktemp("bad")
    dataset = write_dataset(tmp / "ds")
    run = tmp / "run"
    cfg = config(dataset, run, max_steps=2, save_every=2, val_episodes=1)
    cfg.save(tmp / "run.json")
    Trainer(cfg, progress=False).fit()
    (_, ckpt), = list_checkpoints(run)
    (tmp / "occupied").mkdir()
    (tmp / "occupied" / "keep.txt").write_text("someone's work\n")
    (tmp / "existing.safetensors").write_bytes(b"not mine to replace")
    (tmp / "existing.pt").write_bytes(b"nor this")
    (tmp / "garbage.safetensors").write_bytes(os.urandom(300))
    whole = (ckpt / "align_projector.safetensors").read_bytes()
    (tmp / "truncated.safetensors").write_bytes(whole[: len(whole) // 2])
    torch.save(Payload(tmp / "PWNED"), tmp / "payload.pt")
    (tmp / "bad.json").write_text('{"lr": 1e-3,, }')
    corrupt = shutil.copytree(dataset, tmp / "corrupt_ds")
    (data_file,) = sorted((corrupt / "data").rglob("*.parquet"))
    data_file.write_bytes(b"PAR1" + os.urandom(2000))
    bad_info = shutil.copytree(dataset, tmp / "bad_info_ds")
    (bad_info / "meta" / "info.json").write_text('{"codebase_version": "v3.0", ')
    escape = shutil.copytree(dataset, tmp / "escape_ds")
    info = json.loads((escape / "meta" / "info.json").read_text())
    info["data_path"] = "../../elsewhere/" + info["data_path"]
    (escape / "meta" / "info.json").write_text(json.dumps(info))
    nan_ds = write_small(tmp / "nan_ds", seed=1, nan_at=(1, 4))
    from PIL import Image

    Image.fromarray(np.full((28, 28, 3), 128, np.uint8)).save(tmp / "img.png")
    np.save(tmp / "depth.npy", np.full((28, 28), 1.5, np.float32))
    np.save(tmp / "depth_small.npy", np.full((20, 20), 1.5, np.float32))
    (tmp / "K.json").write_text(json.dumps([[30.0, 0, 13.5], [0, 30.0, 13.5], [0, 0, 1]]))
    return Ctx(tmp, dataset, run, tmp / "run.json", ckpt, ckpt / "policy", tmp / "occupied", tmp / "existing.safetensors",
               tmp / "garbage.safetensors", tmp / "truncated.safetensors", tmp / "payload.pt", tmp / "PWNED",
               tmp / "bad.json", corrupt, bad_info, escape, nan_ds, tmp / "img.png",
               write_small(tmp / "no_k_ds", seed=2, depth=True))


# ====================================================================== the matrix
# (id, argv from the context, a fragment the one error line must hold, what must stay byte-identical)
T = "train --preset quickstart --quiet --num-workers 0 --logger none".split()
CASES = [
    # teacher-features
    ("tf-missing-option", lambda c: ["teacher-features"], "--images", lambda c: []),
    ("tf-missing-image", lambda c: ["teacher-features", "--images", c.tmp / "nope.png", "--out", c.tmp / "f.st"],
     "nope.png", lambda c: []),
    ("tf-wrong-type", lambda c: ["teacher-features", "--images", c.image, "--patch-size", "big"], "--patch-size",
     lambda c: []),
    ("tf-out-of-range", lambda c: ["teacher-features", "--images", c.image, "--patch-size", "0"], "--patch-size",
     lambda c: []),
    ("tf-bad-device", lambda c: ["teacher-features", "--images", c.image, "--device", "gpu0"], "--device", lambda c: []),
    ("tf-occupied-output", lambda c: ["teacher-features", "--images", c.image, "--out", c.occupied_file],
     "--overwrite", lambda c: [c.occupied_file]),
    ("tf-garbage-weights", lambda c: ["teacher-features", "--images", c.image, "--weights", c.garbage, "--out",
                                      c.tmp / "f.st"], "garbage.safetensors", lambda c: [c.garbage]),
    ("tf-truncated-weights", lambda c: ["teacher-features", "--images", c.image, "--weights", c.truncated, "--out",
                                        c.tmp / "f.st"], "truncated.safetensors", lambda c: [c.truncated]),
    ("tf-pickled-weights", lambda c: ["teacher-features", "--images", c.image, "--weights", c.payload_pt, "--out",
                                      c.tmp / "f.st"], "could run code", lambda c: [c.payload_pt]),
    ("tf-fit-with-vggt", lambda c: ["teacher-features", "--images", c.image, "--fit", "pad", "--out", c.tmp / "f.st"],
     "--fit", lambda c: []),
    ("tf-image-size-not-a-multiple", lambda c: ["teacher-features", "--teacher", "geometry", "--images", c.image,
                                                "--depth", c.tmp / "depth.npy", "--intrinsics", c.tmp / "K.json",
                                                "--image-size", "30", "--out", c.tmp / "f.st"], "--image-size",
     lambda c: []),
    ("tf-image-size-with-pad", lambda c: ["teacher-features", "--teacher", "geometry", "--images", c.image, "--depth",
                                          c.tmp / "depth.npy", "--intrinsics", c.tmp / "K.json", "--fit", "pad",
                                          "--image-size", "28", "--out", c.tmp / "f.st"], "--image-size", lambda c: []),
    ("tf-depth-size", lambda c: ["teacher-features", "--teacher", "geometry", "--images", c.image, "--depth",
                                 c.tmp / "depth_small.npy", "--intrinsics", c.tmp / "K.json", "--out", c.tmp / "f.st"],
     "--depth", lambda c: []),
    # init-vggt
    ("init-occupied-folder", lambda c: ["init-vggt", "--out", c.occupied_dir], "--overwrite", lambda c: [c.occupied_dir]),
    ("init-occupied-file", lambda c: ["init-vggt", "--out", c.tmp / "existing.pt"], "--overwrite",
     lambda c: [c.tmp / "existing.pt"]),
    ("init-bad-seed", lambda c: ["init-vggt", "--out", c.tmp / "v.pt", "--seed", "-1"], "--seed", lambda c: []),
    ("init-out-under-a-file", lambda c: ["init-vggt", "--out", c.occupied_file / "m.pt"], "found a file",
     lambda c: [c.occupied_file]),
    # convert
    ("convert-oft-missing-src", lambda c: ["convert", "oft", "--src", c.tmp / "absent", "--dst", c.tmp / "o1"],
     "absent", lambda c: []),
    ("convert-oft-occupied", lambda c: ["convert", "oft", "--src", c.policy, "--dst", c.occupied_dir], "--overwrite",
     lambda c: [c.occupied_dir, c.policy]),
    ("convert-oft-not-upstream", lambda c: ["convert", "oft", "--src", c.policy, "--dst", c.tmp / "o2"],
     "step-0000002/policy", lambda c: [c.policy]),
    ("convert-oft-bad-set", lambda c: ["convert", "oft", "--src", c.policy, "--dst", c.tmp / "o3", "--set", "x"],
     "KEY=VALUE", lambda c: [c.policy]),
    ("convert-rlds-missing", lambda c: ["convert", "rlds", "--src", c.tmp / "absent", "--dst", c.tmp / "o4"], "absent",
     lambda c: []),
    ("convert-rlds-fps", lambda c: ["convert", "rlds", "--src", c.tmp, "--dst", c.tmp / "o5", "--fps", "0"], "--fps",
     lambda c: []),
    ("convert-rlds-occupied", lambda c: ["convert", "rlds", "--src", c.tmp, "--dst", c.occupied_dir], "--overwrite",
     lambda c: [c.occupied_dir]),
    ("convert-rlds-jobs-gone", lambda c: ["convert", "rlds", "--src", c.tmp, "--dst", c.tmp / "o6", "--jobs", "2"],
     "--jobs", lambda c: []),
    # demo, quickstart, bench, collect
    ("demo-steps", lambda c: ["demo", "--steps", "-5"], "--steps", lambda c: []),
    ("demo-occupied", lambda c: ["demo", "--out", c.occupied_dir], "--overwrite", lambda c: [c.occupied_dir]),
    ("quickstart-steps", lambda c: ["quickstart", "--steps", "0", "--out", c.tmp / "q"], "--steps", lambda c: []),
    ("quickstart-workers", lambda c: ["quickstart", "--workers", "two"], "--workers", lambda c: []),
    ("quickstart-seed", lambda c: ["quickstart", "--seed", "nan"], "--seed", lambda c: []),
    ("quickstart-held-out", lambda c: ["quickstart", "--episodes", "1", "--val-episodes", "2", "--out", c.tmp / "q"],
     "--val-episodes", lambda c: []),
    ("bench-unknown", lambda c: ["bench", "--only", "nope"], "nope", lambda c: []),
    ("collect-episodes", lambda c: ["collect", "libero", "--suite", "libero_object", "--out", c.tmp / "c1",
                                    "--episodes", "0"], "--episodes", lambda c: []),
    ("collect-occupied", lambda c: ["collect", "libero", "--suite", "libero_object", "--out", c.occupied_dir],
     "--overwrite", lambda c: [c.occupied_dir]),
    ("collect-depth-video-png", lambda c: ["collect", "libero", "--suite", "libero_object", "--out", c.tmp / "c2",
                                           "--depth-format", "video", "--png"], "--depth-format", lambda c: []),
    ("collect-depth-format-no-depth", lambda c: ["collect", "libero", "--suite", "libero_object", "--out", c.tmp / "c3",
                                                 "--depth-format", "float32", "--no-depth"], "--depth-format",
     lambda c: []),
    ("collect-depth-format-choice", lambda c: ["collect", "libero", "--suite", "libero_object", "--out", c.tmp / "c4",
                                               "--depth-format", "png"], "--depth-format", lambda c: []),
    # cache-teacher
    ("cache-missing-dataset", lambda c: ["cache-teacher", "--teacher", "geometry", "--dataset", c.tmp / "absent"],
     "absent", lambda c: []),
    ("cache-batch", lambda c: ["cache-teacher", "--dataset", c.dataset, "--batch-size", "0"], "--batch-size",
     lambda c: []),
    ("cache-occupied", lambda c: ["cache-teacher", "--teacher", "geometry", "--dataset", c.dataset, "--output",
                                  c.occupied_dir], "--overwrite", lambda c: [c.occupied_dir, c.dataset]),
    ("cache-geometry-layer", lambda c: ["cache-teacher", "--teacher", "geometry", "--dataset", c.dataset, "--layer",
                                        "3", "--output", c.tmp / "store"], "--layer", lambda c: [c.dataset]),
    # probe
    ("probe-ridge-nan", lambda c: ["probe", "--policy", c.policy, "--dataset", c.dataset, "--ridge", "nan"], "--ridge",
     lambda c: []),
    ("probe-samples", lambda c: ["probe", "--policy", c.policy, "--dataset", c.dataset, "--max-samples", "1"],
     "--max-samples", lambda c: []),
    ("probe-names", lambda c: ["probe", "--policy", c.policy, "--dataset", c.dataset, "--names", "a", "b"], "--names",
     lambda c: []),
    ("probe-occupied", lambda c: ["probe", "--policy", c.policy, "--dataset", c.dataset, "--out", c.occupied_dir],
     "--overwrite", lambda c: [c.occupied_dir, c.policy]),
    ("probe-missing-policy", lambda c: ["probe", "--policy", c.tmp / "absent", "--dataset", c.dataset, "--out",
                                        c.tmp / "p1"], "absent", lambda c: []),
    # serve
    ("serve-port", lambda c: ["serve", "--policy", c.policy, "--port", "70000"], "--port", lambda c: []),
    ("serve-http-port", lambda c: ["serve", "--policy", c.policy, "--http-port", "-1"], "--http-port", lambda c: []),
    ("serve-empty-secret", lambda c: ["serve", "--policy", c.policy, "--secret", ""], "--secret", lambda c: []),
    ("serve-no-auth-on-network", lambda c: ["serve", "--policy", c.policy, "--host", "0.0.0.0"], "--no-auth",
     lambda c: []),
    ("serve-batch-wait", lambda c: ["serve", "--policy", c.policy, "--batch-wait-ms", "nan"], "--batch-wait-ms",
     lambda c: []),
    ("serve-connections", lambda c: ["serve", "--policy", c.policy, "--max-connections", "0"], "--max-connections",
     lambda c: []),
    ("serve-empty-policy-name", lambda c: ["serve", "--policy", c.policy, "--policy-name", " "], "--policy-name",
     lambda c: []),
    # train: options
    ("train-log-every", lambda c: [*T, "--dataset", c.dataset, "--log-every", "0"], "--log-every", lambda c: []),
    ("train-lr-nan", lambda c: [*T, "--dataset", c.dataset, "--lr", "nan"], "--lr", lambda c: []),
    ("train-max-steps", lambda c: [*T, "--dataset", c.dataset, "--max-steps", "-3"], "--max-steps", lambda c: []),
    ("train-batch-type", lambda c: [*T, "--dataset", c.dataset, "--batch-size", "four"], "--batch-size", lambda c: []),
    ("train-device", lambda c: [*T, "--dataset", c.dataset, "--device", "gpu"], "--device", lambda c: []),
    ("train-seed", lambda c: [*T, "--dataset", c.dataset, "--seed", "-1"], "--seed", lambda c: []),
    ("train-no-sf-align", lambda c: [*T, "--dataset", c.dataset, "--no-sf", "--align-coeff", "0.3"], "--align-coeff",
     lambda c: []),
    ("train-warmup-multistep", lambda c: [*T, "--dataset", c.dataset, "--schedule", "multistep", "--warmup-steps",
                                          "10"], "--warmup-steps", lambda c: []),
    ("train-wandb-option-without-wandb", lambda c: [*T, "--dataset", c.dataset, "--wandb-project", "lab"],
     "--wandb-project", lambda c: []),
    ("train-run-name-without-logger", lambda c: [*T, "--dataset", c.dataset, "--run-name", "r1"], "--run-name",
     lambda c: []),
    ("train-wandb-empty-tag", lambda c: [*T[:-2], "--logger", "wandb", "--dataset", c.dataset, "--wandb-tags", "ok", " "],
     "--wandb-tags", lambda c: []),
    ("train-no-intrinsics", lambda c: [*T, "--dataset", c.no_k_ds, "--output-dir", c.tmp / "r6"], "--intrinsic",
     lambda c: [c.no_k_ds]),
    ("train-intrinsic-not-a-matrix", lambda c: [*T, "--dataset", c.no_k_ds, "--intrinsic", "agentview=[1, 2]",
                                                "--output-dir", c.tmp / "r7"], "intrinsics for 'agentview'",
     lambda c: [c.no_k_ds]),
    ("train-intrinsic-unknown-camera", lambda c: [*T, "--dataset", c.no_k_ds, "--intrinsic",
                                                  "front=[[9,0,4],[0,9,4],[0,0,1]]", "--output-dir", c.tmp / "r8"],
     "no such camera", lambda c: [c.no_k_ds]),
    ("train-intrinsic-with-vggt", lambda c: [*T, "--dataset", c.dataset, "--teacher", "vggt", "--intrinsic",
                                             "agentview=K.json"], "--intrinsic", lambda c: []),
    ("train-geometry-layer", lambda c: [*T, "--dataset", c.dataset, "--align-teacher-layer", "5"],
     "--align-teacher-layer", lambda c: []),
    ("train-config-json", lambda c: ["train", "--config", c.bad_json], "bad.json", lambda c: [c.bad_json]),
    ("train-config-missing", lambda c: ["train", "--config", c.tmp / "absent.json"], "absent.json", lambda c: []),
    # train: data
    ("train-no-dataset", lambda c: [*T, "--dataset", c.tmp / "absent"], "absent", lambda c: []),
    ("train-corrupt-parquet", lambda c: [*T, "--dataset", c.corrupt_ds, "--output-dir", c.tmp / "r1"], ".parquet",
     lambda c: [c.corrupt_ds]),
    ("train-bad-info-json", lambda c: [*T, "--dataset", c.bad_info_ds, "--output-dir", c.tmp / "r2"], "info.json",
     lambda c: [c.bad_info_ds]),
    ("train-path-escape", lambda c: [*T, "--dataset", c.escape_ds, "--output-dir", c.tmp / "r3"], "data_path",
     lambda c: [c.escape_ds]),
    ("train-nan-in-data", lambda c: [*T, "--no-sf", "--dataset", c.nan_ds, "--val-episodes", "0", "--output-dir",
                                     c.tmp / "r4"], "episode 1, frame 4", lambda c: [c.nan_ds]),
    # train: outputs and checkpoints
    ("train-occupied-by-a-run", lambda c: ["train", "--config", c.run_config, "--lr", "0.01", "--quiet"],
     "--resume latest", lambda c: [c.run]),
    ("train-occupied-by-files", lambda c: [*T, "--dataset", c.dataset, "--output-dir", c.occupied_dir],
     "--overwrite", lambda c: [c.occupied_dir]),
    ("train-resume-missing", lambda c: [*T, "--dataset", c.dataset, "--output-dir", c.tmp / "r5", "--resume",
                                        c.tmp / "absent"], "absent", lambda c: []),
    ("train-resume-changed", lambda c: ["train", "--config", c.run_config, "--lr", "0.01", "--resume", "latest",
                                        "--quiet"], "configured differently", lambda c: [c.run]),
    ("train-output-is-a-file", lambda c: [*T, "--dataset", c.dataset, "--output-dir", c.occupied_file],
     "found a file", lambda c: [c.occupied_file]),
    # eval
    ("eval-trials", lambda c: ["eval", "libero", "--policy", "expert", "--trials-per-task", "0"], "--trials-per-task",
     lambda c: []),
    ("eval-device", lambda c: ["eval", "libero", "--policy", "expert", "--device", "tpu"], "--device", lambda c: []),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(ctx, capsys, monkeypatch, case):
    name, argv, fragment, protected = case
    monkeypatch.delenv("SF_SERVE_SECRET", raising=False)
    before = snapshot(*protected(ctx))
    rc, out, err = sf(capsys, *argv(ctx))
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (rc, err[-2000:])
    assert len(lines) == 1 and re.match(rf"^sf( {argv(ctx)[0]}( \w+)?)?: error: ", lines[0]), err
    assert fragment in lines[0], lines[0]
    assert snapshot(*protected(ctx)) == before
    assert not ctx.marker.exists()


def test_serve_refuses_an_empty_secret_in_the_environment(ctx, capsys, monkeypatch):
    monkeypatch.setenv("SF_SERVE_SECRET", "  ")
    rc, _, err = sf(capsys, "serve", "--policy", ctx.policy, "--host", "127.0.0.1")
    assert rc == 2 and err.count("\n") == 1 and "SF_SERVE_SECRET: expected a non-empty shared secret" in err


def test_a_full_disk_is_named(tmp_path, capsys):
    """The demo's summary file is a link to /dev/full, a device that answers every write with ENOSPC."""
    if not Path("/dev/full").is_char_device():
        pytest.skip("needs /dev/full (Linux)")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "demo_summary.json").symlink_to("/dev/full")
    rc, _, err = sf(capsys, "demo", "--steps", "1", "--scenes", "3", "--out", tmp_path / "out", "--overwrite")
    errors = [line for line in err.splitlines() if ": error: " in line]  # above it: the demo's progress bar
    assert rc == 2 and errors == ["sf demo: error: the disk is full (no space left on the device)"], err
    assert Path("/dev/full").is_char_device()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_named(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    for argv in (["init-vggt", "--out", ro / "m.pt"], ["probe", "--policy", "p", "--dataset", "d", "--out", ro / "p"],
                 ["convert", "rlds", "--src", tmp_path, "--dst", ro / "ds"]):
        rc, _, err = sf(capsys, *argv)
        assert rc == 2 and err.count("\n") == 1 and "is not writable" in err and str(ro) in err, err
    assert list(ro.iterdir()) == []


def test_a_bug_gets_a_traceback_and_a_hint(capsys, monkeypatch):
    """Not a user error (here a KeyError standing in for a bug in a command): traceback, hint, exit 1."""
    import spatial_forcing.cli as cli

    def broken(args):
        return {}["missing"]

    monkeypatch.setattr(cli, "cmd_demo", broken)
    rc, _, err = sf(capsys, "demo")
    assert rc == 1 and "Traceback" in err and "KeyError" in err and "this is a bug in spatial-forcing" in err


# ====================================================================== checkpoints: nothing runs code
def _resume_copy(ctx, name: str) -> tuple[Path, Path]:
    """A copy of the fixture run and a config pointing at it."""
    folder = shutil.copytree(ctx.run, ctx.tmp / name)
    cfg = TrainConfig.load(ctx.run_config)
    cfg.output_dir = str(folder)
    cfg.save(ctx.tmp / f"{name}.json")
    for _, ckpt in list_checkpoints(folder):  # the copy is the run's folder now
        cfg.save(ckpt / "train_config.json")
    return folder, ctx.tmp / f"{name}.json"


def test_a_pickle_payload_in_a_checkpoint_never_runs(ctx, capsys):
    live = ctx.tmp / "LIVE"
    pickle.loads(pickle.dumps(Payload(live)))  # the payload is real: plain unpickling runs it
    assert live.exists()
    for planted in ("trainer_state.safetensors", "trainer_state.pt"):
        folder, cfg = _resume_copy(ctx, f"pickled-{planted}")
        (ckpt,) = [p for _, p in list_checkpoints(folder)]
        if planted.endswith(".pt"):  # a checkpoint of an older version: only the pickle is there
            (ckpt / "trainer_state.json").unlink()
            (ckpt / "trainer_state.safetensors").unlink()
            shutil.copy(ctx.payload_pt, ckpt / planted)
        else:
            (ckpt / planted).write_bytes(pickle.dumps(Payload(ctx.marker)))
        rc, _, err = sf(capsys, "train", "--config", cfg, "--resume", "latest", "--quiet")
        assert rc == 2 and err.count("\n") == 1 and planted in err, err
        assert not ctx.marker.exists()
    with pytest.raises(ValueError, match="a pickle can run code"):
        load_state(ckpt)
    assert not ctx.marker.exists()


def test_training_state_round_trips_exactly(tmp_path):
    """What `--resume` restores is bit for bit what was saved: RNG states, optimizer moments, counters."""
    import random

    from spatial_forcing.train.checkpoint import rng_state

    model = torch.nn.Linear(5, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(7, 5)).square().sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[3, 9], gamma=0.5)
    random.random(), np.random.rand(), torch.rand(1)
    state = {"step": 12, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": [rng_state()],
             "sampler": {"seed": 7, "consumed": 48}, "values": [float("inf"), -0.0, 1e-300, None, True]}
    save_state(tmp_path, state)
    back = load_state(tmp_path)
    assert back["rng"][0]["python"] == state["rng"][0]["python"]
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
               for a, b in zip(back["rng"][0]["numpy"], state["rng"][0]["numpy"]))
    assert torch.equal(back["rng"][0]["torch"], state["rng"][0]["torch"])
    assert back["scheduler"] == state["scheduler"] and back["sampler"] == state["sampler"]
    assert back["values"] == state["values"] and str(back["values"][1]) == "-0.0"
    for k, moments in state["optimizer"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(back["optimizer"]["state"][k][name], value) and back["optimizer"]["state"][k][name].dtype == value.dtype
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    # a checkpoint of an older version (trainer_state.pt) still resumes: tensors, numpy arrays, containers
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save(state, legacy / "trainer_state.pt")
    old = load_state(legacy)
    assert old["scheduler"] == state["scheduler"] and old["rng"][0]["python"] == state["rng"][0]["python"]
    assert np.array_equal(old["rng"][0]["numpy"][1], state["rng"][0]["numpy"][1])


# ====================================================================== runs and their folders
def test_a_run_never_replaces_or_prunes_another_run(ctx, capsys):
    folder, cfg_a = _resume_copy(ctx, "two-runs")
    run_a = json.loads((folder / RUN_FILE).read_text())["run_id"]
    before = snapshot(folder)
    cfg = TrainConfig.load(cfg_a)
    cfg.lr = 1e-2
    cfg.save(ctx.tmp / "b.json")
    rc, _, err = sf(capsys, "train", "--config", ctx.tmp / "b.json", "--quiet")
    assert rc == 2 and f"found run {run_a}" in err and "--overwrite" in err
    assert snapshot(folder) == before
    # --overwrite: the other run's checkpoints and logs go, this run's come; files of no run stay
    (folder / "notes.txt").write_text("mine")
    rc, out, err = sf(capsys, "train", "--config", ctx.tmp / "b.json", "--quiet", "--overwrite")
    assert rc == 0, err
    run_b = json.loads((folder / RUN_FILE).read_text())["run_id"]
    assert run_b != run_a and (folder / "notes.txt").read_text() == "mine"
    assert [(s, checkpoint_run_id(p)) for s, p in list_checkpoints(folder)] == [(2, run_b)]
    # pruning and re-saving touch only this run's checkpoints
    shared = ctx.tmp / "shared"
    for step in (1, 2):
        save_checkpoint(shared, step, lambda f: (f / "x").write_text("x"), keep_last=1, run_id="X")
    assert [s for s, _ in list_checkpoints(shared)] == [2]  # X keeps its last one
    for step in (3, 4, 5):
        save_checkpoint(shared, step, lambda f: (f / "y").write_text("y"), keep_last=2, run_id="Y")
    assert [(s, checkpoint_run_id(p)) for s, p in list_checkpoints(shared)] == [(2, "X"), (4, "Y"), (5, "Y")]
    with pytest.raises(ValueError, match="belongs to another run"):
        save_checkpoint(shared, 2, lambda f: None, keep_last=2, run_id="Y")
    assert (list_checkpoints(shared, "X")[0][1] / "x").read_text() == "x"


def test_a_second_process_is_locked_out_and_a_dead_ones_lock_is_taken_over(ctx, capsys):
    folder, cfg = _resume_copy(ctx, "locked")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    holder = subprocess.Popen([sys.executable, "-c", f"from spatial_forcing.train.checkpoint import RunLock\n"
                               f"lock = RunLock({str(folder)!r}); lock.acquire(); print('held', flush=True)\n"
                               f"import time; time.sleep(120)"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        rc, _, err = sf(capsys, "train", "--config", cfg, "--resume", "latest", "--quiet")
        assert rc == 2 and err.count("\n") == 1 and f"pid {holder.pid}" in err and "another training" in err, err
    finally:
        holder.kill()
        holder.wait()
    assert f"pid {holder.pid}" in (folder / "run.lock").read_text()  # a dead process's lock file is left ...
    lock = RunLock(folder)
    lock.acquire()  # ... and taken over
    assert lock.held and f"pid {os.getpid()}" in (folder / "run.lock").read_text()
    lock.release()


# ====================================================================== statistics
def test_statistics_are_keyed_by_content_not_by_episode_lengths(tmp_path, monkeypatch):
    """Two datasets with the same episode lengths and other values, in read-only folders (their statistics
    go to the user cache): each gets its own statistics."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    a, b = write_small(tmp_path / "a", seed=1), write_small(tmp_path / "b", seed=2)
    for root in (a, b):
        (root / CACHE_NAME).mkdir()  # the dataset folder refuses the cache file, as a read-only one does
    sa, sb = cached_statistics(LeRobotEpisodeSource(a)), cached_statistics(LeRobotEpisodeSource(b))
    assert len(list((tmp_path / "home" / ".cache" / "spatial_forcing").glob("stats-*.json"))) == 2
    assert not np.allclose(sa.action.q99, sb.action.q99)
    for root, stats in ((a, sa), (b, sb)):
        fresh = compute_statistics(LeRobotEpisodeSource(root))
        assert np.array_equal(stats.action.q99, fresh.action.q99)
        assert np.array_equal(cached_statistics(LeRobotEpisodeSource(root)).action.q99, fresh.action.q99)
    # rewriting the data in place (same lengths) recomputes them
    shutil.rmtree(a)
    write_small(a, seed=3)
    (a / CACHE_NAME).mkdir()
    time.sleep(0.01)
    assert np.array_equal(cached_statistics(LeRobotEpisodeSource(a)).action.q99,
                          compute_statistics(LeRobotEpisodeSource(a)).action.q99)


def test_nan_in_the_data_is_named_and_never_cached(ctx, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ValueError, match=r"episode 1, frame 4: action\[2\] is nan"):
        cached_statistics(LeRobotEpisodeSource(ctx.nan_ds))
    assert not (ctx.nan_ds / CACHE_NAME).exists() and not (tmp_path / ".cache").exists()


# ====================================================================== every `sf train` option does something
_ALTERNATIVES = {str: {"standardize": "", "policy": "openvla/openvla-7b", "device": "cpu"}}
_PREREQUISITES = {"lora_alpha": ["--lora-rank", "4"], "warmup_steps": ["--schedule", "cosine"],
                  "min_lr": ["--schedule", "cosine"], "decay_steps": ["--schedule", "cosine"],
                  "val_every": ["--val-episodes", "1"], "teacher_weights": ["--teacher", "vggt"],
                  "align.teacher_layer": ["--teacher", "vggt"],
                  **{f: ["--logger", "wandb"] for f in ("wandb_project", "wandb_entity", "wandb_group", "wandb_tags")}}


def _other_value(name: str, typ, default):
    """A valid value other than `default` for a field, as command-line words."""
    if typ is bool:
        return None
    if typing.get_origin(typ) is list:
        item = typing.get_args(typ)[0]
        return ["9", "12"] if item is int else ["0.8", "0.9"] if item is float else ["agentview"]
    if typing.get_origin(typ) is dict:
        return ["num_images=1"]
    if typ is int:
        return [str(default + 3)]
    if typ is float:
        return [repr(default * 2 + 0.25)]
    choices = getattr(config_module, name.upper() + "S", None) or getattr(config_module, name.upper(), None)
    if choices:
        return [next(c for c in choices if c != default)]
    return [_ALTERNATIVES[str].get(name, f"{default or 'some'}-other")]


def test_every_sf_train_option_changes_the_resolved_config():
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    base = config_from_args(parser.parse_args([])).to_dict()
    options = [a for a in parser._actions if a.dest.startswith(("cfg_", "align_"))]
    assert len(options) == len(fields(TrainConfig)) - 1 + len(fields(AlignConfig))
    for action in options:
        field = action.dest[4:] if action.dest.startswith("cfg_") else "align." + action.dest[6:]
        owner, key = (AlignConfig, field[6:]) if field.startswith("align.") else (TrainConfig, field)
        typ = typing.get_type_hints(owner)[key]
        default = base["align"][key] if owner is AlignConfig else base[key]
        option = action.option_strings[0]
        words = _other_value(key, typ, default)
        if words is None:  # a flag: --x / --no-x
            argv = [f"--no-{option[2:]}" if default else option]
        else:
            argv = [option, *words]
        argv = _PREREQUISITES.get(field, []) + argv
        single_choice = {"loss_type": "LOSS_TYPES", "resample": "RESAMPLE_MODES"}
        if key in single_choice and owner is AlignConfig:  # one allowed value: another one must be refused
            import spatial_forcing.align.config as ac

            assert len(getattr(ac, single_choice[key])) == 1
            with pytest.raises(ValueError):
                config_from_args(parser.parse_args(argv))
            continue
        resolved = config_from_args(parser.parse_args(argv)).to_dict()
        got = resolved["align"][key] if owner is AlignConfig else resolved[key]
        assert got != default, f"{option} {words}: the resolved config did not change"


def _reads(paths: list[Path]) -> set[str]:
    """Attribute names read off a config object (`cfg.x`, `config.x`, `self.cfg.x`, `cfg.align.x`)."""
    names: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                holder = node.value
                if (isinstance(holder, ast.Name) and holder.id in ("cfg", "config")) or \
                        (isinstance(holder, ast.Attribute) and holder.attr in ("cfg", "config", "align")):
                    names.add(node.attr)
    return names


def test_every_config_field_is_read_by_the_training_code():
    """A field that no training code reads would be an option that silently does nothing (as
    --align-teacher-layer was before issue 20)."""
    pkg = SRC / "spatial_forcing"
    code = [p for p in (*(pkg / "train").glob("*.py"), *(pkg / "align").glob("*.py"))
            if p.name not in ("config.py", "cli.py")]
    read = _reads(code)
    if "accumulation" in read:  # the loop calls cfg.accumulation(world), which reads these two
        read |= {"grad_accum", "global_batch_size"}
    unread = [f.name for f in fields(TrainConfig) if f.name not in read]
    unread += [f"align.{f.name}" for f in fields(AlignConfig)
               if f.name not in read and f.name not in ("loss_type", "resample")]  # single-choice, checked above
    assert not unread, f"TrainConfig fields no training code reads: {unread}"
    assert {n for names, _, _ in _NEEDS for n in names} <= {f.name for f in fields(TrainConfig)}


# ====================================================================== --align-teacher-layer is read
def test_the_teacher_layer_reaches_the_teacher_and_the_cache(tmp_path, capsys):
    weights = tmp_path / "vggt.pt"
    assert sf(capsys, "init-vggt", "--preset", "tiny", "--out", weights)[0] == 0
    ds = write_small(tmp_path / "ds", seed=4, lengths=(10, 11, 10))
    rc, _, err = sf(capsys, "cache-teacher", "--teacher", "vggt", "--weights", weights, "--dataset", ds, "--layer", "0",
                    "--image-size", "28", "--num-workers", "0", "--quiet")
    assert rc == 0, err
    assert json.loads((ds / "teacher_cache" / "vggt" / "meta.json").read_text())["layer"] == 0
    rc, _, err = sf(capsys, *T, "--dataset", ds, "--teacher", "vggt", "--teacher-cache", "auto", "--val-episodes", "0",
                    "--align-teacher-layer", "-1", "--output-dir", tmp_path / "r")
    assert rc == 2 and "VGGT layer 0 (this run's --align-teacher-layer: -1)" in err, err
    # online, the layer picks the block pair the targets come from
    images = torch.rand(1, 2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    feats = {}
    for layer in (0, -1):
        cfg = config(ds, tmp_path / f"online{layer}", teacher="vggt", teacher_weights=str(weights), val_episodes=0,
                     align={**TrainConfig.preset("quickstart").align.to_dict(), "teacher_layer": layer})
        trainer = Trainer(cfg, progress=False)
        assert trainer.teacher.layer == layer
        feats[layer] = trainer.teacher.features(images).feats
    assert not torch.allclose(feats[0], feats[-1])
