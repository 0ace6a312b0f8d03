"""The in-memory training path: decoded frames equal the streaming pipeline's, batched augmentation equals
the per-view operations, and training from memory resumes exactly."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from spatial_forcing.data.augment import (AugmentConfig, AugmentParams, augment_batch, crop_intrinsics,
                                          crop_intrinsics_batch, crop_resize, crop_resize_batch, jitter)
from spatial_forcing.data.dataset import ChunkedDataset, PipelineConfig
from spatial_forcing.data.memory import FrameStore, MemoryBatches, estimate_bytes
from spatial_forcing.data.stats import cached_statistics
from spatial_forcing.train.loop import Trainer, open_source
from test_train import CAMS, config, write_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("mem") / "ds", episodes=3, length=12)


def test_unaugmented_batches_equal_the_streaming_pipeline(dataset):
    source = open_source(str(dataset))
    stats = cached_statistics(source)
    for size, mode in ((32, "drop_last"), (24, "repeat_last")):
        pipe = PipelineConfig(chunk_len=4, chunk_mode=mode, image_size=size, augment=False, depth=True)
        stream = ChunkedDataset(source, stats, pipe, cameras=list(CAMS), episodes=[0, 2])
        store = FrameStore(source, CAMS, size, depth=True, dataset=str(dataset))
        memory = MemoryBatches(store, stats, pipe, episodes=[0, 2])
        assert len(memory) == len(stream)
        idx = [0, 5, len(stream) - 1, 3]
        expected = next(iter(DataLoader(torch.utils.data.Subset(stream, idx), batch_size=len(idx))))
        got = memory.batch(idx)
        for key, value in expected.items():
            if key.startswith(("observation.pad_mask",)):
                continue
            if isinstance(value, torch.Tensor):
                assert torch.equal(got[key], value), key
            else:
                assert list(got[key]) == list(value), key
    assert store.nbytes == estimate_bytes(len(store.images), 2, 24, True)


def test_batched_augmentation_is_the_per_view_operations():
    g = torch.Generator().manual_seed(3)
    cfg = AugmentConfig()
    images = torch.rand(6, 3, 20, 20, generator=g)
    params = AugmentParams.sample(6, g, cfg)
    out, boxes = augment_batch(images, params, cfg)
    side = float(np.sqrt(0.9))
    for i in range(6):
        o = float(params.crop[i]) * (1 - side)
        box = (o, o, o + side, o + side)
        np.testing.assert_allclose(boxes[i].tolist(), box, atol=1e-6)
        ref = crop_resize(images[i], tuple(boxes[i].tolist()), (20, 20)).clamp(0, 1)
        ref = jitter(ref, float(params.brightness[i]), float(params.contrast[i]), float(params.saturation[i]),
                     float(params.hue[i]))
        torch.testing.assert_close(out[i], ref, rtol=0, atol=1e-5)  # grid arithmetic differs in the last bits
    # the amounts follow the recipe's ranges
    many = AugmentParams.sample(4000, torch.Generator().manual_seed(0), cfg)
    assert -0.2 <= float(many.brightness.min()) and float(many.brightness.max()) < 0.2
    assert 0.8 <= float(many.contrast.min()) and float(many.contrast.max()) < 1.2
    assert -0.05 <= float(many.hue.min()) and float(many.hue.max()) <= 0.05
    assert abs(float(many.saturation.mean()) - 1.0) < 0.01
    # depth (nearest) and intrinsics follow the same boxes
    depth = torch.rand(6, 1, 20, 20, generator=g)
    k = torch.tensor([[18.0, 0.0, 9.5], [0.0, 18.0, 9.5], [0.0, 0.0, 1.0]]).expand(6, 3, 3)
    cropped = crop_resize_batch(depth, boxes, (20, 20), mode="nearest")
    kb = crop_intrinsics_batch(k, boxes, (20, 20), (20, 20))
    for i in range(6):
        box = tuple(boxes[i].tolist())
        assert torch.equal(cropped[i], crop_resize(depth[i], box, (20, 20), mode="nearest"))
        torch.testing.assert_close(kb[i], crop_intrinsics(k[i], box, (20, 20), (20, 20)))


def test_training_from_memory_resumes_exactly(dataset, tmp_path):
    kw = dict(policy="cnn", policy_overrides={"image_size": 32, "channels": [8, 16, 16], "blocks": [0, 1]},
              align={"student_layer": 1, "use_pos_embed": False, "coeff": 0.5}, augment=True, data_mode="memory",
              max_steps=4, save_every=2, batch_size=3)
    full = Trainer(config(dataset, tmp_path / "run", **kw), progress=False)
    assert full.in_memory
    full.fit()
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-0000004")  # as if stopped after the step-2 checkpoint
    resumed = Trainer(config(dataset, tmp_path / "run", **kw), resume="latest", progress=False)
    assert resumed.step == 2 and resumed.consumed == 6
    resumed.fit()
    for (name, a), b in zip(full.policy.model.state_dict().items(), resumed.policy.model.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(full.sf.parameters(), resumed.sf.parameters()):
        assert torch.equal(a, b)


def test_streaming_and_memory_train_alike_without_augmentation(dataset, tmp_path):
    """Same data, same order, same model: the two paths give the same losses (augmentation off)."""
    kw = dict(policy="cnn", policy_overrides={"image_size": 32, "channels": [8, 16, 16], "blocks": [0, 1]},
              align={"student_layer": 1, "use_pos_embed": False, "coeff": 0.5}, augment=False, max_steps=3,
              save_every=3, batch_size=3)
    runs = {}
    for mode in ("memory", "stream"):
        t = Trainer(config(dataset, tmp_path / mode, data_mode=mode, **kw), progress=False)
        assert t.in_memory == (mode == "memory")
        summary = t.fit()
        runs[mode] = (summary["last"]["loss"], t.policy.model.state_dict())
    assert runs["memory"][0] == pytest.approx(runs["stream"][0], rel=1e-5)
    for key, value in runs["memory"][1].items():
        torch.testing.assert_close(value, runs["stream"][1][key], rtol=1e-4, atol=1e-6)


def test_teacher_grids_in_memory_equal_the_online_teacher_and_follow_the_crops(dataset, tmp_path):
    from spatial_forcing.data.dataset import crop_grid
    from spatial_forcing.train.loop import prepare_batch

    kw = dict(policy="cnn", policy_overrides={"image_size": 32, "channels": [8, 16, 16], "blocks": [0, 1]}, batch_size=4,
              align={"student_layer": 1, "use_pos_embed": False, "coeff": 0.5}, data_mode="memory")
    online = Trainer(config(dataset, tmp_path / "online", augment=False, **kw), progress=False)
    memory = Trainer(config(dataset, tmp_path / "memory", augment=False, teacher_cache="memory", **kw),
                     progress=False, frames=online.frames)
    assert memory.frames is online.frames  # the decoded frames are shared, not decoded again
    batch = memory.dataset.batch([0, 3, 7, 9])
    inputs = prepare_batch(batch, list(CAMS), online.policy, online.device)
    expected = online.teacher_grid(batch, inputs.teacher)
    got = memory.teacher_grid(batch, inputs.teacher)
    assert torch.equal(got.feats, expected.feats) and torch.equal(got.valid, expected.valid)
    assert "un-augmented frame" in memory.notes()["teacher_input"]
    # with augmentation, each view's grid is cropped with that view's box, as a cache on disk is
    aug = Trainer(config(dataset, tmp_path / "aug", augment=True, teacher_cache="memory", **kw), progress=False,
                  frames=online.frames)
    batch = aug.dataset.batch([1, 2, 5], torch.Generator().manual_seed(4))
    feats, valid = aug.frames.teacher_grids(aug.teacher)
    for i, (e, t) in enumerate(zip(batch["episode_index"].tolist(), batch["frame_index"].tolist())):
        row = aug.frames.offset[e] + t
        boxes = [tuple(batch[f"crop_box.{c}"][i].tolist()) for c in CAMS]
        ref_f, ref_v = crop_grid(feats[row].numpy(), valid[row].numpy(), boxes)
        torch.testing.assert_close(batch["teacher.feats"][i], ref_f, rtol=0, atol=1e-5)
        assert torch.equal(batch["teacher.valid"][i], ref_v)
    with pytest.raises(ValueError, match="data-mode memory or auto"):
        Trainer(config(dataset, tmp_path / "x", teacher_cache="memory", **{**kw, "data_mode": "stream"}), progress=False)
