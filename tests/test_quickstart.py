"""`sf quickstart` in a reduced form (2 demonstrations, 2 training steps, one short evaluation episode
per policy, both evaluated at once in two simulator processes) in the real simulator: every artefact of
the report, the cached second run, the record."""

from __future__ import annotations

import json

from spatial_forcing.cli import main as sf_main

ARTEFACTS = ("report.md", "action_loss.png", "align_loss.png", "probe.png", "success.png", "rollout_sf.mp4",
             "rollout_baseline.mp4", "quickstart.json", "probe.json")


def test_quickstart_produces_every_artefact_and_reuses_its_work(tmp_path, capsys):
    out = tmp_path / "qs"
    args = ["quickstart", "--episodes", "2", "--val-episodes", "1", "--steps", "2", "--eval-trials", "1",
            "--eval-max-steps", "8", "--probe-samples", "8", "--out", str(out), "--quiet"]
    assert sf_main(args + ["--record", str(tmp_path / "quickstart_result.json")]) == 0
    for name in ARTEFACTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 100, name
    summary = json.loads((out / "quickstart.json").read_text())
    assert summary["data"]["episodes"] == 2 and not summary["data"]["cached"]
    assert summary["data"]["folder"].endswith("_from1_128px_noaa")  # demonstrations start after the evaluated scenes
    for run in ("sf", "baseline"):
        r = summary["runs"][run]
        assert set(r["probe_r2"]) == {"0", "1", "2", "3"} and r["success_rate"] == 0.0  # 8 steps: no success
        assert r["final_action_loss"] > 0 and r["checkpoint"].endswith("step-0000002")
    assert summary["runs"]["sf"]["final_align_loss"] is not None and summary["runs"]["baseline"]["final_align_loss"] is None
    report = (out / "report.md").read_text()
    assert "| depth probe R² (aligned layer) |" in report and "rollout_sf.mp4" in report
    assert "not independent evidence" in report and "Success on 1 unseen episode(s) per task: SF 0 %" in report
    assert summary["difference"]["difference"] == 0.0
    recorded = json.loads((tmp_path / "quickstart_result.json").read_text())
    assert recorded["benchmark"] == "quickstart" and recorded["runs"]["sf"]["probe_r2_aligned"] == \
        summary["runs"]["sf"]["probe_r2_aligned"]
    first = capsys.readouterr().out
    assert "report:" in first and "probe R2, layer 2" in first

    assert sf_main(args) == 0  # the second run reuses the demonstrations and both trainings
    again = json.loads((out / "quickstart.json").read_text())
    assert again["data"]["cached"] and all(again["runs"][r]["reused"] for r in ("sf", "baseline"))
    assert again["runs"]["sf"]["probe_r2"] == summary["runs"]["sf"]["probe_r2"]
    assert "using the cached dataset" in capsys.readouterr().out


def test_quickstart_runs_the_pi0_family(tmp_path, capsys):
    """`--policy-family pi0`: π0-mini (raw actions) through the same stages, with SF on a Gemma layer."""
    out = tmp_path / "qs"
    assert sf_main(["quickstart", "--policy-family", "pi0", "--episodes", "2", "--val-episodes", "1", "--steps", "2",
                    "--eval-trials", "1", "--eval-max-steps", "8", "--probe-samples", "8", "--out", str(out),
                    "--quiet"]) == 0
    summary = json.loads((out / "quickstart.json").read_text())
    assert summary["config"]["policy"] == "pi0-mini"
    assert set(summary["runs"]["sf"]["probe_r2"]) == {str(k) for k in range(7)}  # 6 Gemma blocks + the embeddings
    assert summary["runs"]["sf"]["final_align_loss"] > 0 and summary["runs"]["baseline"]["final_align_loss"] is None
    for name in ARTEFACTS:
        assert (out / name).is_file(), name
    train_cfg = json.loads((out / "runs" / "sf" / "checkpoints" / "step-0000002" / "train_config.json").read_text())
    assert train_cfg["standardize"] == "" and train_cfg["chunk_mode"] == "repeat_last"
    assert "report:" in capsys.readouterr().out
