"""Many processes on the CPU (gloo) under the real `torchrun`: DDP and FSDP average gradients like
one process with the combined batch, train the same way, save and resume exactly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_worker import trained_grads
from test_train import config, write_dataset

from spatial_forcing.policies.oft.policy import OFTPolicy
from spatial_forcing.train.checkpoint import list_checkpoints
from spatial_forcing.train.loop import Trainer

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "ds", episodes=5)


def torchrun(*args, nproc: int = 2, module: bool = False) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), str(TESTS), os.environ.get("PYTHONPATH", "")]))
    target = ["-m", *map(str, args)] if module else [str(TESTS / "distributed_worker.py"), *map(str, args)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-6000:])
    return r.stdout


def weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    return OFTPolicy.from_pretrained(Path(checkpoint) / "policy").model.state_dict()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_the_combined_batch(dataset, tmp_path, parallel):
    common = dict(parallel=parallel, max_steps=4, save_every=2, keep_last=3, val_every=0)
    two = config(dataset, tmp_path / "two", batch_size=2, **common)
    two.save(tmp_path / "two.json")
    torchrun(tmp_path / "two.json", tmp_path, "--grads")

    # the gradients of one step: rank r takes samples r, r+2 of the order, one process takes all four
    one = Trainer(config(dataset, tmp_path / "one", batch_size=4, **common), progress=False)
    one.accumulate([next(iter(one._make_loader(0)))])
    ref, got = trained_grads(one), torch.load(tmp_path / "grads.pt")
    assert set(got) == set(ref) and len(ref) > 50
    assert any(k.startswith("sf.projector.") for k in ref)  # the projector's gradients are averaged too
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6, msg=k)

    # four optimiser steps: the same first losses; later ones drift only by float rounding, which
    # AdamW magnifies where a gradient is near zero (its update is about lr * sign(g))
    single = Trainer(config(dataset, tmp_path / "one", batch_size=4, **common), progress=False).fit()
    multi = json.loads((tmp_path / "summary.json").read_text())
    assert multi["processes"] == 2 and multi["steps"] == single["steps"] == 4
    for key in ("loss", "action_loss", "align_loss"):
        assert abs(multi["first"][key] - single["first"][key]) < 1e-5, key
        assert abs(multi["last"][key] - single["last"][key]) < 1e-2 * single["last"][key], key
    a, b = weights(multi["checkpoint"]), weights(single["checkpoint"])
    assert max(float((a[k] - b[k]).abs().mean()) for k in a) < 1e-3

    # a crash after step 2: its checkpoint survives alone; resuming on two processes ends bit-exactly
    steps = list_checkpoints(two.output_dir)
    assert [s for s, _ in steps] == [2, 4]
    straight = weights(steps[-1][1])
    shutil.rmtree(steps[-1][1])
    torchrun(tmp_path / "two.json", tmp_path, "--resume", "latest")
    resumed = json.loads((tmp_path / "summary.json").read_text())
    assert resumed["steps"] == 4 and abs(resumed["last"]["loss"] - multi["last"]["loss"]) < 1e-6
    again = weights(resumed["checkpoint"])
    assert all(torch.equal(again[k], straight[k]) for k in straight)


def test_sf_train_command_under_torchrun(dataset, tmp_path):
    """The documented launch: torchrun starting `sf train` on every rank; one process prints, one writes."""
    cfg = config(dataset, tmp_path / "run", batch_size=2, max_steps=2, save_every=2)
    cfg.save(tmp_path / "cfg.json")
    out = torchrun("spatial_forcing.cli", "train", "--config", tmp_path / "cfg.json", "--quiet", module=True)
    assert out.count("trained 2 steps") == 1 and "2 process(es)" in out
    assert "batch 2 per process x 1 accumulated x 2 process(es) = global batch 4" in out
    (step, folder), = list_checkpoints(cfg.output_dir)
    assert step == 2 and OFTPolicy.from_pretrained(folder / "policy").config.num_layers == 4
