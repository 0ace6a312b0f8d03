"""The `mini` OFTPolicy end to end: predict_action_chunk in robot units, save/load, bad input."""

import numpy as np
import pytest
import torch

from spatial_forcing.policies.oft.config import OFTConfig
from spatial_forcing.policies.oft.model import OFTModel
from spatial_forcing.normalize import DatasetStats
from spatial_forcing.policies.oft.policy import OFTPolicy
from spatial_forcing.policies.oft.processor import OFTProcessor, load_tokenizer

Q01 = [-0.7455, -0.6616, -0.9375, -0.1071, -0.2068, -0.1843, 0.0]
Q99 = [0.9375, 0.8759, 0.9321, 0.1039, 0.1768, 0.1457, 1.0]


def stats() -> DatasetStats:
    return DatasetStats.from_dict({
        "action": {"mean": [0.0] * 7, "std": [1.0] * 7, "min": [-1.0] * 7, "max": [1.0] * 7,
                   "q01": Q01, "q99": Q99, "mask": [True] * 6 + [False]},
        "proprio": {"mean": [0.0] * 8, "std": [1.0] * 8, "min": [-1.0] * 8, "max": [1.0] * 8,
                    "q01": [-0.5] * 8, "q99": [0.5] * 8},
        "num_transitions": 100, "num_trajectories": 2})


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    cfg = OFTConfig.preset("mini")
    return OFTPolicy(OFTModel(cfg).eval(), OFTProcessor(cfg, load_tokenizer("bytes")), {"toy_no_noops": stats()},
                     "toy_no_noops")


def observation(seed=0):
    rng = np.random.default_rng(seed)
    return {"images": [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in range(2)],
            "state": rng.uniform(-0.4, 0.4, 8), "instruction": "Put the bowl on the plate"}


def test_predict_action_chunk_in_robot_units(policy):
    obs = observation()
    actions = policy.predict_action_chunk(obs)
    assert actions.shape == (8, 7) and actions.dtype == np.float64
    batch = policy.processor(obs, stats=stats())
    normalised = policy.model.predict_normalized(batch)[0].double().numpy()
    lo, hi = np.array(Q01), np.array(Q99)
    expected = 0.5 * (normalised + 1) * (hi - lo + 1e-8) + lo
    assert np.allclose(actions[:, :6], expected[:, :6], atol=1e-9)
    assert np.allclose(actions[:, 6], normalised[:, 6], atol=1e-9)  # gripper is masked: left as predicted


def test_save_and_load_own_format_is_exact(policy, tmp_path):
    policy.save_pretrained(tmp_path / "mini")
    again = OFTPolicy.from_pretrained(tmp_path / "mini")
    assert again.unnorm_key == "toy_no_noops" and again.config == policy.config
    obs = observation(1)
    assert np.array_equal(again.predict_action_chunk(obs), policy.predict_action_chunk(obs))


def test_bad_input_is_explained(policy, tmp_path):
    obs = observation()
    with pytest.raises(ValueError, match="toy_no_noops"):
        policy.predict_action_chunk(obs, unnorm_key="libero_goal")
    with pytest.raises(ValueError, match="8"):
        policy.predict_action_chunk({**obs, "state": np.zeros(9)})
    with pytest.raises(ValueError, match="images"):
        policy.predict_action_chunk({**obs, "images": obs["images"][:1]})
    with pytest.raises((TypeError, ValueError), match="images"):
        policy.predict_action_chunk({**obs, "images": [im.astype(np.float32) for im in obs["images"]]})
    with pytest.raises(KeyError, match="instruction"):
        policy.predict_action_chunk({k: v for k, v in obs.items() if k != "instruction"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        OFTPolicy.from_pretrained(tmp_path / "empty")
