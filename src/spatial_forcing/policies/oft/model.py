"""OpenVLA-OFT on stock transformers: fused DINOv2 + SigLIP vision, projector, bidirectional
Llama, proprio token, parallel-decoded action chunk (OPENVLA_OFT.md §1-§4).

Sequence fed to the Llama body (`inputs_embeds`, positions `arange(L)`):

    0            BOS
    1 .. V*P     projected patches, view-major, row-major           (P = (image/patch)^2)
    next         proprio token (if used), diffusion timestep token (if diffusion)
    next P_b     prompt ids[1:], ending with the space token (29871 for Llama)
    next K*A     action placeholders: zero vectors (diffusion: projected noisy actions)
    next         EOS, then right padding

Attention is bidirectional over every non-pad token: an additive 4-D mask that depends only on
the key. Actions are read from the final-normed states at `[S+P_b, S+P_b+K*A)` (one position
before the placeholders, as published).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (Dinov2WithRegistersConfig, Dinov2WithRegistersModel, LlamaConfig, LlamaModel,
                          SiglipVisionConfig, SiglipVisionModel)

from ..base import PolicyOutput
from .config import OFTConfig
from .heads import DiffusionActionHead, L1RegressionActionHead, NoisyActionProjector, ProprioProjector


def dino_config(cfg: OFTConfig) -> Dinov2WithRegistersConfig:
    return Dinov2WithRegistersConfig(
        hidden_size=cfg.dino_hidden, num_hidden_layers=cfg.dino_depth - 1, num_attention_heads=cfg.dino_heads,
        mlp_ratio=int(cfg.dino_mlp_ratio), image_size=cfg.image_size, patch_size=cfg.patch_size,
        num_register_tokens=cfg.dino_registers, layer_norm_eps=cfg.vision_eps, hidden_act="gelu", qkv_bias=True,
        use_swiglu_ffn=False, layerscale_value=1.0, drop_path_rate=0.0, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)


def siglip_config(cfg: OFTConfig) -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=cfg.siglip_hidden, intermediate_size=cfg.siglip_intermediate,
        num_hidden_layers=cfg.siglip_depth - 1, num_attention_heads=cfg.siglip_heads, image_size=cfg.image_size,
        patch_size=cfg.patch_size, layer_norm_eps=cfg.vision_eps, hidden_act="gelu", attention_dropout=0.0,
        vision_use_head=False)


def llama_config(cfg: OFTConfig) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id, tie_word_embeddings=False,
        attn_implementation="sdpa")


class FiLM(nn.Module):
    """Per-block `x * (1 + scale(e)) + shift(e)` after the attention residual (OFT+, §4.4)."""

    def __init__(self, context_dim: int, dim: int) -> None:
        super().__init__()
        self.scale = nn.Linear(context_dim, dim)
        self.shift = nn.Linear(context_dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return x * (1 + self.scale(context)[:, None]) + self.shift(context)[:, None]


class FusedVisionBackbone(nn.Module):
    """DINOv2 (channels 0-2 of each view) ‖ SigLIP (channels 3-5), second-to-last block, no final
    norm, registers and CLS dropped; one backbone shared by all views."""

    def __init__(self, cfg: OFTConfig) -> None:
        super().__init__()
        self.featurizer = Dinov2WithRegistersModel(dino_config(cfg))
        self.fused_featurizer = SiglipVisionModel(siglip_config(cfg))
        # The final norms are never applied (the second-to-last block is read without them).
        self.featurizer.layernorm = nn.Identity()
        self.fused_featurizer.post_layernorm = nn.Identity()
        self.featurizer.embeddings.mask_token.requires_grad_(False)  # unused, kept for the key layout
        self.num_prefix = 1 + cfg.dino_registers
        self.film = None
        if cfg.use_film:
            self.film = nn.ModuleDict({
                "featurizer": nn.ModuleList(FiLM(cfg.hidden_size, cfg.dino_hidden) for _ in range(cfg.dino_depth - 1)),
                "fused_featurizer": nn.ModuleList(FiLM(cfg.hidden_size, cfg.siglip_hidden)
                                                  for _ in range(cfg.siglip_depth - 1))})

    def _dino(self, pixels: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = self.featurizer.embeddings(pixels)
        for i, layer in enumerate(self.featurizer.encoder.layer):
            if self.film is None:
                x = layer(x)
            else:
                x = x + layer.layer_scale1(layer.attention(layer.norm1(x))[0])
                x = self.film["featurizer"][i](x, context)
                x = x + layer.layer_scale2(layer.mlp(layer.norm2(x)))
        return x[:, self.num_prefix:]

    def _siglip(self, pixels: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = self.fused_featurizer.embeddings(pixels)
        for i, layer in enumerate(self.fused_featurizer.encoder.layers):
            if self.film is None:
                x = layer(x, attention_mask=None)
            else:
                x = x + layer.self_attn(layer.layer_norm1(x), attention_mask=None)[0]
                x = self.film["fused_featurizer"][i](x, context)
                x = x + layer.mlp(layer.layer_norm2(x))
        return x

    def forward(self, pixel_values: torch.Tensor, film_context: torch.Tensor | None = None) -> torch.Tensor:
        """`[B, 6V, H, W]` -> `[B, V*P, D_dino + D_siglip]`, views in order."""
        b, c, h, w = pixel_values.shape
        views = pixel_values.reshape(b * (c // 6), 6, h, w)
        context = None if film_context is None else film_context.repeat_interleave(c // 6, dim=0)
        fused = torch.cat([self._dino(views[:, :3], context), self._siglip(views[:, 3:], context)], dim=-1)
        return fused.reshape(b, -1, fused.shape[-1])


class FusedProjector(nn.Module):
    """`fc1` (fused -> 4*fused) -> GELU -> `fc2` (-> LLM width) -> GELU -> `fc3` (upstream names)."""

    def __init__(self, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
        self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
        self.fc3 = nn.Linear(llm_dim, llm_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


def bidirectional_mask(key_real: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive `[B, 1, L, L]` mask: 0 where the key is a real token, dtype-min where it is padding,
    identical for every query (the OFT fork's rule). A float mask: a bool one is wrong under eager."""
    b, length = key_real.shape
    bias = torch.zeros(b, 1, 1, length, dtype=dtype, device=key_real.device)
    bias = bias.masked_fill(~key_real[:, None, None, :], torch.finfo(dtype).min)
    return bias.expand(b, 1, length, length)


class OFTModel(nn.Module):
    """The network: `vision_backbone`, `projector`, `language_model` (LlamaModel), `proprio_projector`,
    `action_head` (+ `noisy_action_projector` for diffusion). State-dict names mirror this tree."""

    def __init__(self, config: OFTConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_backbone = FusedVisionBackbone(config)
        self.projector = FusedProjector(config.fused_vision_dim, config.hidden_size)
        self.language_model = LlamaModel(llama_config(config))
        heads = self.new_heads(config)
        self.proprio_projector = heads.get("proprio_projector")
        self.action_head = heads["action_head"]
        self.noisy_action_projector = heads.get("noisy_action_projector")

    @staticmethod
    def new_heads(config: OFTConfig) -> dict[str, nn.Module]:
        """Freshly initialised OFT heads for `config` (also used when fine-tuning the base OpenVLA)."""
        heads: dict[str, nn.Module] = {}
        if config.use_proprio:
            heads["proprio_projector"] = ProprioProjector(config.proprio_dim, config.hidden_size)
        if config.action_head == "l1":
            heads["action_head"] = L1RegressionActionHead(config.hidden_size, config.action_dim, config.chunk_len,
                                                          config.head_blocks)
        else:
            heads["action_head"] = DiffusionActionHead(config.hidden_size, config.action_dim, config.chunk_len,
                                                       config.head_blocks, config.diffusion_train_steps)
            heads["noisy_action_projector"] = NoisyActionProjector(config.hidden_size)
        return heads

    # -- sequence ------------------------------------------------------------------------------
    def action_positions(self, prompt_lens: torch.Tensor, text_len: int) -> torch.Tensor:
        """Bool `[B, Lt]` over the text ids: True on the K*A placeholders of each sample."""
        j = torch.arange(text_len, device=prompt_lens.device)[None]
        start = 1 + prompt_lens[:, None]
        return (j >= start) & (j < start + self.config.num_action_tokens)

    def embed(self, batch: dict, noisy_actions: torch.Tensor | None = None,
              timesteps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Build `inputs_embeds [B, L, D]` and the real-key mask `[B, L]` for one batch."""
        cfg = self.config
        ids, text_mask, prompt_lens = batch["input_ids"], batch["attention_mask"].bool(), batch["prompt_lens"]
        tok = self.language_model.embed_tokens(ids)
        is_action = self.action_positions(prompt_lens, ids.shape[1])
        film_context = None
        if cfg.use_film:  # mean input embedding of every non-action text token (pads included, as upstream)
            keep = (~is_action).to(tok.dtype)[..., None]
            film_context = (tok * keep).sum(1) / keep.sum(1)
        patches = self.projector(self.vision_backbone(batch["pixel_values"].to(tok.dtype), film_context))
        prefix = [patches]
        if cfg.use_proprio:
            prefix.append(self.proprio_projector(batch["proprio"].to(tok.dtype))[:, None])
        if cfg.action_head == "diffusion":
            prefix.append(self.action_head.timestep_embedding(timesteps).to(tok.dtype)[:, None])
        if noisy_actions is None:
            text = tok * (~is_action).to(tok.dtype)[..., None]  # placeholders become zero vectors
        else:
            projected = self.noisy_action_projector(noisy_actions.reshape(len(ids), -1, 1).to(tok.dtype))
            text = tok.masked_scatter(is_action[..., None], projected)  # fills placeholders in order
        prefix = torch.cat(prefix, dim=1)
        embeds = torch.cat([text[:, :1], prefix, text[:, 1:]], dim=1)
        ones = torch.ones(prefix.shape[:2], dtype=torch.bool, device=ids.device)
        real = torch.cat([text_mask[:, :1], ones, text_mask[:, 1:]], dim=1)
        return embeds, real

    def run_llm(self, embeds: torch.Tensor, real: torch.Tensor, capture_layer: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Final-normed states `[B, L, D]` and, if asked, hidden state `capture_layer` (HF index:
        0 = embeddings, k = output of block k, num_layers = final-normed; negative from the end)."""
        n = self.config.num_layers
        captured: dict[str, torch.Tensor] = {}
        idx = None if capture_layer is None else capture_layer % (n + 1)
        hook = None
        if idx is not None and 0 < idx < n:
            hook = self.language_model.layers[idx - 1].register_forward_hook(
                lambda _m, _i, out: captured.__setitem__("h", out[0] if isinstance(out, tuple) else out))
        try:
            out = self.language_model(inputs_embeds=embeds, attention_mask=bidirectional_mask(real, embeds.dtype),
                                      use_cache=False)
        finally:
            if hook is not None:
                hook.remove()
        last = out.last_hidden_state
        hidden = None if idx is None else embeds if idx == 0 else last if idx == n else captured["h"]
        return last, hidden

    def action_hidden(self, last: torch.Tensor, prompt_lens: torch.Tensor) -> torch.Tensor:
        """Gather `[B, K*A, D]` from positions `S + P_b ... S + P_b + K*A - 1` (the published shift)."""
        start = self.config.num_prefix_tokens + prompt_lens
        idx = start[:, None] + torch.arange(self.config.num_action_tokens, device=last.device)[None]
        return torch.gather(last, 1, idx[..., None].expand(-1, -1, last.shape[-1]))

    def visual_grid(self, hidden: torch.Tensor) -> torch.Tensor:
        """The visual tokens of `hidden` as `[B, V, g, g, D]`, shifted by `visual_token_shift`."""
        cfg = self.config
        start = 1 + cfg.visual_token_shift
        count = cfg.num_images * cfg.patches_per_image
        g = cfg.grid_size
        return hidden[:, start:start + count].reshape(len(hidden), cfg.num_images, g, g, hidden.shape[-1])

    # -- training ------------------------------------------------------------------------------
    def forward(self, batch: dict, align_layer: int | None = None) -> PolicyOutput:
        """Loss on a batch with normalised `actions [B, K, A]` (L1, or noise MSE for diffusion)."""
        cfg = self.config
        actions = batch["actions"]
        if tuple(actions.shape[1:]) != (cfg.chunk_len, cfg.action_dim):
            raise ValueError(f"actions must be [B, {cfg.chunk_len}, {cfg.action_dim}] (chunk_len, action_dim), "
                             f"got {tuple(actions.shape)}")
        if cfg.action_head == "l1":
            embeds, real = self.embed(batch)
            last, hidden = self.run_llm(embeds, real, align_layer)
            pred = self.action_head.predict_action(self.action_hidden(last, batch["prompt_lens"]))
            loss = F.l1_loss(pred.float(), actions.float())
            metrics = {"l1_current": F.l1_loss(pred[:, 0].float(), actions[:, 0].float()).detach(),
                       "l1_future": F.l1_loss(pred[:, 1:].float(), actions[:, 1:].float()).detach()
                       if cfg.chunk_len > 1 else loss.detach()}
        else:
            noisy, noise, t = self.action_head.sample_noisy_actions(actions.float())
            embeds, real = self.embed(batch, noisy_actions=noisy, timesteps=t)
            last, hidden = self.run_llm(embeds, real, align_layer)
            noise_pred = self.action_head.predict_noise(self.action_hidden(last, batch["prompt_lens"]))
            loss = F.mse_loss(noise_pred.float(), noise.float())
            pred, metrics = None, {}
        metrics["action_loss"] = loss.detach()
        visual = None if hidden is None else self.visual_grid(hidden)
        return PolicyOutput(action_loss=loss, metrics=metrics, visual_hidden=visual, actions=pred)

    # -- inference -----------------------------------------------------------------------------
    @torch.no_grad()
    def predict_normalized(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised action chunk `[B, K, A]` (float32) for a processed batch."""
        cfg = self.config
        if cfg.action_head == "l1":
            embeds, real = self.embed(batch)
            last, _ = self.run_llm(embeds, real)
            return self.action_head.predict_action(self.action_hidden(last, batch["prompt_lens"])).float()
        b = batch["input_ids"].shape[0]
        device = batch["input_ids"].device
        sample = torch.randn(b, cfg.chunk_len, cfg.action_dim, generator=generator, device=device)
        for t in self.action_head.set_inference_steps(cfg.diffusion_infer_steps):
            ts = torch.full((b,), int(t), device=device, dtype=torch.long)
            embeds, real = self.embed(batch, noisy_actions=sample, timesteps=ts)
            last, _ = self.run_llm(embeds, real)
            noise_pred = self.action_head.predict_noise(self.action_hidden(last, batch["prompt_lens"])).float()
            sample = self.action_head.denoise_step(sample, noise_pred, int(t))
        return sample
