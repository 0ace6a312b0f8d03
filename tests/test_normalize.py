"""policies/oft/normalize.py: the §6 formulas on hand-computed numbers, masks, files, key selection."""

import json

import numpy as np
import pytest
import torch

from spatial_forcing.normalize import (ArrayStats, DatasetStats, load_dataset_statistics, normalize,
                                                    save_dataset_statistics, select_stats, unnormalize,
                                                    zero_constant_dims)

# OPENVLA_OFT.md §7.2 example (libero_spatial_no_noops action q01/q99); the other numbers are made up
# but shaped like the real file.
Q01 = [-0.7455, -0.6616, -0.9375, -0.1071, -0.2068, -0.1843, 0.0]
Q99 = [0.9375, 0.8759, 0.9321, 0.1039, 0.1768, 0.1457, 1.0]
UPSTREAM = {
    "libero_spatial_no_noops": {
        "action": {
            "mean": [0.1534, 0.1372, -0.1554, -0.0051, -0.0112, -0.0202, 0.4731],
            "std": [0.4127, 0.3487, 0.5000, 0.0372, 0.0723, 0.0577, 0.4993],
            "max": [0.9375, 0.9375, 0.9375, 0.1971, 0.3375, 0.375, 1.0],
            "min": [-0.9375, -0.9375, -0.9375, -0.1875, -0.3675, -0.36, 0.0],
            "q01": Q01,
            "q99": Q99,
            "mask": [True, True, True, True, True, True, False],
        },
        "proprio": {
            "mean": [-0.0244, 0.1064, 1.0582, 3.0593, -0.1045, 0.0906, 0.0285, -0.0286],
            "std": [0.1028, 0.1515, 0.3826, 0.2189, 0.5104, 0.1817, 0.0137, 0.0129],
            "max": [0.1754, 0.3554, 1.4531, 3.9999, 1.5005, 0.8412, 0.0410, 0.0002],
            "min": [-0.4826, -0.2716, 0.0089, 1.8224, -1.6006, -0.6551, -0.0007, -0.0423],
            "q01": [-0.3221, -0.2178, 0.0111, 2.4218, -1.3193, -0.4195, 0.0014, -0.0402],
            "q99": [0.1446, 0.3384, 1.2795, 3.3087, 0.9741, 0.5361, 0.0400, -0.0015],
        },
        "num_transitions": 52970,
        "num_trajectories": 432,
    },
    "libero_object_no_noops": {
        "action": {k: v for k, v in [("mean", [0.0] * 7), ("std", [1.0] * 7), ("max", [1.0] * 7),
                                     ("min", [-1.0] * 7), ("q01", [-0.5] * 7), ("q99", [0.5] * 7),
                                     ("mask", [True] * 6 + [False])]},
        "proprio": {k: [float(i) for i in range(8)] for k in ("mean", "std", "max", "min", "q01", "q99")},
        "num_transitions": 66984,
        "num_trajectories": 454,
    },
}


@pytest.fixture
def stats_file(tmp_path):
    path = tmp_path / "dataset_statistics.json"
    path.write_text(json.dumps(UPSTREAM, indent=2))
    return path


@pytest.fixture
def spatial():
    return DatasetStats.from_dict(UPSTREAM["libero_spatial_no_noops"])


# ---------------------------------------------------------------- formulas
def test_round_trip_inside_bounds_and_gripper_passthrough(spatial):
    rng = np.random.default_rng(0)
    lo, hi = np.array(Q01), np.array(Q99)
    x = lo + rng.uniform(0, 1, size=(5, 8, 7)) * (hi - lo)
    x[..., 6] = rng.uniform(-3, 3, size=(5, 8))  # gripper: anything, masked out
    xn = normalize(x, spatial.action, "bounds_q99")
    assert xn.dtype == np.float64 and xn.shape == x.shape
    assert np.all(np.abs(xn[..., :6]) <= 1.0)
    assert np.array_equal(xn[..., 6], x[..., 6])  # untouched when normalising
    back = unnormalize(xn, spatial.action, "bounds_q99")
    np.testing.assert_allclose(back, x, rtol=0, atol=1e-12)
    assert np.array_equal(back[..., 6], x[..., 6])  # untouched when un-normalising
    # Un-normalising a raw gripper value of 0.9 gives 0.9, not 0.5 * 1.9 * (1 - 0) + 0.
    a = np.zeros(7)
    a[6] = 0.9
    assert unnormalize(a, spatial.action, "bounds_q99")[6] == 0.9


def test_hand_computed_values_include_eps(spatial):
    # dim 0: x = 0 -> 2 * 0.7455 / (1.683 + 1e-8) - 1
    x = np.zeros(7)
    got = normalize(x, spatial.action, "bounds_q99")[0]
    assert got == 2 * (0.0 - -0.7455) / (0.9375 - -0.7455 + 1e-8) - 1
    assert got == pytest.approx(-0.1140820017, abs=1e-10)  # without the 1e-8: -0.1140819964
    # A constant dim (lo == hi = 0.5) makes the 1e-8 visible: 2 * 1e-9 / 1e-8 - 1 = -0.8 ...
    s = ArrayStats(q01=[0.5], q99=[0.5], min=[0.5], max=[0.5], mean=[0.5], std=[0.0], mask=[True])
    assert normalize(np.array([0.5 + 1e-9]), s, "bounds_q99")[0] == pytest.approx(-0.8, abs=1e-6)
    # ... and un-normalising 0 gives lo + 0.5e-8, not lo.
    assert unnormalize(np.array([0.0]), s, "bounds_q99")[0] == 0.5 + 0.5 * 1e-8


def test_clipping_when_normalising_but_not_when_unnormalising(spatial):
    x = np.array(Q99) + 1.0
    x[6] = 7.0
    xn = normalize(x, spatial.action, "bounds_q99")
    assert xn[:6].tolist() == [1.0] * 6 and xn[6] == 7.0
    assert normalize(np.array(Q01) - 1.0, spatial.action, "bounds_q99")[:6].tolist() == [-1.0] * 6
    big = unnormalize(np.full(7, 2.0), spatial.action, "bounds_q99")  # 2 -> q99 + (q99 - q01) / 2: no clip
    np.testing.assert_allclose(big[:6], (1.5 * np.array(Q99) - 0.5 * np.array(Q01))[:6], atol=1e-7)
    assert big[6] == 2.0


def test_bounds_uses_min_max_and_q99_uses_quantiles(spatial):
    x = np.full(7, 0.5)
    lo_q, hi_q = np.array(Q01), np.array(Q99)
    lo_m, hi_m = spatial.action.min, spatial.action.max
    q = normalize(x, spatial.action, "bounds_q99")
    b = normalize(x, spatial.action, "bounds")
    np.testing.assert_allclose(q[:6], np.clip(2 * (0.5 - lo_q) / (hi_q - lo_q + 1e-8) - 1, -1, 1)[:6], atol=1e-15)
    np.testing.assert_allclose(b[:6], np.clip(2 * (0.5 - lo_m) / (hi_m - lo_m + 1e-8) - 1, -1, 1)[:6], atol=1e-15)
    assert b[3] == 1.0 and q[3] == 1.0  # 0.5 is above both max and q99 of dim 3: clipped
    assert b[0] == pytest.approx(2 * (0.5 + 0.9375) / 1.875 - 1, abs=1e-8)
    assert not np.allclose(q[:6], b[:6])
    with pytest.raises(ValueError, match="norm_type must be one of"):
        normalize(x, spatial.action, "zscore")


def test_mask_override_and_all_true_without_mask(spatial):
    x = np.array(Q99) + 1.0
    assert normalize(x, spatial.action, "bounds_q99", mask=np.ones(7, bool))[6] == 1.0
    assert spatial.proprio.mask.tolist() == [True] * 8  # no mask key in the file
    with pytest.raises(ValueError, match="mask must be 7 booleans"):
        normalize(x, spatial.action, "bounds_q99", mask=np.ones(6, bool))


def test_zero_constant_dims_rule():
    s = ArrayStats(q01=[-1.0, 0.0, 2.0], q99=[1.0, 0.0, 3.0], min=[-1.0, 0.0, 2.0], max=[1.0, 0.0, 2.0],
                   mean=[0.0] * 3, std=[1.0] * 3, mask=[True, True, False])
    xn = normalize(np.array([0.5, 0.0, 2.0]), s, "bounds_q99")
    assert xn[1] == -1.0  # 2 * 0 / 1e-8 - 1 before the rule
    out = zero_constant_dims(xn, s)
    assert out.tolist() == [xn[0], 0.0, 0.0]  # dims 1 and 2 have min == max (the masked one too)
    assert xn[0] == pytest.approx(0.5, abs=1e-8)
    t = zero_constant_dims(torch.tensor([[0.5, -1.0, 2.0]]), s)
    assert t.dtype == torch.float32 and t.tolist() == [[0.5, 0.0, 0.0]]


def test_wrong_length_errors(spatial):
    with pytest.raises(ValueError, match="state has 9 values .*statistics expect 8"):
        normalize(np.zeros(9), spatial.proprio, "bounds_q99", what="state")
    with pytest.raises(ValueError, match="actions has 6 values .*statistics expect 7"):
        unnormalize(np.zeros((8, 6)), spatial.action, "bounds_q99")
    with pytest.raises(TypeError, match="numpy array or torch tensor"):
        normalize([0.0] * 8, spatial.proprio, "bounds_q99")


def test_torch_matches_numpy_and_dtypes(spatial):
    x = np.linspace(-1, 1, 8 * 7).reshape(8, 7)
    ref = unnormalize(x, spatial.action, "bounds_q99")
    t64 = unnormalize(torch.tensor(x), spatial.action, "bounds_q99")
    assert t64.dtype == torch.float64 and np.array_equal(t64.numpy(), ref)
    t32 = unnormalize(torch.tensor(x, dtype=torch.float32), spatial.action, "bounds_q99")
    assert t32.dtype == torch.float32
    tb = normalize(torch.tensor(x, dtype=torch.bfloat16), spatial.action, "bounds_q99")
    assert tb.dtype == torch.float32  # never returned in bf16
    n32 = normalize(x.astype(np.float32), spatial.action, "bounds_q99")
    assert n32.dtype == np.float64


# ---------------------------------------------------------------- files and selection
def test_json_round_trip_exact_layout(stats_file, tmp_path):
    stats = load_dataset_statistics(stats_file)
    assert sorted(stats) == ["libero_object_no_noops", "libero_spatial_no_noops"]
    s = stats["libero_spatial_no_noops"]
    assert s.action.q01.tolist() == Q01 and s.action.q99.tolist() == Q99
    assert s.action.mask.tolist() == [True] * 6 + [False]
    assert s.proprio.dim == 8 and s.num_transitions == 52970 and s.num_trajectories == 432
    out = save_dataset_statistics(tmp_path / "saved.json", stats)
    assert json.loads(out.read_text()) == UPSTREAM  # same keys, same numbers, proprio without mask
    assert list(json.loads(out.read_text())["libero_spatial_no_noops"]["action"]) == [
        "mean", "std", "max", "min", "q01", "q99", "mask"]
    # A folder path finds dataset_statistics.json inside it.
    assert sorted(load_dataset_statistics(stats_file.parent)) == sorted(stats)


def test_missing_mask_means_all_true():
    d = json.loads(json.dumps(UPSTREAM["libero_spatial_no_noops"]))
    del d["action"]["mask"]
    s = DatasetStats.from_dict(d)
    assert s.action.mask.tolist() == [True] * 7
    assert normalize(np.array(Q99) + 1, s.action, "bounds_q99")[6] == 1.0


def test_file_errors_name_key_and_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such statistics file"):
        load_dataset_statistics(tmp_path / "nope.json")
    bad = json.loads(json.dumps(UPSTREAM))
    del bad["libero_object_no_noops"]["action"]
    (tmp_path / "a.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="'libero_object_no_noops': missing 'action'"):
        load_dataset_statistics(tmp_path / "a.json")
    bad = json.loads(json.dumps(UPSTREAM))
    bad["libero_spatial_no_noops"]["action"]["q99"] = Q99[:6]
    (tmp_path / "b.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"'libero_spatial_no_noops'.action.q99: has shape \(6,\), expected \(7,\)"):
        load_dataset_statistics(tmp_path / "b.json")
    bad = json.loads(json.dumps(UPSTREAM))
    del bad["libero_spatial_no_noops"]["proprio"]["q01"]
    (tmp_path / "c.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"proprio: missing \['q01'\]"):
        load_dataset_statistics(tmp_path / "c.json")


def test_select_stats(stats_file):
    stats = load_dataset_statistics(stats_file)
    with pytest.raises(ValueError) as err:
        select_stats(stats, "libero_goal_no_noops")
    assert "libero_object_no_noops" in str(err.value) and "libero_spatial_no_noops" in str(err.value)
    with pytest.raises(ValueError, match="unnorm_key is needed"):
        select_stats(stats, None)
    key, s = select_stats(stats, "libero_spatial")  # upstream eval's "_no_noops" fallback
    assert key == "libero_spatial_no_noops" and s is stats[key]
    one = {"only": stats["libero_object_no_noops"]}
    assert select_stats(one, None) == ("only", one["only"])
