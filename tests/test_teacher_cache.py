"""`sf cache-teacher` and training with `--teacher-cache`: a real store over a real dataset, read back
through the pipeline, cropped like the pixels, and equal to the online teacher without augmentation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_train import CAMS, config, write_dataset

from spatial_forcing.cli import main as sf_main
from spatial_forcing.data.dataset import FULL_BOX, ChunkedDataset, PipelineConfig, crop_grid
from spatial_forcing.data.stats import cached_statistics
from spatial_forcing.teachers import build_teacher
from spatial_forcing.teachers.cache import TeacherCache
from spatial_forcing.train.loop import Trainer, open_source, validate_config

LENGTH, EPISODES = 14, 4
SIZE = 112  # the mini policy's input side: frames are resized to it before the teacher sees them


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "ds", episodes=EPISODES, length=LENGTH)


@pytest.fixture(scope="module")
def store(dataset):
    code = sf_main(["cache-teacher", "--teacher", "geometry", "--dataset", str(dataset), "--image-size", str(SIZE),
                    "--dtype", "float32", "--batch-size", "5", "--num-workers", "0", "--quiet"])
    assert code == 0
    return dataset / "teacher_cache" / "geometry"


def test_store_holds_the_teacher_grid_of_every_frame(dataset, store):
    cache = TeacherCache(store)
    meta = cache.meta
    assert meta["complete"] and meta["cameras"] == list(CAMS) and meta["image_size"] == SIZE
    feats = np.load(store / "feats.npy", mmap_mode="r")
    assert feats.shape[:2] == (EPISODES * LENGTH, len(CAMS)) and feats.shape[-1] == meta["dim"]
    # frame (2, 5) straight from the teacher on the training pipeline's un-augmented sample
    source = open_source(str(dataset))
    pipe = PipelineConfig(chunk_len=1, chunk_mode="repeat_last", image_size=SIZE, augment=False, depth=True)
    sample = ChunkedDataset(source, cached_statistics(source), pipe)[2 * LENGTH + 5]
    assert (int(sample["episode_index"]), int(sample["frame_index"])) == (2, 5)
    grid = build_teacher("geometry").features(
        torch.stack([sample[f"observation.images.{c}"] for c in CAMS])[None].float() / 255,
        depth=torch.stack([sample[f"observation.depth.{c}"] for c in CAMS])[None],
        intrinsics=torch.stack([sample[f"observation.intrinsics.{c}"] for c in CAMS])[None])
    assert grid.valid.float().mean() > 0.5
    f, v = cache.read(2, 5)
    np.testing.assert_allclose(f, grid.feats[0].numpy(), atol=1e-6)
    assert np.array_equal(v, grid.valid[0].numpy())
    with pytest.raises(IndexError, match="episode 2 has 14 frames"):
        cache.read(2, LENGTH)


def test_crop_grid_resamples_like_the_pixels():
    """A grid whose features are the cell coordinates: bilinear cropping gives the box's sample points."""
    h = w = 5
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    feats = np.stack([ys, xs], -1)[None].repeat(2, 0)  # [V=2, 5, 5, 2]
    valid = np.ones((2, h, w), bool)
    valid[1, :, 0] = False
    box = (0.25, 0.5, 0.75, 1.0)
    out_f, out_m = crop_grid(feats, valid, [FULL_BOX, box])
    assert torch.equal(out_f[0], torch.from_numpy(feats[0])) and out_m[0].all()
    # output row i samples input row 0.25*4 + i*(0.5*4)/4 = 1 + 0.5 i; column j: 2 + 0.5 j
    expect_y = 1 + 0.5 * torch.arange(h, dtype=torch.float32)
    expect_x = 2 + 0.5 * torch.arange(w, dtype=torch.float32)
    torch.testing.assert_close(out_f[1][..., 0], expect_y[:, None].expand(h, w))
    torch.testing.assert_close(out_f[1][..., 1], expect_x[None, :].expand(h, w))
    assert out_m[1].all()  # the invalid column 0 lies outside the box


def test_cached_training_matches_online_without_augmentation(dataset, store, tmp_path):
    online = Trainer(config(dataset, tmp_path / "online", augment=False), progress=False)
    cached = Trainer(config(dataset, tmp_path / "cached", augment=False, teacher_cache="auto"), progress=False)
    assert cached.teacher is None and cached.cache.folder == store
    a, b = iter(online._make_loader(0)), iter(cached._make_loader(0))
    for _ in range(3):
        batch = next(b)
        assert "teacher.feats" in batch and "observation.depth.agentview" not in batch
        m_online, m_cached = online.train_step([next(a)]), cached.train_step([batch])
        for key in ("loss", "action_loss", "align_loss", "cos_sim"):
            assert abs(m_online[key] - m_cached[key]) < 1e-6, key
    notes = json.loads((cached.save() / "train_config.json").read_text())["_notes"]
    assert "colour jitter does not reach the teacher" in notes["teacher_input"]


def test_cached_training_with_augmentation_runs(dataset, store, tmp_path):
    trainer = Trainer(config(dataset, tmp_path / "aug", augment=True, teacher_cache=str(store)), progress=False)
    batch = next(iter(trainer._make_loader(0)))
    boxes = batch["crop_box.agentview"]
    assert not torch.allclose(boxes, torch.tensor(FULL_BOX))  # 90 % crops: the grids were resampled
    m = trainer.train_step([batch])
    assert np.isfinite(m["align_loss"]) and 0 < m["align_loss"] < 2


def test_interrupted_build_resumes_and_mismatches_are_refused(dataset, store, tmp_path, capsys):
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    reference = np.load(store / "feats.npy")
    # as if the process died after 20 rows: the rest is garbage, the meta not complete
    feats = np.load(copy / "feats.npy", mmap_mode="r+")
    feats[20:] = 0
    feats.flush()
    meta = json.loads((copy / "meta.json").read_text())
    (copy / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    (copy / "progress.json").write_text(json.dumps({"rows": 20}))
    with pytest.raises(ValueError, match="incomplete"):
        TeacherCache(copy)
    args = ["cache-teacher", "--teacher", "geometry", "--dataset", str(dataset), "--image-size", str(SIZE),
            "--dtype", "float32", "--batch-size", "7", "--num-workers", "0", "--quiet", "--output", str(copy)]
    assert sf_main(args) == 0
    assert f"wrote {EPISODES * LENGTH - 20} frames (resumed)" in capsys.readouterr().out
    np.testing.assert_allclose(np.load(copy / "feats.npy"), reference, atol=1e-6)
    assert sf_main(args[:6] + ["64"] + args[7:]) == 2  # other settings, same folder
    assert "other settings" in capsys.readouterr().err
    with pytest.raises(ValueError, match="image_size 112 .*the policy's: 56"):
        validate_config(config(dataset, tmp_path / "x", teacher_cache=str(store), policy_overrides={"image_size": 56}))
    with pytest.raises(ValueError, match="cameras"):
        validate_config(config(dataset, tmp_path / "x", teacher_cache=str(store), cameras=["wrist", "agentview"]))
    with pytest.raises(FileNotFoundError, match="sf cache-teacher"):
        validate_config(config(dataset, tmp_path / "x", teacher_cache=str(tmp_path / "none")))
