"""align/: formulas against hand-computed numbers, masks, loss reduction, gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from spatial_forcing.align import (AlignConfig, AlignProjector, SpatialForcing, combine_masks, grid_side,
                                   masked_cosine_loss, resample_features, resample_mask, uv_grid, uv_sincos_embedding)
from spatial_forcing.align.pos_embed import add_uv_pos_embed


# ---------------------------------------------------------------- UV grid and positional embedding
def test_uv_grid_corners_square_37():
    g = uv_grid(37, 37)
    edge = (1 / math.sqrt(2)) * 36 / 37  # 0.68800
    assert g.shape == (37, 37, 2)
    assert g[0, 0].tolist() == pytest.approx([-edge, -edge], abs=1e-6)
    assert g[0, 36].tolist() == pytest.approx([edge, -edge], abs=1e-6)  # (u of column 36, v of row 0)
    assert g[36, 0].tolist() == pytest.approx([-edge, edge], abs=1e-6)
    assert g[18, 18].tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    assert edge == pytest.approx(0.68800, abs=1e-5)


def test_uv_grid_non_square_uses_aspect():
    g = uv_grid(4, 2)  # a = 2: span_x = 2/sqrt5, span_y = 1/sqrt5
    sx, sy = 2 / math.sqrt(5) * 3 / 4, 1 / math.sqrt(5) * 1 / 2
    assert g[0, 0].tolist() == pytest.approx([-sx, -sy], abs=1e-6)
    assert g[1, 3].tolist() == pytest.approx([sx, sy], abs=1e-6)
    assert g[0, 1, 0].item() == pytest.approx(-sx + 2 * sx / 3, abs=1e-6)


def test_sincos_embedding_entries_2048():
    g = uv_grid(37, 37)
    e = uv_sincos_embedding(g, 2048)
    u = v = -(1 / math.sqrt(2)) * 36 / 37
    w511 = 100 ** (-511 / 512)
    assert e.shape == (37, 37, 2048) and e.dtype == torch.float32
    assert e[0, 0, 0].item() == pytest.approx(math.sin(u), abs=1e-6)          # sin_u, k = 0
    assert e[0, 0, 511].item() == pytest.approx(math.sin(u * w511), abs=1e-6)  # sin_u, k = 511
    assert e[0, 0, 512].item() == pytest.approx(math.cos(u), abs=1e-6)         # cos_u
    assert e[0, 0, 1024].item() == pytest.approx(math.sin(v), abs=1e-6)        # sin_v
    assert e[0, 0, 1536 + 1].item() == pytest.approx(math.cos(v * 100 ** (-1 / 512)), abs=1e-6)
    # Column changes only u-part, row only v-part.
    assert torch.equal(e[0, 5, 1024:], e[0, 0, 1024:]) and torch.equal(e[5, 0, :1024], e[0, 0, :1024])


def test_add_pos_embed_is_ratio_times_embedding():
    x = torch.zeros(2, 8, 3, 5)
    out = add_uv_pos_embed(x, ratio=0.1)
    e = uv_sincos_embedding(uv_grid(5, 3), 8)  # dim 8: [sin u, sin .1u, cos u, cos .1u, (same for v)]
    assert torch.allclose(out[1].permute(1, 2, 0), 0.1 * e)
    u = uv_grid(5, 3)[2, 4, 0].item()
    assert out[0, 1, 2, 4].item() == pytest.approx(0.1 * math.sin(0.1 * u), abs=1e-7)


# ---------------------------------------------------------------- resampling
@pytest.mark.parametrize("views", [2, 3])
def test_grid_side_and_upstream_ratio(views):
    tokens = 256 * views
    side = grid_side(tokens, views)
    ratio = 1 / math.sqrt(views * 1369 / tokens)  # upstream formula, float64
    assert side == 16 and int(37 * ratio) == 16 and ratio == pytest.approx(16 / 37)
    out = resample_features(torch.randn(2, views, 37, 37, 8), (side, side))
    assert out.shape == (2, views, 16, 16, 8)


def test_grid_side_rejects_non_square():
    assert grid_side(300, 3) == 10
    with pytest.raises(ValueError, match="do not form square"):
        grid_side(500, 2)


def test_bilinear_align_corners_reproduces_linear_ramp():
    i = torch.arange(37.0)[:, None]
    j = torch.arange(37.0)[None, :]
    ramp = (2 * i + 3 * j)[None, None, :, :, None].repeat(1, 3, 1, 1, 2)  # [1,3,37,37,2]
    out = resample_features(ramp, (16, 16), pos_embed_ratio=None)
    p, q = 7, 11
    assert out[0, 2, p, q, 1].item() == pytest.approx(2 * p * 36 / 15 + 3 * q * 36 / 15, abs=1e-4)
    assert out[0, 0, 15, 15, 0].item() == pytest.approx(2 * 36 + 3 * 36, abs=1e-4)  # corners kept


def test_resample_matches_upstream_scale_factor_call():
    x = torch.randn(4, 16, 37, 37)
    upstream = F.interpolate(x, scale_factor=1 / math.sqrt(2 * 1369 / 512), mode="bilinear", align_corners=True)
    ours = resample_features(x.permute(0, 2, 3, 1).reshape(2, 2, 37, 37, 16), (16, 16), pos_embed_ratio=None)
    assert torch.allclose(ours.reshape(4, 16, 16, 16).permute(0, 3, 1, 2), upstream, atol=1e-6)


def test_pad_mask_nearest_reads_top_left_pixel():
    mask = torch.zeros(1, 1, 224, 224, dtype=torch.bool)
    mask[..., 28:196, :] = True  # 640x480 letterboxed to 224: rows 28..195 real
    small = resample_mask(mask, (16, 16))
    rows = small[0, 0].all(dim=1)
    assert rows.nonzero().flatten().tolist() == list(range(2, 14))
    assert int(small.sum()) == 192


def test_combine_masks_slot_pad_teacher():
    teacher_valid = torch.ones(2, 2, 37, 37, dtype=torch.bool)
    teacher_valid[1, 0, :, :10] = False
    slot = torch.tensor([[True, False], [True, True]])
    pad = torch.ones(2, 2, 224, 224, dtype=torch.bool)
    pad[0, 0, :14] = False  # first token row of view 0, sample 0
    valid = combine_masks((16, 16), 2, 2, torch.device("cpu"), teacher_valid, slot, pad)
    assert not valid[0, 1].any()  # empty slot
    assert not valid[0, 0, 0].any() and valid[0, 0, 1:].all()
    # teacher columns 0..9 of 37 -> nearest sampling reads column floor(q*37/16) < 10 for q <= 4
    assert not valid[1, 0, :, :5].any() and valid[1, 0, :, 5:].all()
    assert valid[1, 1].all()


# ---------------------------------------------------------------- loss
def test_cosine_loss_known_vectors():
    pred = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    target = torch.tensor([[[2.0, 0.0], [1.0, 1.0]]])
    loss, metrics = masked_cosine_loss(pred, target)
    assert loss.item() == pytest.approx(1 - (1 + 1 / math.sqrt(2)) / 2, abs=1e-6)
    masked, _ = masked_cosine_loss(pred, target, torch.tensor([[True, False]]))
    assert masked.item() == pytest.approx(0.0, abs=1e-7)
    assert metrics["valid_frac"].item() == 1.0


def test_cosine_loss_is_per_sample_mean_then_batch_mean():
    # sample 0: one valid token with cos 0; sample 1: three valid tokens with cos 1.
    pred = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
    target = torch.tensor([[[0.0, 1.0], [5.0, 5.0], [5.0, 5.0]], [[3.0, 0.0], [1.0, 0.0], [2.0, 0.0]]])
    valid = torch.tensor([[True, False, False], [True, True, True]])
    loss, _ = masked_cosine_loss(pred, target, valid)
    assert loss.item() == pytest.approx((1.0 + 0.0) / 2, abs=1e-6)  # a global token mean would give 0.25


def test_all_masked_gives_zero_with_finite_grads():
    pred = torch.randn(3, 5, 4, requires_grad=True)
    loss, _ = masked_cosine_loss(pred, torch.randn(3, 5, 4), torch.zeros(3, 5, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() == 0


def test_masked_sample_is_excluded_from_divisor():
    pred, target = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    valid = torch.tensor([[False] * 4, [True] * 4])
    loss, _ = masked_cosine_loss(pred, target, valid)
    alone, _ = masked_cosine_loss(pred[1:], target[1:])
    assert loss.item() == pytest.approx(alone.item(), abs=1e-6)


# ---------------------------------------------------------------- projector and module
def test_projector_init_and_sizes():
    proj = AlignProjector(64, 32)
    bound = math.sqrt(6 / (64 + 32))
    assert proj.fc1.weight.abs().max() <= bound and proj.fc1.weight.std() > bound / 4
    assert torch.all(proj.fc1.bias == 0) and torch.all(proj.fc2.bias == 0)
    assert torch.all(proj.vlm_norm.weight == 1) and proj.vlm_norm.eps == 1e-5
    with torch.device("meta"):
        assert sum(p.numel() for p in AlignProjector(4096, 2048).parameters()) == 12_595_200
        assert sum(p.numel() for p in AlignProjector(2048, 2048).parameters()) == 8_396_800
    assert AlignProjector(8, 4, use_norm=False).vlm_norm is None


def test_projector_loads_upstream_ddp_state_dict():
    src = AlignProjector(16, 8)
    sd = {"module." + k: v.clone() + 1 for k, v in src.state_dict().items()}
    assert set(k.removeprefix("module.") for k in sd) == {"vlm_norm.weight", "vlm_norm.bias", "fc1.weight",
                                                         "fc1.bias", "fc2.weight", "fc2.bias"}
    dst = AlignProjector(16, 8)
    dst.load_upstream_state_dict(sd)
    assert torch.equal(dst.fc2.bias, src.fc2.bias + 1)


def test_module_matches_manual_computation_and_gradients():
    torch.manual_seed(0)
    sf = SpatialForcing(AlignConfig(), student_dim=12, teacher_dim=8)
    hidden = torch.randn(2, 2, 4, 4, 12, requires_grad=True)
    teacher = torch.randn(2, 2, 9, 9, 8, requires_grad=True)
    loss, metrics = sf(hidden, teacher)
    x = teacher.detach().reshape(4, 9, 9, 8).permute(0, 3, 1, 2)
    x = x + 0.1 * uv_sincos_embedding(uv_grid(9, 9), 8).permute(2, 0, 1)
    target = F.interpolate(x, size=(4, 4), mode="bilinear", align_corners=True).permute(0, 2, 3, 1).reshape(2, 32, 8)
    pred = sf.projector(hidden.reshape(2, 32, 12))
    manual = (1 - F.cosine_similarity(pred, target, dim=-1).mean(1)).mean()
    assert loss.item() == pytest.approx(manual.item(), abs=1e-6)
    assert metrics["align_loss"].item() == pytest.approx(loss.item())
    loss.backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sf.projector.parameters())
    assert teacher.grad is None  # the teacher side receives no gradient


def test_module_masks_and_shape_errors():
    sf = SpatialForcing(AlignConfig(use_pos_embed=False), student_dim=6, teacher_dim=5)
    hidden = torch.randn(1, 2, 3, 3, 6)
    loss, metrics = sf(hidden, torch.randn(1, 2, 3, 3, 5), slot_mask=torch.tensor([[False, False]]))
    assert loss.item() == 0.0 and metrics["valid_frac"].item() == 0.0
    with pytest.raises(ValueError, match="visual_hidden"):
        sf(torch.randn(1, 2, 3, 3, 7), torch.randn(1, 2, 3, 3, 5))
    with pytest.raises(ValueError, match="teacher grid"):
        sf(hidden, torch.randn(1, 3, 3, 3, 5))
    with pytest.raises(ValueError, match="divisible by 4"):
        SpatialForcing(AlignConfig(use_pos_embed=True), student_dim=6, teacher_dim=5)


def test_align_config_presets_and_validation():
    cfg = AlignConfig.preset("openvla-oft-sf")
    assert (cfg.student_layer, cfg.teacher_layer, cfg.coeff, cfg.pos_embed_ratio) == (24, -1, 0.5, 0.1)
    assert cfg.use_pos_embed and cfg.projector_norm and cfg.loss_type == "cosine"
    assert AlignConfig.preset("pi0-sf").student_layer == 12
    assert AlignConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="loss_type"):
        AlignConfig(loss_type="mse")
    with pytest.raises(ValueError, match="unknown align preset"):
        AlignConfig.preset("nope")
    with pytest.raises(ValueError, match="unknown AlignConfig keys"):
        AlignConfig.from_dict({"student_layr": 3})
