"""Loading upstream OpenVLA-OFT checkpoints (OPENVLA_OFT.md §7, §8, §14 items 1-5).

A tiny checkpoint in the exact upstream file layout (`tests/oft_upstream.py`) is converted by
`OFTPolicy.from_pretrained` and compared with an independent plain-torch oracle that reads the
original keys (timm ViTs with fused qkv, Llama with the fork's mask rule implemented literally).
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import oft_upstream as U  # noqa: E402

from spatial_forcing.policies.oft.policy import OFTPolicy  # noqa: E402

INSTRUCTIONS = ["put the bowl on the plate",
                "Pick up the black bowl between the plate and the ramekin and place it on the plate",
                "open it"]


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return U.write_upstream_checkpoint(tmp_path_factory.mktemp("oft_upstream") / "libero_spatial")


@pytest.fixture(scope="module")
def policy(ckpt):
    return OFTPolicy.from_pretrained(ckpt["folder"], platform="libero")


def make_batch(ckpt, instructions, views=2, proprio=True, seed=0):
    """Right-padded batch with text ids built straight from SentencePiece (not the processor)."""
    g = torch.Generator().manual_seed(seed)
    ids, mask, lens = U.text_batch(ckpt["model_proto"], instructions, ckpt["space_id"])
    b = len(instructions)
    batch = dict(pixel_values=torch.randn(b, 6 * views, 224, 224, generator=g) * 1.5, input_ids=ids,
                 attention_mask=mask, prompt_lens=lens)
    if proprio:
        batch["proprio"] = torch.rand(b, 8, generator=g) * 2 - 1
    return batch


def oracle(ckpt, batch, **kw):
    return U.oracle_actions(ckpt["weights"], ckpt["dims"], batch["pixel_values"], batch["input_ids"],
                            batch["attention_mask"], batch["prompt_lens"], batch.get("proprio"), **kw)


def assert_matches(actual, expected, rel=1e-4):
    """Elementwise |a - e| <= rel * (|e| + max|e|): relative to the output scale (fp32 vs fp32 oracle)."""
    actual, expected = torch.as_tensor(actual).float(), torch.as_tensor(expected).float()
    assert actual.shape == expected.shape
    scale = expected.abs().max().item()
    assert scale > 0.1, "degenerate oracle output"
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


def sample(batch, i):
    n = int(batch["attention_mask"][i].sum())
    out = {k: v[i:i + 1] for k, v in batch.items()}
    out["input_ids"], out["attention_mask"] = out["input_ids"][:, :n], out["attention_mask"][:, :n]
    return out


def observation(seed=0, size=256):
    rng = np.random.default_rng(seed)
    # Smooth-ish images: low-frequency pattern plus noise, uint8 HWC like the LIBERO renderer.
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)], -1) * 100 + 128
    agent = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    wrist = np.clip(255 - base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    state = np.array([-0.2, 0.1, 1.05, 3.0, -0.1, 0.05, 0.03, -0.03])  # eef pos, axis-angle, gripper qpos
    return {"images": [agent, wrist], "state": state, "instruction": "put the bowl on the plate"}


# ------------------------------------------------------------------------------------------ the fixture itself
def test_fixture_writes_the_upstream_file_set(ckpt):
    folder = ckpt["folder"]
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert names == ckpt["files"]
    assert {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
            "action_head--150000_checkpoint.pt", "proprio_projector--150000_checkpoint.pt", "config.json",
            "dataset_statistics.json", "preprocessor_config.json", "tokenizer.model", "tokenizer_config.json",
            "special_tokens_map.json", "added_tokens.json", "lora_adapter/adapter_config.json"} <= set(names)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ckpt["weights"]["model"])
    assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    from safetensors.torch import load_file
    disk = {k: v for f in set(index["weight_map"].values()) for k, v in load_file(str(folder / f)).items()}
    assert {v.dtype for v in disk.values()} == {torch.bfloat16}
    assert index["metadata"]["total_size"] == sum(v.numel() * 2 for v in disk.values())
    head = torch.load(folder / "action_head--150000_checkpoint.pt", weights_only=True)
    prop = torch.load(folder / "proprio_projector--150000_checkpoint.pt", weights_only=True)
    assert {v.dtype for v in head.values()} == {torch.bfloat16} and {v.dtype for v in prop.values()} == {torch.float32}
    assert all(k.startswith("module.model.") for k in head) and set(prop) == {
        "module.fc1.weight", "module.fc1.bias", "module.fc2.weight", "module.fc2.bias"}
    # 130 source tensors for the tiny layout: DINOv2 5 + 14*3 + 2, SigLIP 3 + 12*3 + 2 + 13, projector 6,
    # LLM 1 + 9*2 + 1 + lm_head.
    sd = ckpt["weights"]["model"]
    assert sum(k.startswith(U.DINO_PREFIX) for k in sd) == 49
    assert sum(k.startswith(U.SIGLIP_PREFIX) for k in sd) == 54
    assert sum(k.startswith("projector.") for k in sd) == 6
    assert sum(k.startswith("language_model.") for k in sd) == 21 and len(sd) == 130
    assert sd[U.DINO_PREFIX + "cls_token"].abs().min() > 0 and sd[U.DINO_PREFIX + "reg_token"].abs().sum() > 0
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "openvla" and cfg["text_config"]["vocab_size"] == 32064
    stats = json.loads((folder / "dataset_statistics.json").read_text())[U.UNNORM_KEY]
    assert stats["action"]["mask"] == [True] * 6 + [False] and len(stats["proprio"]["q01"]) == 8


def test_fixture_layout_at_full_size_matches_the_spec():
    """The generator's key names and shapes, instantiated at the published sizes (meta tensors):
    982 = 343 + 342 + 6 + 291 tensors, 44 unused, head parameter counts of §1."""
    sd, head, prop = U.make_upstream_state_dict(U.published_dims(), seed=None)
    assert len(sd) == 982
    assert sum(k.startswith(U.DINO_PREFIX) for k in sd) == 343
    assert sum(k.startswith(U.SIGLIP_PREFIX) for k in sd) == 342
    assert len(U.unused_upstream_keys(sd, U.published_dims())) == 44
    shapes = {
        U.DINO_PREFIX + "pos_embed": (1, 256, 1024), U.DINO_PREFIX + "reg_token": (1, 4, 1024),
        U.DINO_PREFIX + "patch_embed.proj.weight": (1024, 3, 14, 14),
        U.DINO_PREFIX + "blocks.23.attn.qkv.weight": (3072, 1024), U.DINO_PREFIX + "blocks.0.mlp.fc1.weight": (4096, 1024),
        U.DINO_PREFIX + "blocks.0.ls1.scale_factor": (1024,),
        U.SIGLIP_PREFIX + "blocks.26.attn.qkv.weight": (3456, 1152), U.SIGLIP_PREFIX + "blocks.0.mlp.fc1.weight": (4304, 1152),
        U.SIGLIP_PREFIX + "attn_pool.kv.weight": (2304, 1152), U.SIGLIP_PREFIX + "attn_pool.latent": (1, 1, 1152),
        "projector.fc1.weight": (8704, 2176), "projector.fc2.weight": (4096, 8704), "projector.fc3.weight": (4096, 4096),
        "language_model.model.embed_tokens.weight": (32064, 4096), "language_model.lm_head.weight": (32064, 4096),
        "language_model.model.layers.31.mlp.down_proj.weight": (4096, 11008)}
    for k, shape in shapes.items():
        assert tuple(sd[k].shape) == shape, k
    assert sum(v.numel() for v in head.values()) == 151_117_831
    assert sum(v.numel() for v in prop.values()) == 16_818_176


# ------------------------------------------------------------------------------------------ key accounting
def test_dropped_keys_are_exactly_the_documented_unused_ones(policy, ckpt):
    rep = policy.conversion_report
    sd, dims = ckpt["weights"]["model"], ckpt["dims"]
    unused = U.unused_upstream_keys(sd, dims)
    assert len(rep.dropped) == len(set(rep.dropped)) == len(unused) == 14 + 2 + 12 + 2 + 13 + 1
    assert set(rep.dropped) == unused
    # Every other model tensor is mapped; the only other mapped sources are the two head files.
    assert set(rep.mapped) & set(sd) == set(sd) - unused
    assert len(set(sd) - unused) == 86
    extra = set(rep.mapped) - set(sd)
    assert len(extra) == len(ckpt["weights"]["action_head"]) + len(ckpt["weights"]["proprio_projector"]) == 20
    # Targets: every model tensor exactly once (plus the created, unused DINOv2 mask token).
    targets = [t for ts in rep.mapped.values() for t in ([ts] if isinstance(ts, str) else ts)]
    assert len(targets) == len(set(targets))
    assert set(targets) | set(getattr(rep, "created", [])) == set(policy.model.state_dict())
    summary = rep.summary()
    assert "44" in summary and str(len(rep.mapped)) in summary


def _head_source(ckpt, src):
    """The head tensor a synthetic head source name refers to (longest matching key suffix)."""
    part = "proprio_projector" if "proprio" in src else "action_head"
    heads = {k.removeprefix("module."): v for k, v in ckpt["weights"][part].items()}
    match = max((k for k in heads if src.endswith(k)), key=len)
    return heads[match]


def test_inverse_mapping_reproduces_every_source_tensor_bit_exactly(policy, ckpt):
    """Re-concatenate q,k,v, drop the zero CLS position row, re-add the SigLIP batch dim: the result
    equals the (bf16) source tensor bit for bit, for every mapped source key."""
    msd = policy.model.state_dict()
    sd = ckpt["weights"]["model"]
    for src, targets in policy.conversion_report.mapped.items():
        targets = [targets] if isinstance(targets, str) else list(targets)
        ts = [msd[t] for t in targets]
        ref = sd[src] if src in sd else _head_source(ckpt, src)
        if len(ts) == 3:
            assert src.endswith(("attn.qkv.weight", "attn.qkv.bias")), src
            assert [t.rsplit(".", 2)[-2] for t in targets] == ["q_proj", "k_proj", "v_proj"], targets
            rec = torch.cat(ts, dim=0)
        elif src == U.DINO_PREFIX + "pos_embed":
            assert ts[0].shape == (1, 257, ref.shape[-1])
            assert torch.count_nonzero(ts[0][:, 0]) == 0, "the DINOv2 CLS position row must be zero"
            rec = ts[0][:, 1:]
        elif src == U.SIGLIP_PREFIX + "pos_embed":
            rec = ts[0][None]
        else:
            assert len(ts) == 1, (src, targets)
            rec = ts[0]
        assert rec.shape == ref.shape, src
        assert torch.equal(rec.float(), ref.float()), src


def test_conversion_of_the_full_size_layout_covers_the_model_exactly(tmp_path):
    """§14.2 count check on the real layout (meta tensors, no memory): all 982 + head tensors map onto
    an `OFTModel(openvla-7b)` key set with matching shapes; Llama dims come from the defaults."""
    from spatial_forcing.policies.oft.config import OFTConfig
    from spatial_forcing.policies.oft.model import OFTModel
    from spatial_forcing.policies.oft.weights import convert_upstream_state_dict, upstream_config

    dims = U.published_dims()
    sd, head, prop = U.make_upstream_state_dict(dims, seed=None)
    head = {k.removeprefix("module."): v for k, v in head.items()}
    prop = {k.removeprefix("module."): v for k, v in prop.items()}
    (tmp_path / "config.json").write_text(json.dumps(U.upstream_config_json(dims, explicit_text_config=False)))
    cfg = upstream_config(tmp_path, sd, head, prop, "libero")
    ref = OFTConfig.preset("openvla-7b")
    for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size",
                 "rms_norm_eps", "dino_hidden", "dino_depth", "dino_heads", "dino_registers", "siglip_hidden",
                 "siglip_depth", "siglip_heads", "siglip_intermediate", "image_size", "patch_size", "chunk_len",
                 "action_dim", "proprio_dim", "num_images", "use_proprio", "prompt_space_id", "pad_token_id"):
        assert getattr(cfg, name) == getattr(ref, name), name
    out, rep = convert_upstream_state_dict(sd, cfg, head, prop)
    with torch.device("meta"):
        expected = OFTModel(cfg).state_dict()
    assert set(out) == set(expected)
    bad = [k for k in expected if tuple(out[k].shape) != tuple(expected[k].shape)]
    assert not bad, bad[:5]
    assert set(rep.dropped) == U.unused_upstream_keys(sd, dims) and len(rep.dropped) == 44
    assert len(set(rep.mapped) & set(sd)) == 982 - 44


# ------------------------------------------------------------------------------------------ block by block
def test_dinov2_layers_match_the_timm_layout(policy, ckpt):
    """Embeddings ([CLS, reg x 4, patches + pos]) and every converted HF layer against the oracle's
    timm block on the same input; then the guard: a non-zero CLS position row would be caught."""
    fe = policy.model.vision_backbone.featurizer
    sd, dims = ckpt["weights"]["model"], ckpt["dims"]
    assert fe.config.num_attention_heads == dims["dino_heads"] == 2
    assert fe.config.num_hidden_layers == dims["dino_depth"] - 1 and fe.config.image_size == 224
    assert torch.count_nonzero(fe.embeddings.mask_token) == 0
    img = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        x = fe.embeddings(img)
        ref = U.dino_embed(img, sd)
        assert x.shape == (2, 1 + 4 + 256, dims["dino_hidden"])
        assert_matches(x, ref, 1e-5)
        for i, layer in enumerate(fe.encoder.layer):
            out = layer(ref)
            out = out[0] if isinstance(out, tuple) else out
            ref = U.timm_block(ref, sd, f"{U.DINO_PREFIX}blocks.{i}.", dims["dino_heads"], layer_scale=True)
            assert_matches(out, ref, 1e-5)
        # Guard: a non-zero CLS position row (timm adds none) changes every later patch output.
        # (A random row: a constant shift would be invisible through the LayerNorms.)
        bad = copy.deepcopy(fe)
        bad.embeddings.position_embeddings.data[:, 0] = torch.randn(dims["dino_hidden"],
                                                                   generator=torch.Generator().manual_seed(9))
        y = bad.embeddings(img)
        for layer in bad.encoder.layer:
            y = layer(y)
            y = y[0] if isinstance(y, tuple) else y
        assert (y[:, 5:] - ref[:, 5:]).abs().max() > 1e-2


def test_siglip_layers_and_fused_features_match_the_oracle(policy, ckpt):
    fs = policy.model.vision_backbone.fused_featurizer
    sd, dims = ckpt["weights"]["model"], ckpt["dims"]
    assert fs.config.num_attention_heads == dims["siglip_heads"] == 2 and fs.config.hidden_act == "gelu"
    g = torch.Generator().manual_seed(4)
    img = torch.randn(2, 3, 224, 224, generator=g)
    with torch.no_grad():
        ref = U.patchify(img, sd, U.SIGLIP_PREFIX) + sd[U.SIGLIP_PREFIX + "pos_embed"]
        assert_matches(fs.embeddings(img), ref, 1e-5)
        for i, layer in enumerate(fs.encoder.layers):
            out = layer(ref, attention_mask=None)
            out = out[0] if isinstance(out, tuple) else out
            ref = U.timm_block(ref, sd, f"{U.SIGLIP_PREFIX}blocks.{i}.", dims["siglip_heads"], layer_scale=False)
            assert_matches(out, ref, 1e-5)
        # Whole fused backbone on two 6-channel views: [dino(ch 0-2) || siglip(ch 3-5)], views along tokens.
        pv = torch.randn(2, 12, 224, 224, generator=g)
        fused = policy.model.vision_backbone(pv)
        sl = lambda v: pv[:, 6 * v:6 * v + 6]  # noqa: E731
        want = torch.cat([torch.cat([U.dino_features(sl(v)[:, :3], sd, dims), U.siglip_features(sl(v)[:, 3:], sd, dims)],
                                    -1) for v in range(2)], 1)
        assert fused.shape == (2, 512, dims["dino_hidden"] + dims["siglip_hidden"])
        assert_matches(fused, want, 1e-5)
        # Guard: tanh-GELU SigLIP features differ far beyond the tolerance used above.
        tanh = torch.cat([U.siglip_features(sl(v)[:, 3:], sd, dims, variant="tanh_gelu") for v in range(2)], 1)
        err = (fused[..., dims["dino_hidden"]:] - tanh).abs().max().item()
        assert err > 5 * 1e-5 * want.abs().max().item()
        assert err > 50 * (fused - want).abs().max().item()


# ------------------------------------------------------------------------------------------ round trip vs oracle
def test_tokenisation_matches_sentencepiece(policy, ckpt):
    assert policy.config.prompt_space_id == ckpt["space_id"]
    ids, mask, lens = U.text_batch(ckpt["model_proto"], INSTRUCTIONS, ckpt["space_id"])
    got = policy.processor.text_inputs(INSTRUCTIONS)
    assert torch.equal(got["input_ids"], ids)
    assert torch.equal(got["attention_mask"].bool(), mask)
    assert torch.equal(got["prompt_lens"], lens)
    assert len(set(lens.tolist())) == 3  # really different prompt lengths


def test_image_statistics_come_from_preprocessor_config(policy):
    (dm, ds), (sm, ss) = policy.processor.image_norm
    assert list(dm) == U.DINO_MEAN_BF16 and list(ds) == U.DINO_STD_BF16
    assert list(sm) == [0.5] * 3 and list(ss) == [0.5] * 3


def test_oracle_mask_rule_is_key_only():
    """Self-check of the oracle: the fork's last-row copy of the 4.40.1 causal+padding mask gives, for
    right padding, 0 on every real key and min on every pad key, identical for all queries."""
    real = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    m = U.fork_attention_mask(real, torch.float32)
    lo = torch.finfo(torch.float32).min
    want = torch.where(real, 0.0, lo)[:, None, None, :].expand(2, 1, 5, 5)
    assert torch.equal(m, want)
    causal = U.fork_attention_mask(real, torch.float32, causal_only=True)
    assert causal[0, 0, 0, 1] == lo and causal[1, 0, 4, 3] == lo and causal[1, 0, 2, 2] == 0


def test_other_layout_variants_load(tmp_path):
    """Another seed, three shards, no lora_adapter/, the goal suite's step 50000."""
    info = U.write_upstream_checkpoint(tmp_path / "goal", seed=1, shards=3, with_lora_stub=False, step=50000)
    assert len({v for v in json.loads((tmp_path / "goal" / "model.safetensors.index.json").read_text())
                ["weight_map"].values()}) == 3
    pol = OFTPolicy.from_pretrained(info["folder"], platform="libero")
    batch = make_batch(info, INSTRUCTIONS[1:], seed=7)
    assert_matches(pol.model.predict_normalized(batch), oracle(info, batch))


def test_batch_of_one_matches_the_oracle(policy, ckpt):
    batch = make_batch(ckpt, INSTRUCTIONS[:1])
    got = policy.model.predict_normalized(batch)
    assert got.dtype == torch.float32 and got.shape == (1, 8, 7)
    assert_matches(got, oracle(ckpt, batch))


def test_right_padded_batch_of_three_matches_the_oracle_and_single_samples(policy, ckpt):
    batch = make_batch(ckpt, INSTRUCTIONS, seed=1)
    assert not batch["attention_mask"].all()
    got = policy.model.predict_normalized(batch)
    want = oracle(ckpt, batch)
    assert_matches(got, want)
    for i in range(3):
        assert_matches(policy.model.predict_normalized(sample(batch, i))[0], want[i])
    assert (want[0] - want[2]).abs().max() > 1e-2  # different inputs give different actions


@pytest.mark.parametrize("views,proprio", [(1, True), (2, False), (1, False)])
def test_overrides_single_view_and_no_proprio_match_the_oracle(ckpt, views, proprio):
    pol = OFTPolicy.from_pretrained(ckpt["folder"], platform="libero", num_images=views, use_proprio=proprio)
    assert pol.config.num_images == views and pol.config.use_proprio == proprio
    assert pol.config.num_prefix_tokens == 256 * views + int(proprio)
    batch = make_batch(ckpt, INSTRUCTIONS[::2], views=views, proprio=proprio, seed=2)
    assert_matches(pol.model.predict_normalized(batch), oracle(ckpt, batch))


def test_bf16_load_is_close_to_the_fp32_oracle(ckpt):
    pol = OFTPolicy.from_pretrained(ckpt["folder"], platform="libero", dtype=torch.bfloat16)
    assert next(pol.model.parameters()).dtype == torch.bfloat16
    batch = make_batch(ckpt, INSTRUCTIONS, seed=1)
    got = pol.model.predict_normalized(batch).float()
    want = oracle(ckpt, batch)
    scale = want.abs().max()
    assert (got - want).abs().max() < 0.06 * scale
    assert (got - want).abs().mean() < 0.015 * scale


def test_guards_each_broken_rule_changes_the_output(policy, ckpt):
    """The comparison can fail: every deliberately broken oracle rule moves the actions far beyond
    the round-trip tolerance (causal mask, unshifted readout, last block + norm, non-zero placeholders)."""
    batch = make_batch(ckpt, INSTRUCTIONS, seed=1)
    got = policy.model.predict_normalized(batch)
    scale = got.abs().max().item()
    for variant in ("causal", "no_shift", "last_block", "keep_placeholders"):
        err = (oracle(ckpt, batch, variant=variant) - got).abs().max().item()
        assert err > 100 * 1e-4 * scale, variant


def test_bidirectional_attention_eos_placeholders_and_padding(policy, ckpt):
    """§14.4 on the converted model: the EOS (after the readout slice) changes the first action;
    placeholder ids are irrelevant (zeroed); pad ids change nothing."""
    batch = make_batch(ckpt, INSTRUCTIONS, seed=5)
    base = policy.model.predict_normalized(batch)
    ids, lens = batch["input_ids"], batch["prompt_lens"]
    eos = [int(batch["attention_mask"][i].sum()) - 1 for i in range(3)]
    assert all(int(ids[i, e]) == U.EOS_ID for i, e in enumerate(eos))
    changed = dict(batch, input_ids=ids.clone())
    for i, e in enumerate(eos):
        changed["input_ids"][i, e] = 7
    assert ((policy.model.predict_normalized(changed) - base)[:, 0].abs().amax(-1) > 1e-4).all()
    placeholders = dict(batch, input_ids=ids.clone())
    g = torch.Generator().manual_seed(0)
    for i, p in enumerate(lens.tolist()):
        placeholders["input_ids"][i, 1 + p:1 + p + 56] = torch.randint(3, 32000, (56,), generator=g)
    assert torch.equal(policy.model.predict_normalized(placeholders), base)
    padded = dict(batch, input_ids=ids.clone())
    padded["input_ids"][~batch["attention_mask"]] = 5
    torch.testing.assert_close(policy.model.predict_normalized(padded), base, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ policy API
def test_predict_action_chunk_returns_robot_units(policy, ckpt):
    obs = observation()
    stats = ckpt["stats"][U.UNNORM_KEY]
    got = policy.predict_action_chunk(obs, unnorm_key=U.UNNORM_KEY)
    assert isinstance(got, np.ndarray) and got.shape == (8, 7) and np.issubdtype(got.dtype, np.floating)
    proc = policy.processor
    pv = proc.pixel_values(obs["images"], center_crop=proc.center_crop)[None]
    ids, mask, lens = U.text_batch(ckpt["model_proto"], [obs["instruction"]], ckpt["space_id"])
    proprio = torch.tensor(U.normalize_q99(obs["state"], stats["proprio"]), dtype=torch.float32)[None]
    assert proprio.abs().max() == 1.0  # the state exercises clipping
    norm = U.oracle_actions(ckpt["weights"], ckpt["dims"], pv, ids, mask, lens, proprio)[0].double().numpy()
    q01, q99 = np.array(stats["action"]["q01"]), np.array(stats["action"]["q99"])
    want = norm.copy()
    want[:, :6] = 0.5 * (norm[:, :6] + 1) * (q99[:6] - q01[:6] + 1e-8) + q01[:6]
    scale = np.abs(want).max()
    np.testing.assert_allclose(got[:, :6], want[:, :6], rtol=1e-4, atol=1e-4 * scale)
    np.testing.assert_allclose(got[:, 6], norm[:, 6], rtol=1e-4, atol=1e-4 * np.abs(norm).max())
    np.testing.assert_allclose(got, U.unnormalize_q99(norm, stats["action"]), rtol=1e-4, atol=1e-4 * scale)
    # The default key (the only one in the file) gives the same answer.
    assert np.array_equal(policy.predict_action_chunk(obs), got)


def test_own_format_round_trip_is_bit_identical(policy, ckpt, tmp_path):
    dst = policy.save_pretrained(tmp_path / "own")
    assert json.loads((Path(dst) / "config.json").read_text())["model_type"] == "oft"
    again = OFTPolicy.from_pretrained(dst)
    assert again.conversion_report is None or not again.conversion_report.mapped
    sd0, sd1 = policy.model.state_dict(), again.model.state_dict()
    assert set(sd0) == set(sd1) and all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    assert again.config == policy.config
    obs = observation(seed=1)
    assert np.array_equal(again.predict_action_chunk(obs, unnorm_key=U.UNNORM_KEY),
                          policy.predict_action_chunk(obs, unnorm_key=U.UNNORM_KEY))
    batch = make_batch(ckpt, INSTRUCTIONS, seed=6)
    assert torch.equal(again.model.predict_normalized(batch), policy.model.predict_normalized(batch))


# ------------------------------------------------------------------------------------------ bad input
def _copy(ckpt, tmp_path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(ckpt["folder"], dst)
    return dst


def _load_and_predict(folder):
    pol = OFTPolicy.from_pretrained(folder, platform="libero")
    return pol.predict_action_chunk(observation())


def test_missing_dataset_statistics_names_the_file(ckpt, tmp_path):
    folder = _copy(ckpt, tmp_path)
    (folder / "dataset_statistics.json").unlink()
    with pytest.raises((FileNotFoundError, ValueError), match="dataset_statistics.json"):
        _load_and_predict(folder)


def test_missing_action_head_names_the_file(ckpt, tmp_path):
    folder = _copy(ckpt, tmp_path)
    (folder / "action_head--150000_checkpoint.pt").unlink()
    with pytest.raises((FileNotFoundError, ValueError), match="action_head"):
        OFTPolicy.from_pretrained(folder, platform="libero")


def test_action_head_with_the_wrong_action_dim_is_a_clear_error(ckpt, tmp_path):
    folder = _copy(ckpt, tmp_path)
    path = folder / "action_head--150000_checkpoint.pt"
    head = torch.load(path, weights_only=True)
    head["module.model.fc2.weight"] = head["module.model.fc2.weight"][:6].clone()
    head["module.model.fc2.bias"] = head["module.model.fc2.bias"][:6].clone()
    torch.save(head, path)
    with pytest.raises(ValueError) as info:
        OFTPolicy.from_pretrained(folder, platform="libero")
    msg = str(info.value)
    assert "action_dim" in msg and "6" in msg and "7" in msg, msg


def test_unknown_unnorm_key_lists_the_available_keys(policy, ckpt):
    with pytest.raises((KeyError, ValueError), match=U.UNNORM_KEY):
        policy.predict_action_chunk(observation(), unnorm_key="libero_goal_no_noops")
    with pytest.raises((KeyError, ValueError), match=U.UNNORM_KEY):
        OFTPolicy.from_pretrained(ckpt["folder"], platform="libero", unnorm_key="bridge_orig")


@pytest.mark.parametrize("bad", ["float_hwc", "uint8_chw", "gray", "one_view", "three_views"])
def test_bad_images_are_rejected(policy, bad):
    obs = observation()
    agent, wrist = obs["images"]
    images = {"float_hwc": [agent.astype(np.float32), wrist],
              "uint8_chw": [agent.transpose(2, 0, 1).copy(), wrist],
              "gray": [agent[..., 0], wrist],
              "one_view": [agent],
              "three_views": [agent, wrist, wrist]}[bad]
    with pytest.raises((ValueError, TypeError), match="images"):
        policy.predict_action_chunk(dict(obs, images=images))


@pytest.mark.parametrize("length", [7, 9])
def test_state_of_the_wrong_length_is_rejected(policy, length):
    with pytest.raises(ValueError, match="8"):
        policy.predict_action_chunk(dict(observation(), state=np.zeros(length)))


def test_base_openvla_without_heads_gets_new_heads(tmp_path):
    """`openvla/openvla-7b` ships no head files: load its body, create fresh heads to fine-tune."""
    import torch

    from oft_upstream import write_upstream_checkpoint
    from spatial_forcing.policies.oft.policy import OFTPolicy

    for name in ("base", "full"):
        write_upstream_checkpoint(tmp_path / name, with_lora_stub=False)
    for f in (tmp_path / "base").glob("*_checkpoint.pt"):
        f.unlink()
    policy = OFTPolicy.from_pretrained(tmp_path / "base", dtype=torch.float32)
    report = policy.conversion_report
    assert "action_head.* (new, randomly initialised)" in report.created
    assert "proprio_projector.* (new, randomly initialised)" in report.created
    assert policy.config.use_proprio and policy.config.action_dim == 7
    fine_tuned = OFTPolicy.from_pretrained(tmp_path / "full", dtype=torch.float32)
    body = [k for k in fine_tuned.model.state_dict() if k.startswith(("vision_backbone.", "language_model."))]
    assert body and all(torch.equal(policy.model.state_dict()[k], fine_tuned.model.state_dict()[k]) for k in body)
