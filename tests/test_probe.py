"""The linear depth probe: exact ridge maths, patch depths by hand, and `sf probe` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_train import config, write_dataset

from spatial_forcing.analysis.probe import RidgeStats, fit_ridge, patch_depth, r2_rmse
from spatial_forcing.cli import main as sf_main
from spatial_forcing.train.loop import Trainer


def test_probe_recovers_linear_depth_and_nothing_from_shuffled_targets():
    g = torch.Generator().manual_seed(0)
    w_true = torch.randn(32, generator=g, dtype=torch.float64)
    x_train, x_test = torch.randn(4000, 32, generator=g), torch.randn(2000, 32, generator=g)
    y_train = x_train.double() @ w_true + 1.5 + 0.01 * torch.randn(4000, generator=g, dtype=torch.float64)
    y_test = x_test.double() @ w_true + 1.5
    w, b = fit_ridge(x_train, y_train, lam=1e-6)
    r2, rmse = r2_rmse(y_test, x_test.double() @ w + b)
    assert r2 > 0.9999 and rmse < 0.01
    shuffled = y_train[torch.randperm(4000, generator=g)]
    w, b = fit_ridge(x_train, shuffled, lam=1e-2)
    r2, _ = r2_rmse(y_test, x_test.double() @ w + b)
    assert abs(r2) < 0.05


def test_streaming_ridge_equals_the_closed_form():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(300, 6)) * [1, 2, 3, 4, 5, 6] + 3, rng.normal(size=300)
    lam = 0.1
    stats = RidgeStats(6)
    for part in np.array_split(np.arange(300), 7):
        stats.add(torch.from_numpy(x[part]), torch.from_numpy(y[part]))
    w, b = stats.solve(lam)
    xc, yc = x - x.mean(0), y - y.mean()
    gram = xc.T @ xc
    expect = np.linalg.solve(gram + lam * np.trace(gram) / 6 * np.eye(6), xc.T @ yc)
    np.testing.assert_allclose(w.numpy(), expect, rtol=1e-10)
    assert abs(float(b) - (y.mean() - x.mean(0) @ expect)) < 1e-10


def test_patch_depth_by_hand():
    depth = torch.tensor([[1.0, 3.0, 2.0, 2.0],
                          [5.0, 7.0, 0.0, 0.0],
                          [float("nan"), 0.0, 4.0, 4.0],
                          [0.0, 0.0, 4.0, 8.0]])[None, None]
    mean, valid = patch_depth(depth, 2)
    torch.testing.assert_close(mean[0, 0], torch.tensor([[4.0, 2.0], [0.0, 5.0]]))
    assert valid[0, 0].tolist() == [[True, True], [False, True]]  # top-right: 2 of 4 valid (half is enough)
    with pytest.raises(ValueError, match="does not tile"):
        patch_depth(torch.ones(1, 1, 5, 5), 2)


def test_sf_probe_end_to_end(tmp_path, capsys):
    dataset = write_dataset(tmp_path / "ds", episodes=3)
    ckpt = Trainer(config(dataset, tmp_path / "run", max_steps=1, save_every=1), progress=False).fit()["checkpoint"]
    code = sf_main(["probe", "--policy", f"{ckpt}/policy", "--names", "mini", "--dataset", str(dataset),
                    "--val-episodes", "1", "--max-samples", "6", "--out", str(tmp_path / "probe"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "probe" / "probe.json").read_text())
    scores = result["policies"]["mini"]
    assert sorted(int(k) for k in scores) == [0, 1, 2, 3, 4]
    assert all(np.isfinite(v["r2"]) and v["train_tokens"] > 0 and v["test_tokens"] > 0 for v in scores.values())
    assert (tmp_path / "probe" / "probe.png").stat().st_size > 1000
    assert "best layer" in capsys.readouterr().out
    code = sf_main(["probe", "--policy", f"{ckpt}/policy", "--dataset", str(dataset), "--layers", "9",
                    "--val-episodes", "1", "--out", str(tmp_path / "p2"), "--quiet"])
    assert code == 2 and "outside policy" in capsys.readouterr().err
