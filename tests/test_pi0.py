"""The π0 student (`policies/pi0`): weight compatibility with openpi's PyTorch checkpoints against a literal
oracle (tests/pi0_upstream.py), the processor, masks reaching the SF loss, LoRA, training with SF and
resuming, and the train -> eval -> serve round trip with `pi0-mini`."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pi0_upstream as U  # noqa: E402

from spatial_forcing.align import AlignConfig, SpatialForcing  # noqa: E402
from spatial_forcing.normalize import ArrayStats, DatasetStats  # noqa: E402
from spatial_forcing.data.schema import ACTION, IMAGE, PAD_MASK, STATE, TASK  # noqa: E402
from spatial_forcing.policies import registry  # noqa: E402
from spatial_forcing.policies.pi0.config import Pi0Config  # noqa: E402
from spatial_forcing.policies.pi0.policy import Pi0Policy  # noqa: E402
from spatial_forcing.teachers.base import TeacherGrid  # noqa: E402
from spatial_forcing.train.config import PRESETS, TrainConfig  # noqa: E402
from spatial_forcing.train.loop import TrainModule, Trainer, merged_lora_state, prepare_batch  # noqa: E402
from test_train import write_dataset  # noqa: E402

PROMPTS = ["pick up the alphabet soup", "put_the bowl on the plate\n"]


def _stats(a=7, s=8) -> DatasetStats:
    def one(n, shift):
        return ArrayStats(q01=-np.ones(n), q99=np.ones(n), min=-2 * np.ones(n), max=2 * np.ones(n),
                          mean=np.linspace(-0.2, 0.3, n) + shift, std=np.linspace(0.4, 0.9, n), mask=np.ones(n, bool))
    return DatasetStats(action=one(a, 0.0), proprio=one(s, 0.1))


@pytest.fixture(scope="module")
def openpi_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("openpi") / "pi0_libero_tiny"
    sd = U.write_openpi_checkpoint(folder)
    return folder, sd


def _openpi_inputs(folder, b=2, seed=1):
    """openpi-side tensors: 3 camera slots (LIBERO: right wrist zeros and masked), tokens padded to 48."""
    g = torch.Generator().manual_seed(seed)
    s = U.DIMS["image"]
    base, wrist = (torch.rand(b, 3, s, s, generator=g) * 2 - 1 for _ in range(2))
    proto = (folder / "tokenizer.model").read_bytes()
    tok, tm = (torch.stack(x) for x in zip(*[U.openpi_prompt(proto, p) for p in PROMPTS[:b]]))
    state = torch.zeros(b, 32)
    state[:, :8] = torch.randn(b, 8, generator=g)
    ones = torch.ones(b, dtype=torch.bool)
    return dict(images=[base, wrist, torch.zeros_like(base) - 1], masks=[ones, ones, ~ones], tokens=tok,
                token_masks=tm, state=state, g=g)


def test_openpi_checkpoint_reproduces_the_openpi_forward(openpi_folder):
    """The tiny openpi-layout checkpoint, converted on load, gives openpi's flow-matching loss and its Euler
    samples (our 2 cameras == openpi's 3 slots with the empty right wrist), in fp32."""
    folder, sd = openpi_folder
    assert registry.checkpoint_family(folder) == "pi0"
    policy = registry.load_policy(folder).eval()
    report = policy.conversion_report
    assert report.layout == "openpi" and len(report.mapped) == len(sd) - 1
    assert list(report.dropped) == [U.EXPERT + "lm_head.weight"]
    assert report.mapped["paligemma_with_expert.paligemma.lm_head.weight"] == "model.vlm.language_model.embed_tokens.weight"
    cfg = policy.config
    assert (cfg.width, cfg.depth, cfg.num_heads, cfg.head_dim, cfg.expert_width, cfg.image_size, cfg.chunk_len) == \
        (64, 4, 8, 16, 32, 56, 10)
    assert policy.model.model.dit.embed_tokens is None
    x = _openpi_inputs(folder)
    b = len(x["state"])
    actions = torch.zeros(b, 10, 32)
    actions[..., :7] = torch.randn(b, 10, 7, generator=x["g"])
    noise = torch.randn(b, 10, 32, generator=x["g"])
    time = torch.tensor([0.3, 0.85])
    ref = U.oracle_loss(x["images"], x["masks"], x["tokens"], x["token_masks"], x["state"], actions, noise, time, sd)
    batch = policy.processor.batch(torch.stack(x["images"][:2], 1), torch.stack(x["masks"][:2], 1), PROMPTS,
                                   x["state"][:, :8], actions[..., :7])
    assert batch["input_ids"].shape[1] == 2 * 16 + int(x["token_masks"].sum(1).max())  # padded to the longest prompt
    out = policy.model({**batch, "noise": noise, "time": time})
    assert abs(out.action_loss.item() - ref.item()) < 1e-5 * max(1.0, ref.item())
    ref_chunk = U.oracle_sample(x["images"], x["masks"], x["tokens"], x["token_masks"], x["state"], noise, sd)
    ours = policy.model.predict_normalized(batch, noise=noise)
    assert (ours - ref_chunk).abs().max().item() < 1e-4
    # layer capture: the hook's grid is the prefix stream, layer 0 = the image embeddings themselves
    out0 = policy.model({**batch, "noise": noise, "time": time}, align_layer=0)
    emb = U.siglip(x["images"][0], sd)
    assert torch.allclose(out0.visual_hidden[:, 0].reshape(b, 16, -1), emb, atol=1e-5)
    assert out0.visual_hidden.shape == (b, 2, 4, 4, 64)


def test_raw_observations_go_through_openpis_input_path(openpi_folder):
    """uint8 frames (one letterboxed), the raw state and a prompt -> openpi's resize_with_pad, [-1, 1],
    z-score with +1e-6, the prompt format; actions un-normalised and made absolute on the delta dims."""
    folder, sd = openpi_folder
    policy = registry.load_policy(folder, unnorm_key="libero_tiny").eval()
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (40, 70, 3), dtype=np.uint8), rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)]
    state = rng.normal(size=8)
    obs = {"images": frames, "state": state, "instruction": PROMPTS[1]}
    torch.manual_seed(3)
    noise = torch.randn(1, 10, 32)
    batch = policy.processor(obs, policy.dataset_stats())
    chunk = policy.processor.unnormalize_actions(policy.model.predict_normalized(batch, noise=noise)[0],
                                                 policy.dataset_stats(), state)
    imgs = [U.openpi_image(f, 56)[None] for f in frames]
    s32 = torch.zeros(1, 32, dtype=torch.float32)
    s32[0, :8] = torch.tensor((state - U.STATE_MEAN) / (np.array(U.STATE_STD) + 1e-6), dtype=torch.float32)
    tok, tm = U.openpi_prompt((folder / "tokenizer.model").read_bytes(), PROMPTS[1])
    one = torch.ones(1, dtype=torch.bool)
    ref = U.oracle_sample(imgs + [torch.zeros_like(imgs[0]) - 1], [one, one, ~one], tok[None], tm[None], s32, noise, sd)
    expect = ref[0, :, :7].double().numpy() * (np.array(U.ACTION_STD) + 1e-6) + U.ACTION_MEAN
    expect[:, :6] += state[:6]  # pi0_libero's AbsoluteActions(make_bool_mask(6, -1))
    np.testing.assert_allclose(chunk, expect, atol=1e-4)
    assert batch["pad_mask"][0, 0].float().mean() < 1 and batch["pad_mask"][0, 1].all()  # the letterbox mask
    # a missing or all-black camera is an absent one: masked out of attention
    blank = policy.processor({**obs, "images": [frames[0], None]}, policy.dataset_stats())
    assert blank["image_masks"].tolist() == [[True, False]] and blank["attention_mask"][0, 16:32].sum() == 0


def test_upstream_layouts_and_bad_checkpoints_are_explained(openpi_folder, tmp_path):
    folder, _ = openpi_folder
    lerobot = tmp_path / "lerobot"
    U.write_openpi_checkpoint(lerobot, layout="lerobot")
    obs = {"images": [np.full((56, 56, 3), 90, np.uint8)] * 2, "state": np.zeros(8), "instruction": "go"}
    a = registry.load_policy(folder).eval().predict_action_chunk(obs, generator=torch.Generator().manual_seed(0))
    lr = registry.load_policy(lerobot).eval()
    assert lr.conversion_report.layout == "lerobot"
    np.testing.assert_allclose(lr.predict_action_chunk(obs, generator=torch.Generator().manual_seed(0)), a, atol=1e-6)
    # our format round trip: equal numbers, the tokenizer file travels with it
    saved = registry.load_policy(folder).save_pretrained(tmp_path / "own")
    assert (saved / "tokenizer.model").is_file() and json.loads((saved / "config.json").read_text())["model_type"] == "sf_pi0"
    own = registry.load_policy(saved).eval()
    np.testing.assert_allclose(own.predict_action_chunk(obs, generator=torch.Generator().manual_seed(0)), a, atol=1e-6)
    # a missing tensor
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    sd = load_file(str(broken / "model.safetensors"))
    del sd["action_out_proj.weight"]
    save_file(sd, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing 1 tensors the model needs: \['action_out_proj.weight'\]"):
        registry.load_policy(broken)
    # π0.5 is refused by name
    sd = load_file(str(folder / "model.safetensors"))
    sd["time_mlp_in.weight"] = torch.zeros(2, 2)
    save_file(sd, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match="π0.5"):
        registry.load_policy(broken)
    # an OFT checkpoint passed where π0 is expected
    oft = registry.create_policy("mini", _stats()).save_pretrained(tmp_path / "oft")
    with pytest.raises(ValueError, match="not a π0 checkpoint"):
        Pi0Policy.from_pretrained(oft)
    # no tokenizer
    (broken / "tokenizer.model").unlink()
    shutil.copyfile(folder / "model.safetensors", broken / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="PaliGemma's SentencePiece tokenizer"):
        registry.load_policy(broken)


def _mini(seed=0, **overrides) -> Pi0Policy:
    torch.manual_seed(seed)
    return registry.create_policy("pi0-mini", _stats(), overrides)


def test_masks_reach_the_sf_loss():
    """An all-black camera (absent) and a letterbox pad mask from the pipeline: the policy hands both to the
    SF module (and the teacher sees the absent camera white)."""
    policy = _mini()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 2, 3, 112, 112, generator=g)
    images[1, 1] = 0.0  # sample 1 has no wrist camera
    pad = torch.ones(2, 2, 112, 112, dtype=torch.bool)
    pad[0, 0, :28] = False  # letterbox rows at the top of sample 0's first view
    batch = {IMAGE + "agentview": (images[:, 0] * 255).round().to(torch.uint8),
             IMAGE + "wrist": (images[:, 1] * 255).round().to(torch.uint8),
             PAD_MASK + "agentview": pad[:, 0], PAD_MASK + "wrist": pad[:, 1],
             TASK: PROMPTS, STATE: torch.randn(2, 8, generator=g), ACTION: torch.randn(2, 10, 7, generator=g)}
    step = prepare_batch(batch, ["agentview", "wrist"], policy, torch.device("cpu"))
    assert step.policy["image_masks"].tolist() == [[True, True], [True, False]]
    assert torch.equal(step.teacher["pad_mask"][0], pad[0]) and not step.teacher["pad_mask"][1, 1].any()
    sf = SpatialForcing(AlignConfig(student_layer=4, use_pos_embed=False), policy.visual_dim(4), 12)
    module = TrainModule(policy.model, sf, 0.5, 4)
    grid = TeacherGrid(torch.randn(2, 2, 8, 8, 12, generator=g), torch.ones(2, 2, 8, 8, dtype=torch.bool))
    torch.manual_seed(5)
    loss, metrics = module(step.policy, grid)
    torch.manual_seed(5)
    out = policy.model(step.policy, align_layer=4)
    assert torch.equal(out.slot_mask, step.policy["image_masks"]) and torch.equal(out.pad_mask, pad)
    masked, _ = sf(out.visual_hidden, grid.feats, grid.valid, slot_mask=out.slot_mask, pad_mask=out.pad_mask)
    plain, _ = sf(out.visual_hidden, grid.feats, grid.valid)
    assert abs(metrics["align_loss"].item() - masked.item()) < 1e-6 and abs(masked.item() - plain.item()) > 1e-4
    assert abs(loss.item() - (out.action_loss + 0.5 * masked).item()) < 1e-5


def test_lora_merge_and_gradient_checkpointing_keep_the_numbers():
    policy = _mini()
    inputs = policy.training_inputs(torch.rand(2, 2, 3, 112, 112), PROMPTS, torch.randn(2, 8), torch.randn(2, 10, 7))
    inputs.update(noise=torch.randn(2, 10, 32), time=torch.tensor([0.2, 0.7]))
    peft_model = Pi0Policy.apply_lora(policy.model, r=4, alpha=8)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n and "model.dit." in n for n in trainable) and any("vision_tower" in n for n in trainable)
    assert not any("language_model.layers.0.mlp.up_proj.base_layer" in n for n in trainable)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    peft_model.eval()
    with torch.no_grad():
        before = peft_model(inputs, align_layer=3)
    merged = policy.with_state(merged_lora_state(peft_model)).model.eval()
    with torch.no_grad():
        after = merged(inputs, align_layer=3)
    assert abs(before.action_loss.item() - after.action_loss.item()) < 1e-5
    assert (before.visual_hidden - after.visual_hidden).abs().max().item() < 1e-5
    # recomputing the blocks' activations in backward changes memory, not the numbers
    a, b = _mini(1), _mini(1)
    from spatial_forcing.train.loop import enable_grad_checkpointing

    assert enable_grad_checkpointing(b.model) >= 1
    a.train(), b.train()
    la, lb = a.model(inputs, align_layer=3), b.model(inputs, align_layer=3)
    (la.action_loss + la.visual_hidden.square().mean()).backward()
    (lb.action_loss + lb.visual_hidden.square().mean()).backward()
    assert abs(la.action_loss.item() - lb.action_loss.item()) < 1e-6
    ga = dict(a.model.named_parameters())
    for n, p in b.model.named_parameters():
        assert (p.grad is None) == (ga[n].grad is None), n  # e.g. the unread final norm of the PaliGemma stream
        assert p.grad is None or torch.allclose(p.grad, ga[n].grad, atol=1e-6), n


def test_the_pi0_training_presets_follow_openpi():
    p = TrainConfig.preset("pi0-sf-aloha-place-block")
    assert (p.policy, p.lora_rank, p.sf, p.teacher, p.max_steps, p.batch_size * (p.global_batch_size // p.batch_size)) \
        == ("lerobot/pi0_base", 0, True, "vggt", 20_000, 16)
    assert (p.lr, p.schedule, p.warmup_steps, p.min_lr, p.decay_steps) == (2.5e-5, "cosine", 1000, 2.5e-6, 30_000)
    assert (p.adam_betas, p.adam_eps, p.weight_decay, p.grad_clip, p.grad_checkpointing, p.seed) == \
        ([0.9, 0.95], 1e-8, 1e-10, 1.0, True, 42)
    a = p.align
    assert (a.student_layer, a.teacher_layer, a.use_pos_embed, a.pos_embed_ratio, a.coeff, a.projector_norm) == \
        (12, -1, True, 0.1, 0.5, True)
    assert p.cameras == ["cam_high", "cam_left_wrist", "cam_right_wrist"] and p.policy_overrides["platform"] == "aloha"
    lib = TrainConfig.preset("pi0-sf-libero-spatial")
    assert (lib.global_batch_size, lib.max_steps, lib.chunk_mode, lib.standardize, lib.cameras) == \
        (32, 30_000, "repeat_last", "", ["agentview", "wrist"])
    assert not TrainConfig.preset("pi0-libero-10").sf
    assert {k for k in PRESETS if k.startswith("pi0-")} >= {f"pi0{s}-libero-{x}" for s in ("", "-sf")
                                                            for x in ("spatial", "object", "goal", "10")}
    spec = registry.policy_spec("pi0-mini")
    assert (spec.family, spec.replan_steps, spec.image_ops, spec.norm_type, spec.num_layers) == \
        ("pi0", 5, "openpi", "mean_std", 6)
    with pytest.raises(ValueError, match="needs PaliGemma's tokenizer"):
        registry.create_policy("pi0", _stats())
    with pytest.raises(ValueError, match="unknown Pi0Config fields"):
        registry.create_policy("pi0-mini", _stats(), {"widht": 3})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "ds")


def _config(dataset, out, **kw) -> TrainConfig:
    base = dict(PRESETS["pi0-mini-sf"], dataset=str(dataset), output_dir=str(out), data_mode="memory", num_workers=0,
                batch_size=2, max_steps=4, save_every=2, warmup_steps=0, logger="none", log_every=1, augment=False,
                val_episodes=1)
    base.update(kw)
    return TrainConfig.from_dict(base)


def test_train_with_sf_resume_exactly_then_evaluate_and_serve(dataset, tmp_path):
    """pi0-mini + the geometry teacher: 4 steps straight == 2 + resume 2 (projector saved and reloaded); the
    checkpoint loads, is described for LIBERO with openpi's conventions, and an openpi-style client driving
    `sf serve`'s server gets the actions a direct call gives."""
    from safetensors.torch import load_file

    from spatial_forcing.train.checkpoint import list_checkpoints

    cfg = _config(dataset, tmp_path / "run", keep_last=5)
    s = Trainer(cfg, progress=False).fit()
    assert s["last"]["align_loss"] > 0 and np.isfinite(s["last"]["action_loss"])
    final = {k: v.clone() for k, v in registry.load_policy(Path(s["checkpoint"]) / "policy").model.state_dict().items()}
    for step, folder in list_checkpoints(cfg.output_dir):
        if step > 2:
            shutil.rmtree(folder)
    ckpt = list_checkpoints(cfg.output_dir)[-1][1]
    assert (ckpt / "align_projector.safetensors").is_file()
    resumed = Trainer(cfg, resume="latest", progress=False)
    assert resumed.step == 2
    saved = load_file(str(ckpt / "align_projector.safetensors"))
    assert all(torch.equal(v, resumed.sf.projector.state_dict()[k]) for k, v in saved.items())
    r = resumed.fit()
    for key in ("loss", "action_loss", "align_loss"):
        assert abs(r["last"][key] - s["last"][key]) < 1e-6, key
    folder = Path(r["checkpoint"]) / "policy"
    b = registry.load_policy(folder).model.state_dict()
    assert all(torch.allclose(final[k], b[k], atol=1e-6) for k in final)

    from spatial_forcing.eval.policies import PolicyRef, describe_checkpoint

    info = describe_checkpoint(PolicyRef(kind="checkpoint", source=str(folder)), "libero_object")
    assert (info.image_ops, info.replan_steps, info.action_convention, info.image_size, info.chunk_len) == \
        ("openpi", 5, "raw", 112, 10)

    from spatial_forcing.serve.client import WebsocketClientPolicy
    from spatial_forcing.serve.libero import libero_request
    from spatial_forcing.serve.server import ServeConfig, ServerThread, load_policy

    policy = load_policy(str(folder))
    rng = np.random.default_rng(0)
    agent, wrist = (rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in range(2))
    state = rng.normal(size=8)
    torch.manual_seed(11)
    direct = policy.predict_action_chunk({"images": [agent, wrist], "state": state, "instruction": "put box 0 on the plate"})
    with ServerThread(policy, ServeConfig(host="127.0.0.1", port=0, http_port=None, obs_map="libero"), name="pi0") as running:
        client = WebsocketClientPolicy("127.0.0.1", port=running.server.ws_port)
        meta = client.get_server_metadata()
        torch.manual_seed(11)
        served = client.infer(libero_request(agent, wrist, state, "put box 0 on the plate", resize=None))["actions"]
        client.close()
    assert meta["action_horizon"] == 10 and meta["num_images"] == 2
    np.testing.assert_array_equal(np.asarray(served), direct)

    pytest.importorskip("libero.libero")
    from spatial_forcing.cli import main

    out = tmp_path / "eval"
    assert main(["eval", "libero", "--policy", str(folder), "--suite", "libero_object", "--tasks", "0",
                 "--trials-per-task", "1", "--max-steps", "12", "--videos", "none", "--output", str(out),
                 "--quiet"]) == 0
    (rec,) = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    assert (rec["steps"], rec["queries"]) == (12, 3)  # openpi's LIBERO client: a new chunk every 5 actions
    res = json.loads((out / "results.json").read_text())
    assert res["policy"]["image_ops"] == "openpi" and res["protocol"]["image_ops"] == "openpi"
    assert res["protocol"]["replan_steps"] == 5


def test_openpis_normalisation_rules():
    """openpi `Normalize` / `Unnormalize`: z-score with std + 1e-6 (π0) and quantiles to [-1, 1] with + 1e-6
    (π0.5), never clipped, float64; masked-out dims untouched."""
    from spatial_forcing.normalize import normalize, unnormalize

    st = _stats().action
    x = np.array([[3.0, -2.0, 0.1, 0.0, 5.0, -5.0, 0.5]])
    z = normalize(x, st, "mean_std")
    np.testing.assert_allclose(z, (x - st.mean) / (st.std + 1e-6), rtol=0, atol=1e-15)
    np.testing.assert_allclose(unnormalize(z, st, "mean_std"), x, atol=1e-12)
    q = normalize(x, st, "quantile")
    np.testing.assert_allclose(q, (x - st.q01) / (st.q99 - st.q01 + 1e-6) * 2 - 1, atol=1e-15)
    assert q.max() > 1 and q.min() < -1  # no clipping
    np.testing.assert_allclose(unnormalize(q, st, "quantile"), x, atol=1e-12)
    masked = normalize(x, st, "mean_std", mask=np.array([True] * 6 + [False]))
    assert masked[0, 6] == x[0, 6]
    t = normalize(torch.tensor(x, dtype=torch.float32), st, "mean_std")
    assert t.dtype == torch.float32 and torch.allclose(t, torch.tensor(z, dtype=torch.float32))


def test_sf_convert_pi0_writes_our_format_with_its_report(openpi_folder, tmp_path, capsys):
    """`sf convert pi0`: an openpi checkpoint -> this project's folder (+ conversion_report.json) that predicts
    what the openpi folder predicts; an existing --dst is refused untouched; our own format is refused."""
    from spatial_forcing.cli import main

    folder, _ = openpi_folder
    dst = tmp_path / "converted"
    assert main(["convert", "pi0", "--src", str(folder), "--dst", str(dst)]) == 0
    out = capsys.readouterr().out
    assert "2 cameras at 56 px" in out and "keys" in out
    report = json.loads((dst / "conversion_report.json").read_text())
    assert report and (dst / "config.json").is_file() and (dst / "model.safetensors").is_file()
    assert registry.checkpoint_family(dst) == "pi0"
    obs = {"images": [np.full((56, 56, 3), 90, np.uint8), np.full((48, 64, 3), 30, np.uint8)], "state": np.zeros(8),
           "instruction": "pick up the soup"}
    a, b = registry.load_policy(folder).eval(), registry.load_policy(dst).eval()
    torch.manual_seed(5)
    expect = a.predict_action_chunk(obs)
    torch.manual_seed(5)
    np.testing.assert_allclose(b.predict_action_chunk(obs), expect, atol=1e-6)
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    assert main(["convert", "pi0", "--src", str(folder), "--dst", str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    again = tmp_path / "again"
    assert main(["convert", "pi0", "--src", str(dst), "--dst", str(again)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already in this project's format" in err and not again.exists()
