"""`sf eval libero`: protocol functions against hand-computed values, and the harness in the real simulator
(headless, CPU): the scripted expert succeeding through the CLI in worker processes, protocol accounting and
the observation pipeline, the `mini` OFT policy with a video, an upstream-layout OFT checkpoint, resume, a
crash inside an episode, and bad input."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

pytest.importorskip("libero.libero")

from spatial_forcing.cli import main  # noqa: E402
from spatial_forcing.envs.libero import OFT_MAX_STEPS, proprio_state, quat2axisangle  # noqa: E402
from spatial_forcing.eval import protocol as P  # noqa: E402
from spatial_forcing.eval.policies import CheckpointEvalPolicy, ExpertPolicy, PolicyInfo, check_fits_libero  # noqa: E402
from spatial_forcing.eval.rollout import scene_hash  # noqa: E402
from spatial_forcing.eval.runner import evaluate_libero  # noqa: E402
from spatial_forcing.eval.video import VideoSelection  # noqa: E402
from spatial_forcing.policies.oft.config import OFTConfig  # noqa: E402
from spatial_forcing.policies.oft.model import OFTModel  # noqa: E402
from spatial_forcing.policies.oft.policy import OFTPolicy  # noqa: E402
from spatial_forcing.normalize import DatasetStats  # noqa: E402
from spatial_forcing.policies.oft.processor import OFTProcessor, center_crop, load_tokenizer  # noqa: E402

SUITE = "libero_object"


def _lines(folder):
    return [json.loads(line) for line in (folder / "episodes.jsonl").read_text().splitlines()]


def _mini_policy(**overrides) -> OFTPolicy:
    """A random `mini` OFT policy with LIBERO-like q01/q99 statistics under OFT's key for LIBERO-Object."""
    torch.manual_seed(0)
    cfg = OFTConfig.preset("mini", **overrides)
    a, s = cfg.action_dim, cfg.proprio_dim
    stats = DatasetStats.from_dict({
        "action": {"mean": [0.0] * a, "std": [1.0] * a, "min": [-1.0] * a, "max": [1.0] * a,
                   "q01": [-0.9] * (a - 1) + [0.0], "q99": [0.9] * (a - 1) + [1.0], "mask": [True] * (a - 1) + [False]},
        "proprio": {"mean": [0.0] * s, "std": [1.0] * s, "min": [-1.0] * s, "max": [1.0] * s,
                    "q01": [-1.0] * s, "q99": [1.0] * s},
        "num_transitions": 100, "num_trajectories": 2})
    return OFTPolicy(OFTModel(cfg).eval(), OFTProcessor(cfg, load_tokenizer("bytes")),
                     {"libero_object_no_noops": stats}, "libero_object_no_noops")


# ------------------------------------------------------------------------------------------ pure protocol

def test_rotation_crop_box_and_proprio_hand_computed():
    img = np.arange(6, dtype=np.uint8).reshape(2, 3, 1)            # rows [0 1 2], [3 4 5]
    assert P.orient_image(img, "rot180")[..., 0].tolist() == [[5, 4, 3], [2, 1, 0]]
    low, high, side = P.crop_box()                                  # sqrt(0.9) box, float32
    assert side == pytest.approx(0.9486833, abs=1e-7) and low == pytest.approx(0.0256584, abs=1e-7)
    assert high == pytest.approx(low + side)
    # crop-and-resize 224 -> 224: output row i samples input row 223 o + i s (5.7218, step 0.94868)
    ramp = torch.arange(224, dtype=torch.float32)[:, None].expand(224, 224) / 1000.0
    rows = center_crop(ramp[None].expand(3, 224, 224).contiguous(), 224)[0, :, 0] * 1000.0
    assert rows[0].item() == pytest.approx(5.7218, abs=1e-3)
    assert (rows[1] - rows[0]).item() == pytest.approx(0.94868, abs=1e-4)
    assert rows[223].item() == pytest.approx(5.7218 + 223 * 0.9486833, abs=1e-3)
    # quaternion (x, y, z, w) -> axis-angle, unfolded (w < 0 gives an angle past pi)
    s = math.sqrt(0.5)
    np.testing.assert_allclose(quat2axisangle([0, 0, 0, 1]), [0, 0, 0])
    np.testing.assert_allclose(quat2axisangle([0, 0, s, s]), [0, 0, math.pi / 2])
    np.testing.assert_allclose(quat2axisangle([1, 0, 0, 0]), [math.pi, 0, 0])
    np.testing.assert_allclose(quat2axisangle([math.sin(3 * math.pi / 4), 0, 0, math.cos(3 * math.pi / 4)]),
                               [3 * math.pi / 2, 0, 0], atol=1e-12)
    raw = {"robot0_eef_pos": np.array([0.1, -0.2, 1.0]), "robot0_eef_quat": np.array([1.0, 0, 0, 0]),
           "robot0_gripper_qpos": np.array([0.04, -0.04])}
    np.testing.assert_allclose(proprio_state(raw), [0.1, -0.2, 1.0, math.pi, 0, 0, 0.04, -0.04])


def test_gripper_postprocessing_table():
    chunk = np.array([[0.3, -1.7, 0.0, 0.1, 0.2, -0.3, g] for g in (0.9, 0.1, 0.5, 1.0, 0.0)])
    env = P.postprocess_actions(chunk, "oft")
    assert env[:, 6].tolist() == [-1.0, 1.0, 0.0, -1.0, 1.0]       # open -> -1, close -> +1, 0.5 -> 0
    np.testing.assert_array_equal(env[:, :6], chunk[:, :6])         # dims 0-5 untouched (controller clips)
    assert P.postprocess_actions(chunk, "raw")[:, 6].tolist() == [0.9, 0.1, 0.5, 1.0, 0.0]
    assert P.postprocess_actions(chunk[0], "oft").shape == (1, 7)
    with pytest.raises(ValueError, match=r"\[K, 7\]"):
        P.postprocess_actions(np.zeros((8, 14)), "oft")
    with pytest.raises(ValueError, match="finite"):
        P.postprocess_actions(np.full((8, 7), np.nan), "oft")


def test_lanczos3_weights_resize_and_jpeg():
    start, w = P.lanczos3_weights(256, 224)
    ks = 256 / 224
    c = 0.5 * ks                                                    # output pixel 0 is centred at 0.5 / scale
    lanczos = [3 * math.sin(math.pi * x) * math.sin(math.pi * x / 3) / (math.pi * x) ** 2
               for x in ((j + 0.5 - c) / ks for j in range(4))]     # input pixels 0..3 lie within 3 ks
    np.testing.assert_allclose(w[0, :4], np.array(lanczos) / sum(lanczos), atol=1e-6)
    assert start[0] == 0 and np.all(w[0, 4:] == 0)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)
    flat = np.full((256, 256, 3), 77, np.uint8)
    assert np.all(P.lanczos3_resize(flat, 224) == 77)
    rng = np.random.default_rng(0)
    smooth = np.array(Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).resize((256, 256),
                                                                                              Image.BICUBIC))
    ours = P.lanczos3_resize(smooth, 224).astype(int)
    pil = np.array(Image.fromarray(smooth).resize((224, 224), Image.LANCZOS)).astype(int)
    assert np.abs(ours - pil).max() <= 2                            # same kernel; PIL rounds in fixed point
    with Image.open(io.BytesIO(P.jpeg_encode(smooth))) as im:      # IJG tables scaled for quality 95, 4:2:0
        assert JpegImagePlugin.get_sampling(im) == 2
        assert list(im.quantization[0])[:8] == [2, 1, 1, 2, 2, 4, 5, 6]
    assert P.prepare_image(smooth, 224).shape == (224, 224, 3)


def test_step_limits_wilson_and_video_selection():
    assert {s: P.max_steps_for(s) for s in OFT_MAX_STEPS} == {
        "libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
    assert P.max_steps_for("libero_spatial_lan") == 220 and P.max_steps_for("libero_10_with_mug") == 520
    with pytest.raises(ValueError, match="--max-steps"):
        P.max_steps_for("libero_mine")
    assert P.wilson_interval(0, 10) == pytest.approx((0.0, 0.277533), abs=1e-6)
    assert P.wilson_interval(5, 10) == pytest.approx((0.236593, 0.763407), abs=1e-6)
    assert P.wilson_interval(10, 10) == pytest.approx((0.722467, 1.0), abs=1e-6)
    first = VideoSelection.parse("first:2")
    assert [first.records(e) for e in range(3)] == [True, True, False]
    fails = VideoSelection.parse("failures")
    assert fails.records(7) and fails.keeps(7, False) and not fails.keeps(7, True)
    with pytest.raises(ValueError, match="first:K"):
        VideoSelection.parse("some")


# ---------------------------------------------------------------------------------------- in the simulator

def test_expert_succeeds_through_the_cli_in_worker_processes(tmp_path, capsys):
    out = tmp_path / "expert"
    rc = main(["eval", "libero", "--policy", "expert", "--suite", SUITE, "--tasks", "0,1", "--trials-per-task", "1",
               "--workers", "2", "--videos", "none", "--output", str(out), "--quiet"])
    assert rc == 0
    assert "libero_object: 100.0% success (2/2" in capsys.readouterr().out
    recs = sorted(_lines(out), key=lambda r: r["task"])
    assert [(r["task"], r["episode"], r["success"], r["reason"]) for r in recs] == [(0, 0, True, "success"),
                                                                                    (1, 0, True, "success")]
    for r in recs:  # closed loop (chunk 1): one query per action; the 10 wait steps come on top
        assert r["queries"] == r["steps"] and r["env_steps"] == r["steps"] + 10 and 0 < r["steps"] < 280
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] and res["summary"]["successes"] == 2
    assert res["summary"]["ci95"] == pytest.approx([2 / (2 + 1.959964 ** 2), 1.0], abs=1e-6)  # Wilson, k = n
    assert res["protocol"]["max_steps"] == 280 and res["protocol"]["num_steps_wait"] == 10
    assert res["protocol"]["env_seed"] == 0 and res["protocol"]["seed"] == 7 and res["versions"]["mujoco"]
    saved = json.loads((out / "settings.json").read_text())["protocol"]  # the image ops used, and TF-exact
    assert saved["image_ops"] == "tf-exact" and saved["rules"]["image_ops"]["tf_exact"] is True
    assert "fast integer IDCT" in saved["rules"]["image_ops"]["jpeg_decoder"]
    assert "| **all** | 100.0 |" in (out / "results.md").read_text()


class ConstantPolicy:
    """Zero motion, gripper 1.0 (OFT: open), chunk 8; checks every observation it gets against the env."""

    def __init__(self, cameras=("agentview", "wrist"), size=32):
        self.info = PolicyInfo("constant", tuple(cameras), size, 8, "oft")
        self.calls = 0

    def reset(self, context):
        self.env = context.env

    def infer(self, obs):
        self.calls += 1
        raw = self.env.raw_obs
        assert obs["instruction"] == "pick up the alphabet soup and place it in the basket"
        np.testing.assert_array_equal(obs["state"], proprio_state(raw))
        for cam, image in zip(("agentview_image", "robot0_eye_in_hand_image"), obs["images"]):
            assert image.shape == (32, 32, 3) and image.dtype == np.uint8
            np.testing.assert_array_equal(image, P.lanczos3_resize(P.jpeg_roundtrip(raw[cam][::-1, ::-1]), 32))
        return np.tile([0, 0, 0, 0, 0, 0, 1.0], (8, 1))


def test_protocol_accounting_and_observations(tmp_path):
    policy = ConstantPolicy()
    res = evaluate_libero(policy, SUITE, tasks="0", trials_per_task=1, max_steps=20, videos="none",
                          output=tmp_path / "a", progress=False)
    (rec,) = _lines(tmp_path / "a")
    assert (rec["reason"], rec["steps"], rec["env_steps"], rec["queries"]) == ("timeout", 20, 30, 3)  # ceil(20/8)
    assert policy.calls == 3 and res["tasks"][0]["failures"] == {"timeout": 1, "exception": 0}
    evaluate_libero(ConstantPolicy(cameras=()), SUITE, tasks="0", trials_per_task=1, max_steps=20, replan_steps=6,
                    videos="none", output=tmp_path / "b", progress=False)  # no cameras: the env renders nothing
    assert _lines(tmp_path / "b")[0]["queries"] == 4                                                  # ceil(20/6)


def test_mini_oft_policy_short_episode_with_video(tmp_path, capsys):
    import av

    _mini_policy().save_pretrained(tmp_path / "mini")
    out = tmp_path / "eval"
    rc = main(["eval", "libero", "--policy", str(tmp_path / "mini"), "--suite", SUITE, "--tasks", "0",
               "--trials-per-task", "1", "--max-steps", "12", "--videos", "all", "--output", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    (rec,) = _lines(out)
    assert (rec["reason"], rec["steps"], rec["env_steps"], rec["queries"]) == ("timeout", 12, 22, 2)
    res = json.loads((out / "results.json").read_text())
    pol = res["policy"]
    assert pol["cameras"] == ["agentview", "wrist"] and pol["image_size"] == 112 and pol["center_crop"] is True
    assert pol["details"]["unnorm_key"] == "libero_object_no_noops" and pol["details"]["dtype"] == "float32"
    with av.open(str(out / rec["video"])) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 13 and frames[0].shape == (256, 512, 3)  # after the wait steps + one per action


def test_upstream_oft_checkpoint_is_converted_on_the_fly(tmp_path, capsys):
    pytest.importorskip("sentencepiece")
    import oft_upstream

    oft_upstream.write_upstream_checkpoint(tmp_path / "upstream")  # the published folder layout, tiny widths
    out = tmp_path / "eval"
    rc = main(["eval", "libero", "--policy", str(tmp_path / "upstream"), "--suite", "libero_spatial", "--tasks", "0",
               "--trials-per-task", "1", "--max-steps", "8", "--videos", "none", "--output", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    (rec,) = _lines(out)
    assert (rec["reason"], rec["steps"], rec["queries"]) == ("timeout", 8, 1)
    pol = json.loads((out / "results.json").read_text())["policy"]
    assert (pol["image_size"], pol["center_crop"], pol["details"]["unnorm_key"]) == (224, True,
                                                                                    "libero_spatial_no_noops")


class InterruptedExpert(ExpertPolicy):
    """Ctrl-C during the first query of episode 1 (after its reset): remembers that scene."""

    def reset(self, context):
        super().reset(context)
        if context.episode == 1:
            self.scene = scene_hash(context.env)

    def infer(self, obs):
        if self._episode == 1:
            raise KeyboardInterrupt
        return super().infer(obs)


def test_resume_skips_finished_episodes_and_never_double_counts(tmp_path):
    out = tmp_path / "run"
    interrupted = InterruptedExpert()
    with pytest.raises(KeyboardInterrupt):
        evaluate_libero(interrupted, SUITE, tasks="0", trials_per_task=2, videos="none", output=out, progress=False)
    (first,) = _lines(out)
    with open(out / "episodes.jsonl", "a") as f:
        f.write('{"suite": "libero_object", "task": 0, "epi')   # a record torn by a kill
    res = evaluate_libero(ExpertPolicy(), SUITE, tasks="0", trials_per_task=2, videos="none", output=out,
                          progress=False)
    recs = _lines(out)
    assert [r["episode"] for r in recs] == [0, 1] and recs[0] == first  # episode 0 was not run again
    assert recs[1]["scene_hash"] == interrupted.scene                    # reset history replayed exactly
    assert res["summary"]["episodes"] == 2 and res["complete"]
    again = evaluate_libero(ExpertPolicy(), SUITE, tasks="0", trials_per_task=2, videos="none", output=out,
                            progress=False)
    assert len(_lines(out)) == 2 and again["summary"] == res["summary"]
    with pytest.raises(ValueError, match="max_steps: saved 280, now 100"):
        evaluate_libero(ExpertPolicy(), SUITE, tasks="0", trials_per_task=2, max_steps=100, output=out, progress=False)
    settings = json.loads((out / "settings.json").read_text())  # a run made before the TF-exact image ops
    del settings["protocol"]["image_ops"]
    (out / "settings.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match="image_ops: saved None, now 'tf-exact'"):
        evaluate_libero(ExpertPolicy(), SUITE, tasks="0", trials_per_task=2, videos="none", output=out, progress=False)


class BrokenExpert(ExpertPolicy):
    def infer(self, obs):
        if self._episode == 0:
            raise RuntimeError("gripper on fire")
        return super().infer(obs)


def test_crash_inside_an_episode_is_recorded_and_the_run_goes_on(tmp_path):
    res = evaluate_libero(BrokenExpert(), SUITE, tasks="0", trials_per_task=2, videos="none", output=tmp_path,
                          progress=False)
    broken, fine = _lines(tmp_path)
    assert (broken["success"], broken["reason"], broken["steps"]) == (False, "exception", 0)
    assert broken["error"].startswith("RuntimeError: gripper on fire")
    assert fine["success"] and fine["reason"] == "success"
    assert res["tasks"][0]["failures"] == {"timeout": 0, "exception": 1} and res["summary"]["success_rate"] == 0.5
    assert "gripper on fire" in (tmp_path / "results.md").read_text()


def test_bad_input_is_explained(tmp_path, capsys):
    def run(*args):
        rc = main(["eval", "libero", *args, "--output", str(tmp_path / "x"), "--quiet"])
        return rc, capsys.readouterr().err

    rc, err = run("--policy", "expert", "--suite", "libero_nope")
    assert rc == 2 and "valid suites" in err and "libero_spatial_lan" in err
    rc, err = run("--policy", "expert", "--suite", "libero_goal_env")
    assert rc == 2 and "lacks resources" in err
    rc, err = run("--policy", "expert", "--suite", SUITE, "--tasks", "no_such_task")
    assert rc == 2 and "valid tasks" in err
    rc, err = run("--policy", "expert", "--suite", SUITE, "--trials-per-task", "51")
    assert rc == 2 and "50 initial states" in err
    rc, err = run("--policy", str(tmp_path / "missing"), "--suite", SUITE)
    assert rc == 2 and "no such checkpoint" in err
    rc, err = run("--policy", "expert", "--suite", SUITE, "--videos", "some")
    assert rc == 2 and "first:K" in err
    _mini_policy(action_dim=14).save_pretrained(tmp_path / "aloha")
    rc, err = run("--policy", str(tmp_path / "aloha"), "--suite", SUITE)
    assert rc == 2 and "14-D actions; LIBERO executes 7-D" in err
    _mini_policy().save_pretrained(tmp_path / "mini")
    rc, err = run("--policy", str(tmp_path / "mini"), "--suite", SUITE, "--replan-steps", "9")
    assert rc == 2 and "--replan-steps: expected 1..8" in err
    three = CheckpointEvalPolicy.from_policy(_mini_policy(num_images=3), SUITE)
    with pytest.raises(ValueError, match="3 camera images.*LIBERO renders 2"):
        check_fits_libero(three.info)
    rc, err = run("--policy", "expert", "--suite", SUITE, "--replan-steps", "2")
    assert rc == 2 and "--replan-steps: expected 1..1" in err
    assert not (tmp_path / "x").exists()  # nothing was started


def test_remote_mode_gives_the_same_actions_as_local_mode(tmp_path, capsys):
    """The same checkpoint loaded here and served by `sf serve`'s server: identical executed actions."""
    from spatial_forcing.serve.server import ServeConfig, ServerThread, load_policy

    _mini_policy().save_pretrained(tmp_path / "mini")
    common = ["--suite", SUITE, "--tasks", "0", "--trials-per-task", "2", "--max-steps", "16", "--videos", "none",
              "--quiet"]
    assert main(["eval", "libero", "--policy", str(tmp_path / "mini"), "--output", str(tmp_path / "local")] + common) == 0
    config = ServeConfig(host="127.0.0.1", port=0, http_port=0)
    with ServerThread(load_policy(str(tmp_path / "mini")), config, name="mini") as running:
        url = f"ws://127.0.0.1:{running.server.ws_port}"
        rc = main(["eval", "libero", "--policy-server", url, "--workers", "2", "--output", str(tmp_path / "remote")]
                  + common)
    assert rc == 0, capsys.readouterr().err
    local, remote = _lines(tmp_path / "local"), _lines(tmp_path / "remote")
    assert len(local) == len(remote) == 2
    by_episode = {r["episode"]: r for r in remote}
    for rec in local:
        other = by_episode[rec["episode"]]
        assert (other["steps"], other["queries"], other["scene_hash"]) == (rec["steps"], rec["queries"], rec["scene_hash"])
        assert other["actions_sha1"] == rec["actions_sha1"] and rec["actions_sha1"]
    res = json.loads((tmp_path / "remote" / "results.json").read_text())
    assert res["policy"]["name"] == f"remote:{url}" and res["policy"]["image_size"] == 112


def test_unreachable_or_garbage_policy_server_is_explained(tmp_path, capsys):
    import asyncio
    import threading

    from websockets.asyncio.server import serve

    assert main(["eval", "libero", "--policy-server", "ws://127.0.0.1:9", "--suite", SUITE, "--quiet"]) == 2
    assert "no policy server at ws://127.0.0.1:9" in capsys.readouterr().err

    ready, stop = threading.Event(), threading.Event()
    port = []

    def garbage_server():
        async def handler(ws):
            await ws.send(b"\xc1 not msgpack")
            await asyncio.sleep(1)

        async def run():
            async with serve(handler, "127.0.0.1", 0) as server:
                port.append(server.sockets[0].getsockname()[1])
                ready.set()
                while not stop.is_set():
                    await asyncio.sleep(0.05)

        asyncio.run(run())

    thread = threading.Thread(target=garbage_server, daemon=True)
    thread.start()
    ready.wait(10)
    try:
        rc = main(["eval", "libero", "--policy-server", f"ws://127.0.0.1:{port[0]}", "--suite", SUITE, "--quiet"])
    finally:
        stop.set()
        thread.join(5)
    assert rc == 2 and "sf eval: error:" in capsys.readouterr().err
    assert main(["eval", "libero", "--suite", SUITE]) == 2
    assert "exactly one of --policy" in capsys.readouterr().err
