"""OpenVLA-OFT heads and small projectors (OPENVLA_OFT.md §1, §4.1-4.3, §7.2).

Attribute names follow upstream moojink/openvla-oft (`prismatic/models/action_heads.py`,
`prismatic/models/projectors.py`) so that the released `action_head--*.pt` and
`proprio_projector--*.pt` files load strictly once DDP's leading `module.` is stripped:

    L1RegressionActionHead   model.layer_norm1.*, model.fc1.*, model.mlp_resnet_blocks.{i}.ffn.{0,1}.*,
                             model.layer_norm2.*, model.fc2.*
    ProprioProjector         fc1.*, fc2.*
    DiffusionActionHead      noise_predictor.mlp_resnet.<same as `model.` above>
    NoisyActionProjector     fc1.*, fc2.*

The diffusion head carries a hand-written DDIM scheduler equal to diffusers
`DDIMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")` with every other setting at
its default (clip_sample to [-1, 1], set_alpha_to_one, steps_offset 0, epsilon prediction, "leading"
spacing) and eta = 0, without depending on diffusers.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------------------------- loading
def _load_upstream(module: nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    """Strictly load an upstream state dict into `module`, stripping one leading `module.` per key.

    Every tensor is cast explicitly to the dtype of the parameter it lands in, so a bf16 checkpoint
    loads into an fp32 module (and vice versa) as a plain cast: the module's dtype decides.
    """
    stripped = _strip(sd)
    own = module.state_dict()
    missing = sorted(set(own) - set(stripped))
    unexpected = sorted(set(stripped) - set(own))
    if missing or unexpected:
        raise KeyError(f"{type(module).__name__}: state dict does not match (after stripping 'module.'): "
                       f"missing keys {missing}; unexpected keys {unexpected}")
    bad_shapes = [f"{k}: checkpoint {tuple(v.shape)} vs module {tuple(own[k].shape)}"
                  for k, v in stripped.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad_shapes:
        raise ValueError(f"{type(module).__name__}: shape mismatch: " + "; ".join(bad_shapes))
    cast = {k: v.to(dtype=own[k].dtype) for k, v in stripped.items()}
    module.load_state_dict(cast, strict=True)


def _strip(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop one leading DDP `module.` from every key."""
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _uniform_dtype(sd: Mapping[str, torch.Tensor]) -> torch.dtype:
    dtypes = {v.dtype for v in sd.values()}
    if len(dtypes) != 1:
        raise ValueError(f"checkpoint mixes dtypes {sorted(map(str, dtypes))}; pass dtype= explicitly")
    return dtypes.pop()


def _count_blocks(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


# ---------------------------------------------------------------------------------------------- MLPResNet
class MLPResNetBlock(nn.Module):
    """`x + ReLU(Linear(LN(x)))`: `ffn = Sequential(LayerNorm, Linear, ReLU)` (ReLU at index 2, no params)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(x)


class MLPResNet(nn.Module):
    """LN(input) -> fc1 -> ReLU -> `num_blocks` x [x + ReLU(Linear(LN(x)))] -> LN -> fc2.

    LayerNorms use torch's default eps 1e-5, as upstream. No activation after `fc2`.
    """

    def __init__(self, num_blocks: int, input_dim: int, hidden_dim: int, output_dim: int) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(input_dim)
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.relu = nn.ReLU()
        self.mlp_resnet_blocks = nn.ModuleList(MLPResNetBlock(hidden_dim) for _ in range(num_blocks))
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.fc1(self.layer_norm1(x)))
        for block in self.mlp_resnet_blocks:
            x = block(x)
        return self.fc2(self.layer_norm2(x))


def _chunk_rows(h: torch.Tensor, chunk_len: int, action_dim: int, hidden_size: int) -> torch.Tensor:
    """(B, K*A, D) -> (B, K, A*D): timestep t is tokens A*t ... A*t+A-1 concatenated in order."""
    if h.dim() != 3 or h.shape[1] != chunk_len * action_dim or h.shape[2] != hidden_size:
        raise ValueError(f"expected action hidden states (B, {chunk_len * action_dim}, {hidden_size}) "
                         f"= (B, K*A, D), got {tuple(h.shape)}")
    return h.reshape(h.shape[0], chunk_len, action_dim * hidden_size)


# ---------------------------------------------------------------------------------------------- L1 head
class L1RegressionActionHead(nn.Module):
    """MLPResNet on the A concatenated hidden states of each chunk timestep -> normalised actions (§4.1).

    Parameters for (D=4096, A=7, K=8, 2 blocks): 151,117,831. The forward runs in the module's dtype;
    the caller casts hidden states (upstream eval: bf16 head, bf16 hidden states, output cast to fp32).
    """

    def __init__(self, hidden_size: int, action_dim: int, chunk_len: int, num_blocks: int = 2) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.action_dim = action_dim
        self.chunk_len = chunk_len
        self.model = MLPResNet(num_blocks, action_dim * hidden_size, hidden_size, action_dim)

    def predict_action(self, h: torch.Tensor) -> torch.Tensor:
        """h (B, K*A, D) -> actions (B, K, A); no tanh, no clipping."""
        return self.model(_chunk_rows(h, self.chunk_len, self.action_dim, self.hidden_size))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.predict_action(h)

    @staticmethod
    def loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """L1 loss, mean over all elements (upstream `nn.L1Loss()`)."""
        return F.l1_loss(pred, target, reduction="mean")

    def load_upstream_state_dict(self, sd: Mapping[str, torch.Tensor]) -> "L1RegressionActionHead":
        """Strictly load `action_head--*.pt` (`module.` prefix optional) into this module's dtype."""
        _load_upstream(self, sd)
        return self

    @classmethod
    def from_upstream_state_dict(cls, sd: Mapping[str, torch.Tensor], chunk_len: int,
                                 dtype: torch.dtype | None = None) -> "L1RegressionActionHead":
        """Build from an upstream state dict, reading D, A and the block count from its shapes.

        `chunk_len` is not recoverable from the weights. `dtype=None` keeps the checkpoint's dtype
        (bf16 for the released heads); otherwise the weights are cast to `dtype`.
        """
        s = _strip(sd)
        hidden_size, in_dim = s["model.fc1.weight"].shape
        action_dim = s["model.fc2.weight"].shape[0]
        if in_dim != action_dim * hidden_size:
            raise ValueError(f"fc1 input {in_dim} != action_dim {action_dim} * hidden {hidden_size}")
        head = cls(hidden_size, action_dim, chunk_len, _count_blocks(s, "model.mlp_resnet_blocks."))
        return head.to(dtype or _uniform_dtype(s)).load_upstream_state_dict(s)


# ---------------------------------------------------------------------------------------------- projectors
class ProprioProjector(nn.Module):
    """`fc1 Linear(A_p, D)` -> exact GELU -> `fc2 Linear(D, D)` (§4.2); (B, A_p) -> (B, D).

    Parameters for (A_p=8, D=4096): 16,818,176. Upstream stores it in fp32.
    """

    def __init__(self, proprio_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(proprio_dim, hidden_size)
        self.act_fn1 = nn.GELU()
        self.fc2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, proprio: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act_fn1(self.fc1(proprio)))

    def load_upstream_state_dict(self, sd: Mapping[str, torch.Tensor]) -> "ProprioProjector":
        """Strictly load `proprio_projector--*.pt` (`module.` prefix optional) into this module's dtype."""
        _load_upstream(self, sd)
        return self

    @classmethod
    def from_upstream_state_dict(cls, sd: Mapping[str, torch.Tensor],
                                 dtype: torch.dtype | None = None) -> "ProprioProjector":
        """Build from an upstream state dict; `dtype=None` keeps the checkpoint's dtype (fp32 on disk)."""
        s = _strip(sd)
        hidden_size, proprio_dim = s["fc1.weight"].shape
        return cls(proprio_dim, hidden_size).to(dtype or _uniform_dtype(s)).load_upstream_state_dict(s)


class NoisyActionProjector(nn.Module):
    """[Diffusion] `fc1 Linear(1, D)` -> exact GELU -> `fc2 Linear(D, D)` on each of the K*A noisy scalars.

    Input (B, K, A) or (B, K*A, 1) -> (B, K*A, D); scalars are taken in K-major order, matching the
    placeholder tokens they replace.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(1, hidden_size)
        self.act_fn1 = nn.GELU()
        self.fc2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, noisy_actions: torch.Tensor) -> torch.Tensor:
        x = noisy_actions.reshape(noisy_actions.shape[0], -1, 1)
        return self.fc2(self.act_fn1(self.fc1(x)))

    def load_upstream_state_dict(self, sd: Mapping[str, torch.Tensor]) -> "NoisyActionProjector":
        _load_upstream(self, sd)
        return self

    @classmethod
    def from_upstream_state_dict(cls, sd: Mapping[str, torch.Tensor],
                                 dtype: torch.dtype | None = None) -> "NoisyActionProjector":
        s = _strip(sd)
        return cls(s["fc1.weight"].shape[0]).to(dtype or _uniform_dtype(s)).load_upstream_state_dict(s)


# ---------------------------------------------------------------------------------------------- diffusion
class SinusoidalTimeEncoder(nn.Module):
    """Timestep embedding (B,) -> (B, dim) in fp32: `[sin(t*f), cos(t*f)]`, `f_k = exp(-k*ln(1e4)/(half-1))`.

    The operation order (`k * -ln(1e4)`, then `/ (half - 1)`, then `exp`) is upstream's, so the fp32
    values match bit for bit. The caller casts to the model dtype.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim < 4 or dim % 2:
            raise ValueError(f"time encoder dim must be even and >= 4, got {dim}")
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        exponent = torch.arange(half, device=t.device, dtype=torch.float32) * -math.log(10000) / (half - 1)
        args = t.to(torch.float32)[:, None] * torch.exp(exponent)[None, :]
        return torch.cat((args.sin(), args.cos()), dim=-1)


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """`squaredcos_cap_v2` betas: `min(1 - abar((i+1)/T) / abar(i/T), max_beta)` in float64, stored fp32.

    `abar(t) = cos((t + 0.008) / 1.008 * pi / 2) ** 2` (the GLIDE / improved-DDPM cosine schedule).
    """
    def abar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    return torch.tensor([min(1 - abar((i + 1) / T) / abar(i / T), max_beta) for i in range(T)],
                        dtype=torch.float32)


class DDIMScheduler:
    """Deterministic DDIM (eta = 0) with a cosine schedule; numerically equal to diffusers'
    `DDIMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")` at default settings.

    Not an `nn.Module`: it owns no parameters and adds no state-dict keys. `alphas_cumprod` stays fp32
    on the CPU; `step` uses its entries as 0-d CPU tensors and `add_noise` casts it to the sample's
    device and dtype first, exactly as diffusers does, so bf16 results match too.
    """

    def __init__(self, num_train_timesteps: int = 50, clip_sample_range: float | None = 1.0) -> None:
        self.num_train_timesteps = num_train_timesteps
        self.clip_sample_range = clip_sample_range  # None disables clipping of the predicted x0
        self.betas = cosine_betas(num_train_timesteps)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.final_alpha_cumprod = torch.tensor(1.0)  # set_alpha_to_one=True
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)

    def set_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """"leading" spacing: `[(n-1)*r, ..., r, 0]` with `r = T // n` (steps_offset 0)."""
        if not 1 <= num_inference_steps <= self.num_train_timesteps:
            raise ValueError(f"num_inference_steps must be in [1, {self.num_train_timesteps}], "
                             f"got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        ratio = self.num_train_timesteps // num_inference_steps
        self.timesteps = torch.arange(num_inference_steps - 1, -1, -1, dtype=torch.int64) * ratio
        return self.timesteps

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """`sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise`, one t per batch row, computed in x0's dtype."""
        abar = self.alphas_cumprod.to(device=original.device, dtype=original.dtype)[timesteps.to(original.device)]
        shape = (-1,) + (1,) * (original.dim() - 1)
        return (abar ** 0.5).reshape(shape) * original + ((1 - abar) ** 0.5).reshape(shape) * noise

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor,
             sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step x_t -> x_{t-r} from an epsilon prediction; returns (prev_sample, predicted x0).

        x0 = (x_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t), clipped to [-1, 1];
        x_prev = sqrt(abar_prev) * x0 + sqrt(1 - abar_prev) * eps, with abar_prev = 1 past t = 0.
        """
        if self.num_inference_steps is None:
            raise RuntimeError("call set_timesteps(n) before step()")
        t = int(timestep)
        prev_t = t - self.num_train_timesteps // self.num_inference_steps
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        pred_x0 = (sample - beta_prod_t ** 0.5 * model_output) / alpha_prod_t ** 0.5
        if self.clip_sample_range is not None:
            pred_x0 = pred_x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        prev_sample = alpha_prod_prev ** 0.5 * pred_x0 + (1 - alpha_prod_prev) ** 0.5 * model_output
        return prev_sample, pred_x0


class NoisePredictionModel(nn.Module):
    """Upstream wrapper kept for its key prefix: `noise_predictor.mlp_resnet.*`."""

    def __init__(self, num_blocks: int, input_dim: int, hidden_dim: int, output_dim: int) -> None:
        super().__init__()
        self.mlp_resnet = MLPResNet(num_blocks, input_dim, hidden_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_resnet(x)


class DiffusionActionHead(nn.Module):
    """[Diffusion] noise predictor (MLPResNet A*D -> A), sinusoidal time encoder, DDIM scheduler (§4.3).

    Training: `noisy, noise, t = sample_noisy_actions(actions)`; the VLA sees `noisy` through a
    `NoisyActionProjector` and `timestep_embedding(t)` as an extra token; `loss(predict_noise(h), noise)`.
    Inference: `x = randn(B, K, A)`; for `t in set_inference_steps(n)`: run the VLA, then
    `x = denoise_step(x, predict_noise(h), t)`.
    """

    def __init__(self, hidden_size: int, action_dim: int, chunk_len: int, num_blocks: int = 2,
                 train_steps: int = 50) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.action_dim = action_dim
        self.chunk_len = chunk_len
        self.num_diffusion_steps = train_steps
        self.noise_predictor = NoisePredictionModel(num_blocks, action_dim * hidden_size, hidden_size, action_dim)
        self.time_encoder = SinusoidalTimeEncoder(hidden_size)
        self.noise_scheduler = DDIMScheduler(train_steps)

    def timestep_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """t (B,) -> (B, D) fp32."""
        return self.time_encoder(t)

    def sample_noisy_actions(self, actions: torch.Tensor, generator: torch.Generator | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """actions (B, K, A) -> (noisy (B, K, A), noise (B, K, A), timesteps (B,) int64 in [0, T)).

        Noise (actions' dtype) is drawn before the timesteps, as upstream.
        """
        noise = torch.randn(actions.shape, generator=generator, device=actions.device, dtype=actions.dtype)
        timesteps = torch.randint(0, self.noise_scheduler.num_train_timesteps, (actions.shape[0],),
                                  generator=generator, device=actions.device)
        return self.noise_scheduler.add_noise(actions, noise, timesteps), noise, timesteps

    def predict_noise(self, h: torch.Tensor) -> torch.Tensor:
        """h (B, K*A, D) -> predicted noise (B, K, A)."""
        return self.noise_predictor(_chunk_rows(h, self.chunk_len, self.action_dim, self.hidden_size))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.predict_noise(h)

    @staticmethod
    def loss(noise_pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """MSE, mean over all elements."""
        return F.mse_loss(noise_pred, noise, reduction="mean")

    def set_inference_steps(self, num_steps: int) -> torch.Tensor:
        """Set the DDIM schedule ("leading" spacing) and return its timesteps, high to low."""
        return self.noise_scheduler.set_timesteps(num_steps)

    def denoise_step(self, sample: torch.Tensor, model_noise_pred: torch.Tensor,
                     t: int | torch.Tensor) -> torch.Tensor:
        """One deterministic DDIM step: x_t -> x_{t-r}."""
        return self.noise_scheduler.step(model_noise_pred, t, sample)[0]

    def load_upstream_state_dict(self, sd: Mapping[str, torch.Tensor]) -> "DiffusionActionHead":
        """Strictly load a diffusion `action_head--*.pt` (`module.` optional) into this module's dtype."""
        _load_upstream(self, sd)
        return self

    @classmethod
    def from_upstream_state_dict(cls, sd: Mapping[str, torch.Tensor], chunk_len: int, train_steps: int = 50,
                                 dtype: torch.dtype | None = None) -> "DiffusionActionHead":
        s = _strip(sd)
        hidden_size, in_dim = s["noise_predictor.mlp_resnet.fc1.weight"].shape
        action_dim = s["noise_predictor.mlp_resnet.fc2.weight"].shape[0]
        if in_dim != action_dim * hidden_size:
            raise ValueError(f"fc1 input {in_dim} != action_dim {action_dim} * hidden {hidden_size}")
        blocks = _count_blocks(s, "noise_predictor.mlp_resnet.mlp_resnet_blocks.")
        head = cls(hidden_size, action_dim, chunk_len, blocks, train_steps)
        return head.to(dtype or _uniform_dtype(s)).load_upstream_state_dict(s)
