"""VGGT camera and DPT heads: state-dict layout (VGGT.md §4) and behaviour (§5.1, §5.2)."""

from __future__ import annotations

import math

import pytest
import torch

from spatial_forcing.teachers.vggt.heads import (
    CameraHead,
    DPTHead,
    ResidualConvUnit,
    inverse_log,
    pose_encoding_to_extrinsics_intrinsics,
)

PATCH_START = 5
TINY_DPT = dict(features=16, out_channels=(8, 16, 32, 32), intermediate_layer_idx=(0, 1, 2, 3))


def _tokens(batch: int, frames: int, height: int, width: int, dim: int, layers: int = 4) -> list[torch.Tensor]:
    num = PATCH_START + (height // 14) * (width // 14)
    return [torch.randn(batch, frames, num, dim) for _ in range(layers)]


def _expected_dpt_keys() -> set[str]:
    keys = {"norm.weight", "norm.bias", "scratch.output_conv1.weight", "scratch.output_conv1.bias"}
    keys |= {f"projects.{i}.{p}" for i in range(4) for p in ("weight", "bias")}
    keys |= {f"resize_layers.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")}
    keys |= {f"scratch.layer{i}_rn.weight" for i in range(1, 5)}
    keys |= {f"scratch.output_conv2.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    for r in range(1, 5):
        keys |= {f"scratch.refinenet{r}.out_conv.{p}" for p in ("weight", "bias")}
        units = ("resConfUnit2",) if r == 4 else ("resConfUnit1", "resConfUnit2")
        keys |= {f"scratch.refinenet{r}.{u}.conv{c}.{p}" for u in units for c in (1, 2) for p in ("weight", "bias")}
    return keys


def _expected_camera_keys() -> set[str]:
    keys = {"empty_pose_tokens"}
    keys |= {f"{m}.{p}" for m in ("embed_pose", "poseLN_modulation.1", "token_norm", "trunk_norm",
                                  "pose_branch.fc1", "pose_branch.fc2") for p in ("weight", "bias")}
    block = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
    keys |= {f"trunk.{i}.{m}.{p}" for i in range(4) for m in block for p in ("weight", "bias")}
    keys |= {f"trunk.{i}.ls{j}.gamma" for i in range(4) for j in (1, 2)}
    return keys


# ---------------------------------------------------------------- full-size layout (meta device)


@pytest.mark.parametrize("output_dim, activation, n_params", [(2, "exp", 32_654_562), (4, "inv_log", 32_654_628)])
def test_full_size_dpt_keys_and_parameter_count(output_dim: int, activation: str, n_params: int) -> None:
    with torch.device("meta"):
        head = DPTHead(2048, output_dim, activation, "expp1")
    sd = head.state_dict()
    assert set(sd) == _expected_dpt_keys()
    assert len(sd) == 62
    assert sum(v.numel() for v in sd.values()) == n_params
    assert sd["projects.3.weight"].shape == (1024, 2048, 1, 1)
    assert sd["resize_layers.0.weight"].shape == (256, 256, 4, 4)
    assert sd["resize_layers.1.weight"].shape == (512, 512, 2, 2)
    assert sd["resize_layers.3.weight"].shape == (1024, 1024, 3, 3)
    assert sd["scratch.layer2_rn.weight"].shape == (256, 512, 3, 3)
    assert sd["scratch.output_conv1.weight"].shape == (128, 256, 3, 3)
    assert sd["scratch.output_conv2.2.weight"].shape == (output_dim, 32, 1, 1)
    assert head.norm.eps == 1e-5


def test_full_size_camera_keys_and_parameter_count() -> None:
    with torch.device("meta"):
        head = CameraHead()
    sd = head.state_dict()
    assert set(sd) == _expected_camera_keys()
    assert len(sd) == 69
    assert sum(v.numel() for v in sd.values()) == 216_174_610
    assert sd["empty_pose_tokens"].shape == (1, 1, 9)
    assert sd["poseLN_modulation.1.weight"].shape == (6144, 2048)
    assert sd["trunk.0.attn.qkv.weight"].shape == (6144, 2048)
    assert sd["pose_branch.fc1.weight"].shape == (1024, 2048)
    assert sd["pose_branch.fc2.weight"].shape == (9, 1024)
    assert head.token_norm.eps == head.trunk_norm.eps == head.trunk[0].norm1.eps == 1e-5
    assert head.adaln_norm.eps == 1e-6 and not head.adaln_norm.elementwise_affine


# ---------------------------------------------------------------- DPT pieces


def test_residual_conv_unit_adds_relu_of_input_not_input() -> None:
    rcu = ResidualConvUnit(1)
    with torch.no_grad():
        for conv in (rcu.conv1, rcu.conv2):
            conv.weight.zero_()
        rcu.conv1.weight[0, 0, 1, 1] = 1.0  # identity kernel
        rcu.conv1.bias.fill_(-1.0)
        rcu.conv2.weight[0, 0, 1, 1] = 2.0
        rcu.conv2.bias.zero_()
    x = torch.tensor([[[[-2.0, 3.0], [1.5, -1.0]]]])
    # r = relu(x) = [[0, 3], [1.5, 0]]; conv path = 2 * relu(r - 1) = [[0, 4], [1, 0]]
    out = rcu(x)
    torch.testing.assert_close(out, torch.tensor([[[[0.0, 7.0], [2.5, 0.0]]]]))  # conv path + relu(x)
    assert not torch.allclose(out, torch.tensor([[[[-2.0, 7.0], [2.5, -1.0]]]]))  # conv path + x
    assert x[0, 0, 0, 0] == -2.0  # the input itself is left untouched


def test_inverse_log_values() -> None:
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0])
    expected = torch.tensor([-(math.e ** 2 - 1), -(math.exp(0.5) - 1), 0.0, math.exp(0.5) - 1, math.e ** 2 - 1])
    torch.testing.assert_close(inverse_log(x), expected)


def _constant_output_head(output_dim: int, activation: str, bias: list[float]) -> DPTHead:
    """A tiny head whose last 1x1 conv ignores its input and emits `bias` everywhere."""
    head = DPTHead(32, output_dim, activation, "expp1", **TINY_DPT).eval()
    with torch.no_grad():
        head.scratch.output_conv2[2].weight.zero_()
        head.scratch.output_conv2[2].bias.copy_(torch.tensor(bias))
    return head


def test_depth_activation_exp_and_conf_expp1() -> None:
    head = _constant_output_head(2, "exp", [0.5, -1.0])
    depth, conf = head(_tokens(1, 2, 28, 42, 32), (28, 42), PATCH_START)
    torch.testing.assert_close(depth, torch.full((1, 2, 28, 42, 1), math.exp(0.5)))
    torch.testing.assert_close(conf, torch.full((1, 2, 28, 42), 1 + math.exp(-1.0)))


def test_point_activation_inv_log_and_conf_last_channel() -> None:
    head = _constant_output_head(4, "inv_log", [-1.0, 0.0, 2.0, 0.3])
    points, conf = head(_tokens(1, 1, 42, 28, 32), (42, 28), PATCH_START)
    expected = torch.tensor([-(math.e - 1), 0.0, math.e ** 2 - 1]).expand(1, 1, 42, 28, 3)
    torch.testing.assert_close(points, expected)
    torch.testing.assert_close(conf, torch.full((1, 1, 42, 28), 1 + math.exp(0.3)))


def test_unknown_activation_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="inv_log"):
        DPTHead(32, 2, "softplus", "expp1", **TINY_DPT)
    with pytest.raises(ValueError, match="expp1"):
        DPTHead(32, 2, "exp", "tanh", **TINY_DPT)


# ---------------------------------------------------------------- DPT forward


@pytest.mark.parametrize("frames", [1, 2, 3])
@pytest.mark.parametrize("hw", [(28, 42), (42, 42)])
def test_dpt_output_shapes(frames: int, hw: tuple[int, int]) -> None:
    torch.manual_seed(0)
    depth_head = DPTHead(32, 2, "exp", "expp1", **TINY_DPT).eval()
    point_head = DPTHead(32, 4, "inv_log", "expp1", **TINY_DPT).eval()
    tokens = _tokens(2, frames, *hw, 32, layers=5)
    with torch.no_grad():
        depth, depth_conf = depth_head(tokens, hw, PATCH_START)
        points, points_conf = point_head(tokens, hw, PATCH_START)
    assert depth.shape == (2, frames, *hw, 1) and depth_conf.shape == (2, frames, *hw)
    assert points.shape == (2, frames, *hw, 3) and points_conf.shape == (2, frames, *hw)
    assert (depth > 0).all() and (depth_conf > 1).all() and (points_conf > 1).all()
    assert torch.isfinite(points).all()


def test_dpt_frame_chunking_does_not_change_results_and_frames_are_independent() -> None:
    torch.manual_seed(0)
    head = DPTHead(32, 2, "exp", "expp1", **TINY_DPT).eval()
    tokens = _tokens(1, 3, 28, 42, 32)
    with torch.no_grad():
        whole = head(tokens, (28, 42), PATCH_START, frames_chunk_size=None)
        chunked = head(tokens, (28, 42), PATCH_START, frames_chunk_size=2)
        last_only = head([t[:, 2:] for t in tokens], (28, 42), PATCH_START)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(whole[0][:, 2:], last_only[0])


def test_dpt_reads_only_its_intermediate_layers_and_patch_tokens() -> None:
    torch.manual_seed(0)
    head = DPTHead(32, 2, "exp", "expp1", **{**TINY_DPT, "intermediate_layer_idx": (0, 2, 3, 5)}).eval()
    tokens = _tokens(1, 1, 28, 28, 32, layers=6)
    edited = [t.clone() for t in tokens]
    edited[1].normal_()  # unused layer
    edited[4].normal_()  # unused layer
    edited[0][:, :, :PATCH_START] = 100.0  # special tokens
    with torch.no_grad():
        torch.testing.assert_close(head(tokens, (28, 28), PATCH_START)[0], head(edited, (28, 28), PATCH_START)[0])
        edited[5].normal_()
        assert not torch.allclose(head(tokens, (28, 28), PATCH_START)[0], head(edited, (28, 28), PATCH_START)[0])


def test_dpt_rejects_token_count_that_does_not_match_image() -> None:
    head = DPTHead(32, 2, "exp", "expp1", **TINY_DPT)
    with pytest.raises(ValueError, match="patch tokens"):
        head(_tokens(1, 1, 28, 28, 32), (28, 42), PATCH_START)


def test_heads_run_in_float32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    dpt = DPTHead(32, 2, "exp", "expp1", **TINY_DPT).eval()
    cam = CameraHead(dim_in=32, trunk_depth=1, num_heads=4).eval()
    tokens = [t.bfloat16() for t in _tokens(1, 2, 28, 28, 32)]
    with torch.no_grad():
        ref_depth, _ = dpt([t.float() for t in tokens], (28, 28), PATCH_START)
        ref_pose = cam([t.float() for t in tokens])[-1]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            depth, conf = dpt(tokens, (28, 28), PATCH_START)
            pose = cam(tokens)[-1]
    assert depth.dtype == conf.dtype == pose.dtype == torch.float32
    torch.testing.assert_close(depth, ref_depth)
    torch.testing.assert_close(pose, ref_pose)


# ---------------------------------------------------------------- camera head


def test_camera_head_accumulates_deltas_and_relus_fov() -> None:
    head = CameraHead(dim_in=32, trunk_depth=2, num_heads=4).eval()
    delta = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, -0.8, 0.9])
    with torch.no_grad():
        head.pose_branch.fc2.weight.zero_()
        head.pose_branch.fc2.bias.copy_(delta)  # every iteration predicts the same delta
    tokens = _tokens(2, 3, 14, 14, 32, layers=2)
    with torch.no_grad():
        outputs = head(tokens)
    assert len(outputs) == 4
    for k, out in enumerate(outputs, start=1):
        expected = k * delta
        expected[7] = 0.0  # FoV goes through ReLU; translation and quaternion stay linear
        assert out.shape == (2, 3, 9)
        torch.testing.assert_close(out, expected.expand(2, 3, 9))
    assert len(head(tokens, num_iterations=2)) == 2


def test_camera_head_first_iteration_starts_from_empty_pose_tokens() -> None:
    torch.manual_seed(0)
    head = CameraHead(dim_in=32, trunk_depth=1, num_heads=4).eval()
    tokens = _tokens(1, 2, 14, 14, 32)
    with torch.no_grad():
        before = head(tokens)[0]
        head.empty_pose_tokens.add_(0.5)
        after = head(tokens)[0]
    assert not torch.allclose(before, after, atol=1e-4)


def test_camera_head_reads_only_the_last_layers_camera_token() -> None:
    torch.manual_seed(0)
    head = CameraHead(dim_in=32, trunk_depth=1, num_heads=4).eval()
    tokens = _tokens(1, 2, 14, 14, 32, layers=3)
    edited = [t.clone() for t in tokens]
    edited[0].normal_()
    edited[-1][:, :, 1:] = 7.0
    with torch.no_grad():
        torch.testing.assert_close(head(tokens)[-1], head(edited)[-1])
        edited[-1][:, 1, 0] += torch.randn(32)  # (a constant shift would vanish in token_norm)
        original, changed = head(tokens)[-1], head(edited)[-1]
    assert not torch.allclose(original, changed, atol=1e-4)


# ---------------------------------------------------------------- pose decoding


def test_pose_encoding_to_extrinsics_intrinsics_hand_made() -> None:
    height, width = 100, 200
    fov_h = 2 * math.atan(50 / 100)  # -> fy = 100
    fov_w = 2 * math.atan(100 / 250)  # -> fx = 250
    s = math.sqrt(0.5)
    enc = torch.tensor([[
        [1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 1.0, fov_h, fov_w],  # identity rotation (XYZW, scalar last)
        [-1.0, 0.5, 4.0, 0.0, 0.0, 2 * s, 2 * s, fov_h, fov_w],  # 90 deg about z, not unit length
    ]])
    extrinsics, intrinsics = pose_encoding_to_extrinsics_intrinsics(enc, (height, width))
    assert extrinsics.shape == (1, 2, 3, 4) and intrinsics.shape == (1, 2, 3, 3)
    torch.testing.assert_close(extrinsics[0, 0], torch.tensor([
        [1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 2.0], [0.0, 0.0, 1.0, 3.0]]))
    torch.testing.assert_close(extrinsics[0, 1], torch.tensor([
        [0.0, -1.0, 0.0, -1.0], [1.0, 0.0, 0.0, 0.5], [0.0, 0.0, 1.0, 4.0]]))
    k = torch.tensor([[250.0, 0.0, 100.0], [0.0, 100.0, 50.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(intrinsics, k.expand(1, 2, 3, 3))
