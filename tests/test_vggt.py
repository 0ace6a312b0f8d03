"""VGGT: RoPE, aggregator invariants, strict weight loading, the teacher's preprocessing."""

import math

import pytest
import torch

from spatial_forcing.teachers.vggt import VGGT, VGGTConfig, VGGTTeacher, config_from_state_dict, working_size
from spatial_forcing.teachers.vggt.layers import Rope2D
from spatial_forcing.teachers.vggt.teacher import patch_validity, prepare_images


def tiny(**kw) -> VGGTConfig:
    return VGGTConfig.preset("tiny", **kw)


def upstream_state_dict(cfg: VGGTConfig, seed: int = 0) -> dict:
    """A random checkpoint in the upstream model.pt layout: every head, incl. track-head keys."""
    torch.manual_seed(seed)
    full = VGGT(VGGTConfig(**{**cfg.to_dict(), "enable_camera": True, "enable_depth": True, "enable_point": True}))
    sd = {k: torch.randn_like(v) * 0.2 if v.ndim > 1 else v + 0.05 * torch.randn_like(v)
          for k, v in full.state_dict().items()}
    sd["track_head.tracker.updateformer.virual_tracks"] = torch.randn(1, 64, 1, 384)
    sd["track_head.feature_extractor.norm.weight"] = torch.ones(2 * cfg.embed_dim)
    return sd


# ---------------------------------------------------------------- RoPE
def test_rope_origin_is_identity():
    cos, sin = Rope2D(100).tables(torch.zeros(3, 2, dtype=torch.long), 16)
    t = torch.randn(2, 4, 3, 16)
    assert torch.equal(Rope2D.apply(t, cos, sin), t)


def test_rope_scores_depend_only_on_relative_offset():
    rope = Rope2D(100)
    q, k = torch.randn(1, 1, 1, 64, dtype=torch.float64).float(), torch.randn(1, 1, 1, 64).float()

    def score(pq, pk):
        cq, sq = rope.tables(torch.tensor([pq]), 64)
        ck, sk = rope.tables(torch.tensor([pk]), 64)
        return (Rope2D.apply(q, cq, sq) * Rope2D.apply(k, ck, sk)).sum().item()

    a = score((2, 3), (5, 7))
    assert a == pytest.approx(score((10, 1), (13, 5)), abs=1e-4)  # same offset (3, 4)
    assert a == pytest.approx(score((0, 0), (3, 4)), abs=1e-4)
    assert abs(a - score((2, 3), (5, 8))) > 1e-3  # another offset gives another score


def test_rope_halves_y_then_x_and_fp32_tables():
    rope = Rope2D(100)
    cos, sin = rope.tables(torch.tensor([[3, 0]]), 8)  # y = 3, x = 0
    assert cos.dtype == torch.float32
    # head 8: y half = dims 0..3 with inv_freq [1, 1/100^(1/2)] -> angles [3, .3, 3, .3]
    assert cos[0, :4].tolist() == pytest.approx([math.cos(3), math.cos(0.3), math.cos(3), math.cos(0.3)], abs=1e-6)
    assert cos[0, 4:].tolist() == pytest.approx([1, 1, 1, 1]) and sin[0, 4:].abs().max() == 0
    # bf16 input: the rotation is done in fp32 (angle 37 rad stays exact) and cast back.
    cos37, sin37 = rope.tables(torch.tensor([[37, 37]]), 8)
    t = torch.randn(1, 8).bfloat16()
    out = Rope2D.apply(t, cos37, sin37)
    exact = Rope2D.apply(t.double(), cos37.double(), sin37.double())
    assert out.dtype == torch.bfloat16 and torch.allclose(out.double(), exact, atol=2e-2)


# ---------------------------------------------------------------- sizes of the real model
def test_vggt_1b_key_and_parameter_counts():
    with torch.device("meta"):
        agg = VGGT(VGGTConfig())
        full = VGGT(VGGTConfig(enable_camera=True, enable_depth=True, enable_point=True))
    sd = agg.state_dict()
    assert len(sd) == 1210 and sum(v.numel() for v in sd.values()) == 909_112_320
    assert sum(1 for k in sd if k.startswith("aggregator.patch_embed.")) == 344
    assert sd["aggregator.patch_embed.pos_embed"].shape == (1, 1370, 1024)
    assert sd["aggregator.register_token"].shape == (1, 2, 4, 1024)
    assert sd["aggregator.global_blocks.23.attn.k_norm.bias"].shape == (64,)
    assert len(full.state_dict()) == 1210 + 69 + 62 + 62
    assert "aggregator._resnet_mean" not in sd  # non-persistent buffers


def test_eps_values():
    m = VGGT(tiny())
    assert m.aggregator.patch_embed.blocks[0].norm1.eps == 1e-6 and m.aggregator.patch_embed.norm.eps == 1e-6
    block = m.aggregator.frame_blocks[0]
    assert block.norm1.eps == 1e-5 and block.attn.q_norm.eps == 1e-5 and block.attn.k_norm.eps == 1e-5


# ---------------------------------------------------------------- aggregator invariants
def test_permuting_non_first_views_permutes_outputs():
    torch.manual_seed(0)
    agg = VGGT(tiny()).aggregator.eval()
    with torch.no_grad():  # trained special tokens are far from their 1e-6 initialisation
        agg.camera_token.normal_()
        agg.register_token.normal_()
    x = torch.rand(1, 3, 3, 56, 70)
    with torch.no_grad():
        out = agg(x, layers=[-1])[-1]
        swapped = agg(x[:, [0, 2, 1]], layers=[-1])[-1]
    assert torch.allclose(swapped[:, 0], out[:, 0], atol=1e-5)
    assert torch.allclose(swapped[:, 1], out[:, 2], atol=1e-5)
    assert torch.allclose(swapped[:, 2], out[:, 1], atol=1e-5)
    # Moving a view into the reference slot changes what everyone sees.
    with torch.no_grad():
        moved = agg(x[:, [1, 0, 2]], layers=[-1])[-1]
    assert not torch.allclose(moved[:, 1], out[:, 0], atol=1e-3)


def test_first_frame_special_tokens_differ_from_the_rest():
    torch.manual_seed(0)
    agg = VGGT(tiny()).aggregator.eval()
    with torch.no_grad():
        agg.camera_token.normal_()
        agg.register_token.normal_()
        frame = torch.rand(1, 1, 3, 28, 28)
        out = agg(frame.repeat(1, 2, 1, 1, 1), layers=[0])[0]
        assert not torch.allclose(out[:, 0], out[:, 1], atol=1e-4)  # same pixels, different special tokens
        agg.camera_token[:, 1] = agg.camera_token[:, 0]
        agg.register_token[:, 1] = agg.register_token[:, 0]
        same = agg(frame.repeat(1, 2, 1, 1, 1), layers=[0])[0]
    assert torch.allclose(same[:, 0], same[:, 1], atol=1e-5)


def test_layer_subset_stops_early_and_matches_full_run():
    agg = VGGT(tiny()).aggregator.eval()
    x = torch.rand(2, 2, 3, 42, 42)
    with torch.no_grad():
        full = agg(x)
        first = agg(x, layers=[0])
    assert first[1] is None and torch.equal(first[0], full[0])
    assert full[1].shape == (2, 2, 5 + 9, 64)


def test_dino_position_table_interpolates_for_other_grids():
    dino = VGGT(tiny()).aggregator.patch_embed
    assert dino.position_table(37, 37) is dino.pos_embed
    t = dino.position_table(21, 37)
    assert t.shape == (1, 1 + 21 * 37, 32) and torch.equal(t[:, 0], dino.pos_embed[:, 0])


# ---------------------------------------------------------------- weights
def test_strict_load_of_upstream_layout_skips_heads_on_purpose(tmp_path):
    cfg = tiny()
    sd = upstream_state_dict(cfg)
    torch.save(sd, tmp_path / "model.pt")
    model = VGGT.from_pretrained(tmp_path / "model.pt")
    report = model.load_report
    assert report.loaded == len([k for k in sd if k.startswith("aggregator.")])
    assert set(report.skipped) == {"camera_head.", "depth_head.", "point_head.", "track_head."}
    assert report.skipped["track_head."] == 2
    assert torch.equal(model.aggregator.frame_blocks[1].attn.qkv.weight, sd["aggregator.frame_blocks.1.attn.qkv.weight"])
    assert model.config.num_heads == cfg.num_heads and model.config.depth == cfg.depth


def test_heads_load_when_asked(tmp_path):
    cfg = tiny()
    sd = upstream_state_dict(cfg)
    torch.save(sd, tmp_path / "model.pt")
    cfg.save(tmp_path / "config.json")  # dpt_layers of a 2-block model cannot be read from shapes
    model = VGGT.from_pretrained(tmp_path, heads=("depth", "camera"))
    assert model.depth_head is not None and model.point_head is None
    assert set(model.load_report.skipped) == {"point_head.", "track_head."}
    with torch.no_grad():
        out = model(torch.rand(1, 2, 3, 28, 42))
    assert out["depth"].shape == (1, 2, 28, 42, 1) and out["pose_enc"].shape == (1, 2, 9)
    assert (out["depth"] >= 0).all() and (out["depth_conf"] >= 1).all()


@pytest.mark.parametrize("mutate, message", [
    (lambda sd: sd.pop("aggregator.frame_blocks.1.attn.q_norm.weight"), "aggregator.frame_blocks.1.attn.q_norm.weight"),
    (lambda sd: sd.__setitem__("aggregator.extra_thing", torch.zeros(3)), "aggregator.extra_thing"),
    (lambda sd: sd.__setitem__("aggregator.camera_token", torch.zeros(1, 3, 1, 32)), "aggregator.camera_token"),
])
def test_missing_extra_or_misshaped_key_fails_with_its_name(tmp_path, mutate, message):
    sd = {k: v for k, v in upstream_state_dict(tiny()).items() if k.startswith("aggregator.")}
    mutate(sd)
    torch.save(sd, tmp_path / "model.pt")
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        VGGT.from_pretrained(tmp_path / "model.pt", config=tiny())


def test_safetensors_round_trip_gives_identical_features(tmp_path):
    torch.manual_seed(1)
    model = VGGT(tiny()).eval()
    model.save_pretrained(tmp_path / "ckpt")
    again = VGGT.from_pretrained(tmp_path / "ckpt")
    x = torch.rand(1, 2, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(model.aggregator(x)[-1], again.aggregator(x)[-1])
    assert (tmp_path / "ckpt" / "config.json").is_file() and (tmp_path / "ckpt" / "model.safetensors").is_file()


def test_bad_weight_files_fail_clearly(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="expected a state dict"):
        VGGT.from_pretrained(tmp_path / "list.pt")
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="not a torch state dict"):
        VGGT.from_pretrained(tmp_path / "junk.pt")
    torch.save({"model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4)}, tmp_path / "llama.pt")
    with pytest.raises(ValueError, match="not a VGGT checkpoint"):
        VGGT.from_pretrained(tmp_path / "llama.pt")
    torch.save({"model": {"a": torch.zeros(1)}, "step": 3}, tmp_path / "train.pt")
    with pytest.raises(ValueError, match="training checkpoint"):
        VGGT.from_pretrained(tmp_path / "train.pt")
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        VGGT.from_pretrained(tmp_path / "absent.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no VGGT weights found"):
        VGGT.from_pretrained(tmp_path / "empty")


def test_config_inference_matches_1b_shapes():
    with torch.device("meta"):
        sd = VGGT(VGGTConfig()).state_dict()
    cfg = config_from_state_dict(sd)
    assert cfg == VGGTConfig()


# ---------------------------------------------------------------- teacher preprocessing and output
def test_working_sizes():
    assert working_size(224, 224) == (518, 518)
    assert working_size(480, 640) == (392, 518)  # round(27.75) * 14
    assert working_size(480, 640, mode="pad") == (392, 518)
    assert working_size(640, 480) == (686, 518)  # then centre-cropped to 518 rows
    assert working_size(640, 480, mode="pad") == (518, 392)
    with pytest.raises(ValueError, match="smaller than one 14x14 patch"):
        working_size(2, 1000)


def test_prepare_images_crop_pad_and_white_padding():
    x = torch.rand(1, 1, 3, 480, 640)
    tall, real = prepare_images(x.transpose(-1, -2), None)
    assert tall.shape == (1, 1, 3, 518, 518) and real.all()
    padded, real = prepare_images(x, None, mode="pad")
    assert padded.shape == (1, 1, 3, 518, 518)
    assert torch.all(padded[..., :63, :] == 1.0) and not real[..., :63, :].any() and real[..., 63:455, :].all()
    valid = patch_validity(real, 14)
    rows = valid[0, 0].all(dim=1).nonzero().flatten().tolist()
    assert rows == list(range(5, 32))  # rows 63..454 real: patches 5..31 fully real (row 4 straddles)
    mask = torch.ones(1, 1, 224, 224, dtype=torch.bool)
    mask[..., :, :112] = False
    img, real = prepare_images(torch.zeros(1, 1, 3, 224, 224), mask)
    assert torch.allclose(img[..., :, :240], torch.ones(1)) and not real[..., :, :259].any() and real[..., :, 259:].all()


def test_teacher_features_grid_and_validity():
    teacher = VGGTTeacher.from_config(tiny())
    grid = teacher.features(torch.rand(2, 2, 3, 224, 224))
    assert grid.feats.shape == (2, 2, 37, 37, 64) and grid.feats.dtype == torch.float32 and grid.valid.all()
    mask = torch.ones(2, 2, 224, 224, dtype=torch.bool)
    mask[1, 0, 112:] = False
    masked = teacher.features(torch.rand(2, 2, 3, 224, 224), pad_mask=mask)
    assert masked.valid[0].all() and masked.valid[1, 1].all()
    assert masked.valid[1, 0, :18].all() and not masked.valid[1, 0, 19:].any()  # pixel 259 = patch row 18.5
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.train().training


def test_teacher_layer_selection_and_errors():
    teacher = VGGTTeacher.from_config(tiny(), layer=0)
    x = torch.rand(1, 2, 3, 224, 224)
    with torch.no_grad():
        ref = teacher.model.aggregator(prepare_images(x, None)[0], layers=[0])[0][:, :, 5:]
    assert torch.equal(teacher.features(x).feats.reshape(1, 2, 1369, 64), ref)
    with pytest.raises(ValueError, match="out of range"):
        VGGTTeacher.from_config(tiny(), layer=2)
    with pytest.raises(ValueError, match="rank 5"):
        teacher.features(torch.rand(2, 3, 224, 224))
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        teacher.features(torch.rand(1, 2, 3, 224, 224) * 255)
    with pytest.raises(ValueError, match="3 colour channels"):
        teacher.features(torch.rand(1, 2, 6, 224, 224))
    with pytest.raises(TypeError, match="uint8"):
        teacher.features(torch.zeros(1, 2, 3, 224, 224, dtype=torch.uint8))
    with pytest.raises(ValueError, match="pad_mask"):
        teacher.features(x, pad_mask=torch.ones(1, 2, 100, 100, dtype=torch.bool))


def test_bf16_weights_track_fp32_features():
    torch.manual_seed(0)
    model = VGGT(tiny())
    x = torch.rand(1, 2, 3, 224, 224)
    ref = VGGTTeacher(model, layer=0).features(x).feats
    half = VGGTTeacher(model, layer=0, weights_dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    out = half.features(x).feats
    assert out.dtype == torch.float32
    assert ((out - ref).norm() / ref.norm()).item() < 3e-2  # bf16 rounding, not wrong positions
    with pytest.raises(ValueError, match="weights_dtype"):
        VGGTTeacher(model, weights_dtype="float16")
