"""policies/oft/heads.py: parameter counts, upstream key names, head layout, hand-computed forwards, DDIM."""

import math

import pytest
import torch
from torch import nn

from spatial_forcing.policies.oft.heads import (DDIMScheduler, DiffusionActionHead, L1RegressionActionHead, MLPResNet,
                                                NoisyActionProjector, ProprioProjector, SinusoidalTimeEncoder,
                                                cosine_betas)


def _numel(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------- full-size counts and key layout (meta device)
def test_full_size_parameter_counts():
    with torch.device("meta"):
        l1 = L1RegressionActionHead(4096, 7, 8)
        proprio = ProprioProjector(8, 4096)
        diffusion = DiffusionActionHead(4096, 7, 8)
        noisy = NoisyActionProjector(4096)
    assert _numel(l1) == 151_117_831
    assert _numel(proprio) == 16_818_176
    assert _numel(diffusion) == 151_117_831  # scheduler and time encoder own no parameters
    assert _numel(noisy) == 4096 + 4096 + 4096 * 4096 + 4096


# §7.2: exact upstream names and shapes of `action_head--*.pt` / `proprio_projector--*.pt` (D=4096, A=7).
UPSTREAM_L1 = {
    "module.model.layer_norm1.weight": (28672,), "module.model.layer_norm1.bias": (28672,),
    "module.model.fc1.weight": (4096, 28672), "module.model.fc1.bias": (4096,),
    **{f"module.model.mlp_resnet_blocks.{i}.ffn.0.{w}": (4096,) for i in (0, 1) for w in ("weight", "bias")},
    **{f"module.model.mlp_resnet_blocks.{i}.ffn.1.weight": (4096, 4096) for i in (0, 1)},
    **{f"module.model.mlp_resnet_blocks.{i}.ffn.1.bias": (4096,) for i in (0, 1)},
    "module.model.layer_norm2.weight": (4096,), "module.model.layer_norm2.bias": (4096,),
    "module.model.fc2.weight": (7, 4096), "module.model.fc2.bias": (7,),
}
UPSTREAM_PROPRIO = {"module.fc1.weight": (4096, 8), "module.fc1.bias": (4096,),
                    "module.fc2.weight": (4096, 4096), "module.fc2.bias": (4096,)}


def test_full_size_state_dict_names_and_shapes_match_upstream():
    with torch.device("meta"):
        l1 = L1RegressionActionHead(4096, 7, 8)
        proprio = ProprioProjector(8, 4096)
        diffusion = DiffusionActionHead(4096, 7, 8)
    assert {k: tuple(v.shape) for k, v in l1.state_dict().items()} == {
        k.removeprefix("module."): s for k, s in UPSTREAM_L1.items()}
    assert {k: tuple(v.shape) for k, v in proprio.state_dict().items()} == {
        k.removeprefix("module."): s for k, s in UPSTREAM_PROPRIO.items()}
    assert {k: tuple(v.shape) for k, v in diffusion.state_dict().items()} == {
        "noise_predictor.mlp_resnet." + k.removeprefix("module.model."): s for k, s in UPSTREAM_L1.items()}
    # the residual block is Sequential(LayerNorm, Linear, ReLU): ReLU at index 2, no parameters
    ffn = l1.model.mlp_resnet_blocks[0].ffn
    assert [type(m) for m in ffn] == [nn.LayerNorm, nn.Linear, nn.ReLU]


# ---------------------------------------------------------------- loading tiny checkpoints with upstream names
D, A, K = 16, 3, 2


def _tiny_upstream_l1(dtype: torch.dtype, prefix: str = "module.") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shapes = {"model.layer_norm1.weight": (A * D,), "model.layer_norm1.bias": (A * D,),
              "model.fc1.weight": (D, A * D), "model.fc1.bias": (D,),
              **{f"model.mlp_resnet_blocks.{i}.ffn.0.{w}": (D,) for i in (0, 1) for w in ("weight", "bias")},
              **{f"model.mlp_resnet_blocks.{i}.ffn.1.weight": (D, D) for i in (0, 1)},
              **{f"model.mlp_resnet_blocks.{i}.ffn.1.bias": (D,) for i in (0, 1)},
              "model.layer_norm2.weight": (D,), "model.layer_norm2.bias": (D,),
              "model.fc2.weight": (A, D), "model.fc2.bias": (A,)}
    return {prefix + k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}


@pytest.mark.parametrize("ckpt_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("module_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("prefix", ["module.", ""])
def test_l1_head_loads_upstream_names(ckpt_dtype, module_dtype, prefix):
    sd = _tiny_upstream_l1(ckpt_dtype, prefix)
    head = L1RegressionActionHead(D, A, K).to(module_dtype).load_upstream_state_dict(sd)
    own = head.state_dict()
    for k, v in sd.items():
        got = own[k.removeprefix("module.")]
        assert got.dtype == module_dtype  # the module's dtype decides
        assert torch.equal(got, v.to(module_dtype))


def test_from_upstream_state_dict_infers_dims_and_keeps_dtype():
    head = L1RegressionActionHead.from_upstream_state_dict(_tiny_upstream_l1(torch.bfloat16), chunk_len=K)
    assert (head.hidden_size, head.action_dim, head.chunk_len, len(head.model.mlp_resnet_blocks)) == (D, A, K, 2)
    assert {p.dtype for p in head.parameters()} == {torch.bfloat16}
    head32 = L1RegressionActionHead.from_upstream_state_dict(_tiny_upstream_l1(torch.bfloat16), K, dtype=torch.float32)
    assert {p.dtype for p in head32.parameters()} == {torch.float32}

    g = torch.Generator().manual_seed(2)
    sd = {"module.fc1.weight": torch.randn(D, 8, generator=g), "module.fc1.bias": torch.randn(D, generator=g),
          "module.fc2.weight": torch.randn(D, D, generator=g), "module.fc2.bias": torch.randn(D, generator=g)}
    proj = ProprioProjector.from_upstream_state_dict(sd)
    assert (proj.fc1.in_features, proj.fc1.out_features) == (8, D) and proj.fc1.weight.dtype == torch.float32
    assert torch.equal(proj.fc2.weight, sd["module.fc2.weight"])
    bf = ProprioProjector(8, D).to(torch.bfloat16).load_upstream_state_dict(sd)  # fp32 on disk -> bf16 module
    assert torch.equal(bf.fc1.weight, sd["module.fc1.weight"].bfloat16())

    sd_diff = {"module.noise_predictor.mlp_resnet." + k.removeprefix("module.model."): v
               for k, v in _tiny_upstream_l1(torch.bfloat16).items()}
    diff = DiffusionActionHead.from_upstream_state_dict(sd_diff, chunk_len=K)
    assert (diff.hidden_size, diff.action_dim, diff.noise_scheduler.num_train_timesteps) == (D, A, 50)


def test_strict_load_reports_missing_and_unexpected_keys():
    sd = _tiny_upstream_l1(torch.bfloat16)
    del sd["module.model.fc2.bias"]
    sd["module.model.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError) as err:
        L1RegressionActionHead(D, A, K).load_upstream_state_dict(sd)
    assert "model.fc2.bias" in str(err.value) and "model.extra.weight" in str(err.value)
    sd = _tiny_upstream_l1(torch.bfloat16)
    with pytest.raises(ValueError, match="shape mismatch"):
        L1RegressionActionHead(D, A + 1, K).load_upstream_state_dict(
            {**sd, "module.model.fc2.weight": torch.zeros(A + 1, D), "module.model.fc2.bias": torch.zeros(A + 1),
             "module.model.layer_norm1.weight": torch.zeros(A * D)})


# ---------------------------------------------------------------- head layout
def test_head_layout_timestep_sees_its_seven_tokens_in_order():
    a, k, d = 7, 8, 6
    head = L1RegressionActionHead(d, a, k)
    seen = {}
    head.model.layer_norm1.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].clone()))
    h = torch.arange(k * a, dtype=torch.float32)[None, :, None].expand(2, k * a, d).clone()
    h[1] += 100.0  # second sample: token j holds 100 + j
    out = head.predict_action(h)
    assert out.shape == (2, k, a)
    x = seen["x"]
    assert x.shape == (2, k, a * d)
    for b in range(2):
        for t in range(k):
            expected = torch.cat([torch.full((d,), 100.0 * b + a * t + j) for j in range(a)])
            assert torch.equal(x[b, t], expected)

    diff = DiffusionActionHead(d, a, k)
    diff.noise_predictor.mlp_resnet.layer_norm1.register_forward_pre_hook(
        lambda m, args: seen.__setitem__("y", args[0].clone()))
    assert diff.predict_noise(h).shape == (2, k, a)
    assert torch.equal(seen["y"], x)


def test_head_rejects_wrong_token_count():
    with pytest.raises(ValueError, match="K\\*A"):
        L1RegressionActionHead(D, A, K).predict_action(torch.zeros(1, A * K - 1, D))


# ---------------------------------------------------------------- hand-computed MLPResNet forward (ReLU placement)
def _ln(v, g, b, eps=1e-5):
    m = sum(v) / len(v)
    var = sum((x - m) ** 2 for x in v) / len(v)
    return [(x - m) / math.sqrt(var + eps) * gi + bi for x, gi, bi in zip(v, g, b)]


def _lin(v, w, b):
    return [sum(wij * x for wij, x in zip(row, v)) + bi for row, bi in zip(w, b)]


def _relu(v):
    return [max(x, 0.0) for x in v]


def test_mlp_resnet_hand_computed():
    p = {"layer_norm1": ([1.0, 1.0], [0.0, 0.0]), "fc1": ([[2.0, 0.0], [0.0, 1.0]], [0.5, 0.5]),
         "b0ln": ([1.0, 1.0], [0.0, 0.0]), "b0fc": ([[-1.0, 0.0], [0.0, -1.0]], [0.0, 0.0]),
         "b1ln": ([1.0, 1.0], [0.0, 0.0]), "b1fc": ([[0.0, 1.0], [1.0, 0.0]], [0.25, 0.0]),
         "layer_norm2": ([2.0, 1.0], [0.0, 1.0]), "fc2": ([[1.0, -1.0]], [0.1])}
    net = MLPResNet(2, 2, 2, 1).double()
    mods = {"layer_norm1": net.layer_norm1, "fc1": net.fc1, "b0ln": net.mlp_resnet_blocks[0].ffn[0],
            "b0fc": net.mlp_resnet_blocks[0].ffn[1], "b1ln": net.mlp_resnet_blocks[1].ffn[0],
            "b1fc": net.mlp_resnet_blocks[1].ffn[1], "layer_norm2": net.layer_norm2, "fc2": net.fc2}
    with torch.no_grad():
        for name, (w, b) in p.items():
            mods[name].weight.copy_(torch.tensor(w, dtype=torch.float64))
            mods[name].bias.copy_(torch.tensor(b, dtype=torch.float64))

    x = [3.0, 1.0]
    h = _relu(_lin(_ln(x, *p["layer_norm1"]), *p["fc1"]))         # ReLU after fc1 zeroes h[1]
    assert h[1] == 0.0
    branch0 = _lin(_ln(h, *p["b0ln"]), *p["b0fc"])                  # (-u, +u): ReLU on the branch only
    assert branch0[0] < 0 < branch0[1]
    h = [hi + ri for hi, ri in zip(h, _relu(branch0))]
    h = [hi + ri for hi, ri in zip(h, _relu(_lin(_ln(h, *p["b1ln"]), *p["b1fc"])))]
    expected = _lin(_ln(h, *p["layer_norm2"]), *p["fc2"])[0]

    got = net(torch.tensor([x], dtype=torch.float64))
    assert got.shape == (1, 1)
    assert got.item() == pytest.approx(expected, abs=1e-12)
    # guards: no ReLU in the residual branch, or ReLU after the sum, give different numbers
    h0 = _relu(_lin(_ln(x, *p["layer_norm1"]), *p["fc1"]))
    no_relu = [hi + ri for hi, ri in zip(h0, branch0)]
    relu_after_sum = _relu(no_relu)
    assert no_relu != [hi + ri for hi, ri in zip(h0, _relu(branch0))]
    assert relu_after_sum != [hi + ri for hi, ri in zip(h0, _relu(branch0))]
    # by hand: h = [2.5, 0] -> block 0 -> [2.5, 1] -> block 1 -> [2.5, 2] -> LN2 ~ [2, 0] -> fc2 ~ 2.1
    assert expected == pytest.approx(2.09976, abs=1e-4)


def test_l1_loss_and_mse_loss_values():
    pred = torch.tensor([[[0.5, -1.0], [2.0, 0.0]]])
    target = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    assert L1RegressionActionHead.loss(pred, target).item() == pytest.approx((0.5 + 2.0 + 1.0 + 0.0) / 4)
    assert DiffusionActionHead.loss(pred, target).item() == pytest.approx((0.25 + 4.0 + 1.0 + 0.0) / 4)


# ---------------------------------------------------------------- projectors
def test_proprio_projector_is_exact_gelu_mlp():
    proj = ProprioProjector(3, 4).double()
    x = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64)
    a = proj.fc1(x)
    exact = 0.5 * a * (1 + torch.erf(a / math.sqrt(2)))
    assert torch.allclose(proj(x), proj.fc2(exact), atol=1e-14, rtol=0)
    tanh = 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3)))
    assert not torch.allclose(proj(x), proj.fc2(tanh), atol=1e-9, rtol=0)


def test_noisy_action_projector_maps_each_scalar_in_order():
    proj = NoisyActionProjector(6).double()
    actions = torch.randn(2, K, A, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = proj(actions)
    assert out.shape == (2, K * A, 6)
    assert torch.equal(out, proj(actions.reshape(2, K * A, 1)))
    for b in range(2):
        for t in range(K):
            for j in range(A):
                s = actions[b, t, j].reshape(1, 1)
                ref = proj.fc2(nn.functional.gelu(proj.fc1(s)))[0]
                assert torch.allclose(out[b, A * t + j], ref, atol=1e-14, rtol=0)
    assert set(proj.state_dict()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert proj.fc1.weight.shape == (6, 1)


# ---------------------------------------------------------------- time encoder
def test_time_encoder_values_small_dim():
    emb = SinusoidalTimeEncoder(8)(torch.tensor([10, 0]))
    f = [math.exp(-k * math.log(1e4) / 3) for k in range(4)]  # 1, 1e4^(-1/3), 1e4^(-2/3), 1e-4
    assert emb.dtype == torch.float32 and emb.shape == (2, 8)
    assert emb[0].tolist() == pytest.approx([math.sin(10 * fk) for fk in f] + [math.cos(10 * fk) for fk in f],
                                            abs=1e-6)
    assert emb[1].tolist() == [0.0] * 4 + [1.0] * 4


def test_time_encoder_values_4096():
    with torch.device("meta"):  # the time encoder has no parameters; only the input's device matters
        head = DiffusionActionHead(4096, 7, 8)
    emb = head.timestep_embedding(torch.tensor([49.0], device="cpu"))[0]
    assert emb.shape == (4096,)
    f1 = math.exp(-math.log(1e4) / 2047)
    assert emb[0].item() == pytest.approx(math.sin(49.0), abs=1e-6)
    assert emb[1].item() == pytest.approx(math.sin(49.0 * f1), abs=1e-5)
    assert emb[2047].item() == pytest.approx(math.sin(49.0 * 1e-4), abs=1e-7)   # last frequency is exactly 1e-4
    assert emb[2048].item() == pytest.approx(math.cos(49.0), abs=1e-6)
    assert emb[4095].item() == pytest.approx(math.cos(49.0 * 1e-4), abs=1e-7)


# ---------------------------------------------------------------- DDIM scheduler
def _abar(t):
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def test_cosine_betas_closed_form():
    betas = cosine_betas(50)
    assert betas.dtype == torch.float32 and betas.shape == (50,)
    for i in (0, 1, 10, 25, 48):
        assert betas[i].item() == pytest.approx(1 - _abar((i + 1) / 50) / _abar(i / 50), rel=1e-6)
    assert betas[0].item() == pytest.approx(0.0017475135, rel=1e-6)
    assert betas[49].item() == pytest.approx(0.999, rel=1e-7)  # capped at max_beta
    s = DDIMScheduler(50)
    for t in (0, 10, 40, 45, 48):  # telescoping product: abar((t+1)/T) / abar(0)
        assert s.alphas_cumprod[t].item() == pytest.approx(_abar((t + 1) / 50) / _abar(0), rel=1e-5)
    assert s.alphas_cumprod[49].item() == pytest.approx(s.alphas_cumprod[48].item() * (1 - 0.999), rel=1e-4)
    assert s.alphas_cumprod.dtype == torch.float32


def test_set_timesteps_leading_spacing():
    s = DDIMScheduler(50)
    assert s.set_timesteps(10).tolist() == [45, 40, 35, 30, 25, 20, 15, 10, 5, 0]
    assert s.timesteps.dtype == torch.int64
    assert s.set_timesteps(50).tolist() == list(range(49, -1, -1))
    assert s.set_timesteps(3).tolist() == [32, 16, 0]  # ratio 50 // 3 = 16
    assert s.set_timesteps(1).tolist() == [0]
    with pytest.raises(ValueError):
        s.set_timesteps(51)


def test_add_noise_formula():
    s = DDIMScheduler(50)
    x0 = torch.tensor([[0.5, -0.25], [1.0, 0.0], [-0.75, 0.3]], dtype=torch.float64)
    noise = torch.tensor([[1.0, -2.0], [0.5, 0.1], [-1.0, 3.0]], dtype=torch.float64)
    t = torch.tensor([0, 25, 49])
    out = s.add_noise(x0, noise, t)
    for b, tb in enumerate(t.tolist()):
        a = s.alphas_cumprod[tb].item()
        assert out[b].tolist() == pytest.approx((math.sqrt(a) * x0[b] + math.sqrt(1 - a) * noise[b]).tolist(),
                                                abs=1e-12)
    # 3-D (B, K, A): one t per batch row, broadcast over K and A
    x3 = torch.ones(2, K, A)
    out3 = s.add_noise(x3, torch.zeros(2, K, A), torch.tensor([0, 49]))
    assert torch.allclose(out3[0], torch.full((K, A), math.sqrt(s.alphas_cumprod[0].item())))
    assert torch.allclose(out3[1], torch.full((K, A), math.sqrt(s.alphas_cumprod[49].item())))


def test_ddim_step_known_numbers():
    s = DDIMScheduler(50)
    s.set_timesteps(10)
    a45, a40 = s.alphas_cumprod[45].item(), s.alphas_cumprod[40].item()
    sample = torch.tensor([0.3, 0.2, -0.1], dtype=torch.float64)
    eps = torch.tensor([0.2, -3.0, 1.5], dtype=torch.float64)
    prev, x0 = s.step(eps, 45, sample)
    for i in range(3):
        raw = (sample[i].item() - math.sqrt(1 - a45) * eps[i].item()) / math.sqrt(a45)
        clipped = min(max(raw, -1.0), 1.0)
        # the 0-d alphas are fp32 and their square roots are taken in fp32, as in diffusers
        assert x0[i].item() == pytest.approx(clipped, abs=1e-6)
        assert prev[i].item() == pytest.approx(math.sqrt(a40) * clipped + math.sqrt(1 - a40) * eps[i].item(),
                                               abs=1e-6)
    assert x0[1].item() == 1.0 and x0[2].item() == -1.0  # both clipped
    assert abs((sample[0].item() - math.sqrt(1 - a45) * 0.2) / math.sqrt(a45)) < 1  # first one is not
    # last step (t=0): alpha_prev = 1 (set_alpha_to_one), so x_prev is the clipped x0 itself
    prev0, x00 = s.step(eps, torch.tensor(0), sample)
    assert torch.equal(prev0, x00)
    a0 = s.alphas_cumprod[0].item()
    assert prev0[0].item() == pytest.approx((0.3 - math.sqrt(1 - a0) * 0.2) / math.sqrt(a0), abs=1e-6)


def test_ddim_step_requires_set_timesteps():
    with pytest.raises(RuntimeError):
        DDIMScheduler(50).step(torch.zeros(1), 49, torch.zeros(1))


@pytest.mark.parametrize("steps,dtype,tol", [(10, torch.float32, 1e-5), (50, torch.float32, 5e-4),
                                             (10, torch.float64, 1e-5), (50, torch.float64, 2e-4)])
def test_oracle_denoising_recovers_x0(steps, dtype, tol):
    head = DiffusionActionHead(8, A, K)
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(3, K, A, generator=g) * 1.8 - 0.9).to(dtype)
    noise = torch.randn(3, K, A, generator=g).to(dtype)
    timesteps = head.set_inference_steps(steps)
    x = head.noise_scheduler.add_noise(x0, noise, timesteps[:1].expand(3))
    assert (x - x0).abs().max() > 0.5  # x_T is far from x0
    for t in timesteps:
        x = head.denoise_step(x, noise, t)  # oracle: the exact noise that was added
    assert x.dtype == dtype
    assert (x - x0).abs().max().item() < tol


def test_sample_noisy_actions():
    head = DiffusionActionHead(8, A, K)
    actions = torch.rand(4, K, A) * 2 - 1
    noisy, noise, t = head.sample_noisy_actions(actions, torch.Generator().manual_seed(7))
    assert noisy.shape == noise.shape == (4, K, A) and t.shape == (4,) and t.dtype == torch.int64
    assert int(t.min()) >= 0 and int(t.max()) < 50
    ref = torch.Generator().manual_seed(7)  # noise first, then timesteps (upstream order)
    assert torch.equal(noise, torch.randn(4, K, A, generator=ref))
    assert torch.equal(t, torch.randint(0, 50, (4,), generator=ref))
    ac = head.noise_scheduler.alphas_cumprod[t][:, None, None]
    assert torch.allclose(noisy, ac.sqrt() * actions + (1 - ac).sqrt() * noise, atol=1e-6)
    again = head.sample_noisy_actions(actions, torch.Generator().manual_seed(7))
    assert all(torch.equal(u, v) for u, v in zip((noisy, noise, t), again))
    bf = head.sample_noisy_actions(actions.bfloat16(), torch.Generator().manual_seed(7))
    assert bf[0].dtype == bf[1].dtype == torch.bfloat16


def test_diffusion_head_state_dict_has_only_noise_predictor():
    head = DiffusionActionHead(D, A, K)
    assert all(k.startswith("noise_predictor.mlp_resnet.") for k in head.state_dict())
    assert len(head.state_dict()) == len(L1RegressionActionHead(D, A, K).state_dict())
