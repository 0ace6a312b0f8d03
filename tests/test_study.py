"""`sf study`: the statistics on fixed inputs (by hand), a reduced study end to end in the simulator, and
the refusals (bad settings, another study's folder) that leave the disk untouched."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from spatial_forcing.analysis.effects import (data_efficiency, paired_difference, rate_summary, steps_to_reach,
                                              training_efficiency)
from spatial_forcing.cli import main as sf_main
from spatial_forcing.study import StudyConfig, Unit, analyse, bind_folder, finding, fraction_episodes, write_report
from test_train import write_dataset


def test_wilson_interval_of_pooled_seeds_by_hand():
    s = rate_summary([[1, 0, 1, 0, 1], [0, 0, 1, 0, 1]])  # 5 of 10
    assert s["mean"] == 0.5 and s["per_seed"] == [0.6, 0.4] and (s["successes"], s["episodes"]) == (5, 10)
    # p = 0.5, z = 1.959964: centre 0.5, half = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/(4n^2)) = 0.263406
    np.testing.assert_allclose(s["ci95"], [0.5 - 0.263406, 0.5 + 0.263406], atol=1e-6)
    assert rate_summary([[1, 1, 1]])["ci95"][1] == 1.0 and rate_summary([[0, 0]])["ci95"][0] == 0.0


def test_paired_bootstrap_against_the_normal_approximation():
    same = np.array([[1, 0, 1, 1], [0, 1, 1, 0]], bool)
    assert paired_difference(same, same) == {"difference": 0.0, "ci95": [0.0, 0.0], "iterations": 10000,
                                             "bootstrap_seed": 0}
    assert paired_difference(np.ones((2, 5)), np.zeros((2, 5)))["ci95"] == [1.0, 1.0]
    rng = np.random.default_rng(1)
    a = rng.random((1, 400)) < 0.6  # one seed: the bootstrap is over paired episodes only
    b = rng.random((1, 400)) < 0.4
    d = (a.astype(float) - b.astype(float))[0]
    se = d.std(ddof=1) / math.sqrt(d.size)
    out = paired_difference(a, b, iterations=20_000)
    assert out["difference"] == pytest.approx(d.mean())
    np.testing.assert_allclose(out["ci95"], [d.mean() - 1.96 * se, d.mean() + 1.96 * se], atol=0.012)
    with pytest.raises(ValueError, match="same seeds and episodes"):
        paired_difference(a, b[:, :10])


def test_efficiency_measures_by_hand():
    assert steps_to_reach([100, 200, 300], [0.1, 0.5, 0.9], 0.5) == 200
    assert steps_to_reach([100, 200], [0.1, 0.2], 0.5) is None
    eff = training_efficiency([100, 200, 300, 400], sf=[0.2, 0.6, 0.7, 0.8], base=[0.0, 0.2, 0.4, 0.6])
    assert (eff["sf_steps"], eff["ratio"]) == (200, 2.0)
    assert training_efficiency([1, 2], [0.5, 0.5], [0.0, 0.0])["ratio"] is None
    de = data_efficiency([1.0, 0.1, 0.25], sf=[0.9, 0.3, 0.7], base=[0.7, 0.1, 0.3])
    assert (de["sf_fraction"], de["ratio"]) == (0.25, 4.0)
    assert de["success_at_equal_data"]["0.1"] == {"sf": 0.3, "baseline": 0.1}
    assert data_efficiency([0.5, 1.0], [0.1, 0.2], [0.3, 0.5])["ratio"] is None


def _fake_eval(cfg: StudyConfig, unit: Unit, step: int, outcomes: list[bool]) -> None:
    folder = Path(cfg.out) / "eval" / unit.name / f"step-{step:07d}"
    folder.mkdir(parents=True)
    with open(folder / "episodes.jsonl", "w") as f:
        for e, ok in enumerate(outcomes):
            f.write(json.dumps({"task": 0, "episode": e, "success": ok}) + "\n")


def test_analysis_of_a_finished_study_on_fixed_records(tmp_path):
    cfg = StudyConfig(out=str(tmp_path / "s"), fractions=[0.5, 1.0], seeds=2, steps=20, evals=2, episodes=4)
    sf = {(0.5, 10): [1, 0, 0, 0], (0.5, 20): [1, 1, 0, 0], (1.0, 10): [1, 1, 0, 0], (1.0, 20): [1, 1, 1, 0]}
    base = {(0.5, 10): [0, 0, 0, 0], (0.5, 20): [1, 0, 0, 0], (1.0, 10): [1, 0, 0, 0], (1.0, 20): [1, 1, 0, 0]}
    for (f, step), outcomes in sf.items():
        for seed in range(2):
            _fake_eval(cfg, Unit(f, seed, "sf"), step, [bool(x) for x in outcomes])
            _fake_eval(cfg, Unit(f, seed, "baseline"), step, [bool(x) for x in base[(f, step)]])
    result = analyse(cfg)
    final = result["fractions"]["1"]["curve"][-1]
    assert final["sf"]["mean"] == 0.75 and final["baseline"]["mean"] == 0.5
    assert final["difference"]["difference"] == pytest.approx(0.25)
    eff = result["fractions"]["1"]["training_efficiency"]  # baseline ends at 0.5; SF has 0.5 at step 10
    assert (eff["sf_steps"], eff["ratio"]) == (10, 2.0)
    de = result["data_efficiency"]  # SF with half the data (0.5) reaches the baseline's 0.5 with all of it
    assert (de["sf_fraction"], de["ratio"]) == (0.5, 2.0)
    assert result["overall_final_difference"]["difference"] == pytest.approx((0.25 + 0.25) / 2)
    assert "points" in finding(result)
    # efficiency ratios resting on differences inside the intervals are said to be no evidence
    images = {"steps": "s.png", "data": "d.png"}
    result["overall_final_difference"] = {"difference": 0.25, "ci95": [-0.05, 0.5]}
    text = write_report(cfg, result, images).read_text()
    assert "(2.0x fewer steps)" in text and "not evidence of an effect" in text
    result["overall_final_difference"]["ci95"] = [0.05, 0.5]
    assert "not evidence" not in write_report(cfg, result, images).read_text()
    # an unfinished evaluation (a missing episode) leaves its seed out
    (Path(cfg.out) / "eval" / Unit(1.0, 1, "sf").name / "step-0000020" / "episodes.jsonl").write_text(
        json.dumps({"task": 0, "episode": 0, "success": True}) + "\n")
    partial = analyse(cfg)
    assert partial["fractions"]["1"]["curve"][-1]["seeds"] == 1 and "data_efficiency" not in partial


def test_fractions_take_the_first_demonstrations_of_every_task(tmp_path):
    from spatial_forcing.train.loop import open_source

    source = open_source(str(write_dataset(tmp_path / "ds", episodes=6, length=9)))  # tasks alternate 0, 1, 0, ...
    assert fraction_episodes(source, 1.0, 3) == [0, 1, 2, 3, 4, 5]
    assert fraction_episodes(source, 0.34, 3) == [0, 1]  # one of each task
    assert fraction_episodes(source, 0.1, 3) == [0, 1]  # never none


def test_a_reduced_study_end_to_end(tmp_path, capsys):
    data = write_dataset(tmp_path / "ds", episodes=4, length=12)  # 2 tasks x 2 demonstrations
    out = tmp_path / "study"
    args = ["study", "--dataset", str(data), "--demos", "2", "--fractions", "0.5", "1", "--seeds", "2",
            "--steps", "4", "--evals", "2", "--episodes", "1", "--eval-max-steps", "3", "--batch-size", "4",
            "--image-size", "32", "--workers", "1", "--out", str(out), "--quiet"]
    assert sf_main(args + ["--record", str(tmp_path / "study_result.json")]) == 0
    result = json.loads((out / "study.json").read_text())
    assert result["checkpoints"] == [2, 4]
    for f in ("0.5", "1"):
        curve = result["fractions"][f]["curve"]
        assert [r["step"] for r in curve] == [2, 4] and all(r["seeds"] == 2 for r in curve)
        assert all(r["sf"]["episodes"] == 2 for r in curve)  # 2 seeds x 1 episode
    for name in ("study.md", "success_vs_steps.png", "success_vs_data.png", "study_config.json"):
        assert (out / name).stat().st_size > 100, name
    assert len(list((out / "runs").iterdir())) == 8 and len(list((out / "eval").glob("*/step-*"))) == 16
    assert json.loads((tmp_path / "study_result.json").read_text())["benchmark"] == "study"
    assert "report:" in capsys.readouterr().out
    # a rerun finds everything done: nothing is trained or evaluated again
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("episodes.jsonl")}
    assert sf_main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("episodes.jsonl")} == stamps


def test_refusals_change_nothing_on_disk(tmp_path, capsys):
    out = tmp_path / "study"
    bind_folder(StudyConfig(out=str(out), seeds=2))
    before = (out / "study_config.json").read_bytes()
    assert sf_main(["study", "--seeds", "3", "--out", str(out), "--quiet"]) == 2
    assert "holds a study with other settings (seeds: 2 there, 3 now)" in capsys.readouterr().err
    assert (out / "study_config.json").read_bytes() == before and sorted(p.name for p in out.iterdir()) == \
        ["study_config.json"]
    assert sf_main(["study", "--suite", "libero_nowhere", "--out", str(tmp_path / "new"), "--quiet"]) == 2
    assert "libero_nowhere" in capsys.readouterr().err and not (tmp_path / "new").exists()
    with pytest.raises(SystemExit) as stop:  # argparse refuses it before anything runs
        sf_main(["study", "--fractions", "0", "--out", str(tmp_path / "new")])
    assert stop.value.code == 2 and "--fractions" in capsys.readouterr().err and not (tmp_path / "new").exists()
