"""The policy registry and the compact convolutional student (`policies/cnn`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from spatial_forcing.align import AlignConfig, SpatialForcing
from spatial_forcing.data.normalize import ArrayStats, DatasetStats
from spatial_forcing.policies import registry
from spatial_forcing.policies.base import Policy
from spatial_forcing.policies.cnn.config import CNNConfig
from spatial_forcing.policies.cnn.model import spatial_softmax
from spatial_forcing.policies.cnn.policy import CNNPolicy, text_ids


def _stats(lo=-2.0, hi=4.0) -> DatasetStats:
    def one(n):
        lo_, hi_ = np.full(n, lo), np.full(n, hi)
        return ArrayStats(q01=lo_, q99=hi_, min=lo_ - 1, max=hi_ + 1, mean=np.zeros(n), std=np.ones(n),
                          mask=np.array([True] * (n - 1) + [False]))
    return DatasetStats(action=one(7), proprio=one(8))


def _batch(policy, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = policy.config
    images = torch.rand(b, cfg.num_images, 3, cfg.image_size, cfg.image_size, generator=g)
    return policy.training_inputs(images, ["pick up the soup", "put the bowl on the plate"] * (b // 2),
                                  torch.randn(b, 8, generator=g), torch.randn(b, cfg.chunk_len, cfg.action_dim, generator=g))


def test_every_preset_names_one_family_and_builds_its_spec():
    presets = registry.presets()
    assert presets["mini"] == "oft" and presets["cnn"] == "cnn" and presets["openvla-7b"] == "oft"
    for name, family in presets.items():
        spec = registry.policy_spec(name)
        assert spec.family == family and spec.chunk_len >= 1 and spec.num_layers >= 1
    with pytest.raises(ValueError, match="unknown policy preset"):
        registry.create_policy("no-such-preset", _stats())
    with pytest.raises(ValueError, match="unknown policy family"):
        registry.family_class("no-such-family")


def test_checkpoints_round_trip_through_the_registry(tmp_path):
    torch.manual_seed(0)
    for preset in ("cnn", "mini"):
        policy = registry.create_policy(preset, _stats()).eval()
        assert isinstance(policy, Policy)
        folder = policy.save_pretrained(tmp_path / preset)
        spec, keys, where = registry.describe_checkpoint(folder)
        assert spec == policy.spec and keys == ["train"] and where == folder
        assert registry.checkpoint_family(folder) == policy.family
        loaded = registry.load_policy(folder).eval()
        obs = {"images": [np.full((64, 64, 3), 40 * i, np.uint8) for i in range(policy.spec.num_images)],
               "state": np.linspace(-1, 1, 8), "instruction": "pick up the soup"}
        np.testing.assert_array_equal(loaded.predict_action_chunk(obs), policy.predict_action_chunk(obs))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "resnet"}))
    with pytest.raises(ValueError, match="model_type 'resnet' is not one this project loads"):
        registry.load_policy(bad)


def test_cnn_grids_per_layer_and_the_sf_loss_reaches_the_encoder():
    torch.manual_seed(0)
    policy = registry.create_policy("cnn", _stats())
    cfg = policy.config
    inputs = _batch(policy)
    for layer in range(cfg.num_layers + 1):
        out = policy.model(inputs, align_layer=layer)
        side = cfg.image_size // 2 ** (layer + 1)
        assert out.visual_hidden.shape == (4, 2, side, side, cfg.channels[layer])
        assert policy.visual_grid(layer) == side and policy.visual_dim(layer) == cfg.channels[layer]
    assert policy.model(inputs, align_layer=-1).visual_hidden.shape[-1] == cfg.channels[-1]
    out = policy.model(inputs, align_layer=2)
    sf = SpatialForcing(AlignConfig(student_layer=2, use_pos_embed=False), policy.visual_dim(2), 51)
    teacher = torch.randn(4, 2, 12, 12, 51)
    align, _ = sf(out.visual_hidden, teacher)
    align.backward()
    assert policy.model.stages[1].down[0].weight.grad.abs().sum() > 0  # stage 2 is upstream of layer 2
    assert policy.model.stages[2].down[0].weight.grad is None  # stage 3 is not


def test_cnn_learns_a_fixed_batch():
    torch.manual_seed(0)
    policy = registry.create_policy("cnn", _stats())
    inputs = _batch(policy, b=8)
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss = policy.model(inputs).action_loss
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.5 * first


def test_cnn_inference_normalises_as_training_and_unnormalises_in_float64():
    torch.manual_seed(0)
    stats = _stats(lo=-2.0, hi=4.0)
    policy = registry.create_policy("cnn", stats).eval()
    with torch.no_grad():  # a head that outputs the normalised state's first 7 values, by hand
        last = policy.model.head[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.5, -1.0] + [0.0] * 54))
    obs = {"images": [np.zeros((96, 96, 3), np.uint8)] * 2, "state": np.zeros(8), "instruction": "x"}
    chunk = policy.predict_action_chunk(obs)
    assert chunk.dtype == np.float64 and chunk.shape == (8, 7)
    # un-normalise: 0.5 (x_n + 1) (hi - lo + 1e-8) + lo with lo = -2, hi = 4; the last dim is masked (untouched)
    np.testing.assert_allclose(chunk[0, :2], [0.5 * 1.5 * (6 + 1e-8) - 2, -2.0], rtol=0, atol=1e-12)
    assert chunk[0, 6] == 0.0 and np.all(chunk[1:, 6] == 0.0)
    np.testing.assert_allclose(chunk[1:, :6], 0.5 * (6 + 1e-8) - 2, rtol=0, atol=1e-12)
    # the state is normalised with the training rule: (0 - lo) / (hi - lo) * 2 - 1 = -1/3 (dims 0..6), masked dim 7 raw
    inputs = policy.observation_inputs([dict(obs, state=np.full(8, 3.0))], stats)
    np.testing.assert_allclose(inputs["proprio"][0].numpy(), [2 * 5 / (6 + 1e-8) - 1] * 7 + [3.0], rtol=1e-6)
    assert inputs["pixels"].shape == (1, 2, 3, 96, 96)


def test_text_ids_and_spatial_softmax_by_hand():
    ids = text_ids(["ab", "a"], 16)
    assert ids.tolist() == [[98, 99], [98, 0]]
    feats = torch.full((1, 1, 3, 5), -1e4)
    feats[0, 0, 2, 4] = 0.0  # all the mass at the bottom-right cell
    np.testing.assert_allclose(spatial_softmax(feats)[0, 0].numpy(), [1.0, 1.0], atol=1e-6)


def test_cnn_config_refuses_what_cannot_tile():
    with pytest.raises(ValueError, match="multiple of 16"):
        CNNConfig(image_size=100)
    with pytest.raises(ValueError, match="multiple of groups"):
        CNNConfig(channels=[16, 30, 64, 128])
    with pytest.raises(ValueError, match="overrides"):
        CNNPolicy.from_pretrained("x", image_size=64)


def test_cnn_config_file_must_say_cnn(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "oft"}))
    with pytest.raises(ValueError, match="expected 'cnn'"):
        CNNConfig.load(tmp_path / "config.json")
