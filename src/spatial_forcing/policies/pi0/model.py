"""`Pi0Model`: transformers' `PI0ForConditionalGeneration` (PaliGemma prefix + Gemma action expert,
flow matching) with the student protocol on top.

    inputs = {"input_ids": [B, V*P + L] (P image placeholders per view, then the prompt),
              "attention_mask": [B, V*P + L] (0 = absent camera or prompt padding),
              "pixel_values": [B, V, 3, S, S] in [-1, 1], "image_masks": [B, V] bool (False = absent camera),
              "state": [B, 32] normalised + zero-padded, "actions": [B, K, 32] (training),
              "pad_mask": [B, V, S, S] bool (optional: letterbox, True = real pixel),
              "noise": [B, K, 32], "time": [B] (optional: drawn here otherwise)}
    model(inputs, align_layer=k) -> PolicyOutput(flow-matching MSE, metrics, visual_hidden [B, V, g, g, width],
                                                 slot_mask, pad_mask)
    model.predict_normalized(inputs) -> [B, K, 32] (10 Euler steps from the cached prefix)

Facts this file relies on (checked by tests/test_pi0_upstream.py against a literal openpi forward):
- The prefix is `V` cameras x `P` SigLIP tokens then the prompt, bidirectional; an absent camera's tokens
  and the prompt padding are masked out of attention and skipped by the positions (`cumsum(mask) - 1`),
  as openpi's `make_att_2d_masks` + `position_ids`. transformers' PI0 runs the prefix through the
  PaliGemma Gemma once (a KV cache) and the action expert over `[state, K actions]` against it: the same
  numbers as openpi's joint per-layer attention, since prefix tokens never attend to the suffix.
- transformers' `output_hidden_states` returns the expert's states only: the PaliGemma stream for Spatial
  Forcing is captured by a hook on `model.vlm.language_model.layers[k-1]` (k = 0: the prefix
  embeddings; k = depth: the final norm), openpi-SF's `all_hidden_states[k]`.
- Training noise `N(0, 1)` and time `Beta(1.5, 1) * 0.999 + 0.001`; `x_t = t noise + (1 - t) actions`,
  target `noise - actions`, MSE over every padded dim (openpi `PI0Pytorch.forward`).
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn
from transformers import PI0ForConditionalGeneration

from ..base import PolicyOutput
from .config import Pi0Config


def _checkpointed(module: nn.Module):
    plain = module.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if module.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(plain, x, use_reentrant=False)
        return plain(x)

    return forward


class Pi0Model(PI0ForConditionalGeneration):
    """`PI0ForConditionalGeneration` built from a `Pi0Config` (`pi0_config`; `config` is transformers').
    Called with `batch=` it is the student (`forward(batch, align_layer)`); with transformers' keyword
    arguments it is transformers' forward (its sampling loop calls it that way)."""

    def __init__(self, config: Pi0Config) -> None:
        super().__init__(config.hf_config())
        self.pi0_config = config
        # The expert only takes embeddings: openpi drops its vocabulary table too (`embed_tokens = None`),
        # which saves vocab x expert_width parameters (263M at full size).
        self.model.dit.embed_tokens = None
        # transformers' layer checkpointing drops the KV cache a layer writes, and π0's expert reads the
        # prefix's cache: the Gemmas are checkpointed here instead (`activation_checkpointing_enable`), so a
        # generic "enable it on every HF model inside" leaves them alone.
        for sub in (self.model, self.model.vlm, self.model.vlm.language_model, self.model.dit):
            sub.supports_gradient_checkpointing = False

    # -- gradient checkpointing -------------------------------------------------------------------
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute in backward: every SigLIP block (transformers' own checkpointing) and the feed-forward
        part of every Gemma block of both streams (the widest activations; the attention, which writes and
        reads the shared KV cache, is kept)."""
        vision = self.model.vlm.vision_tower
        if hasattr(vision, "activation_checkpointing_enable"):
            vision.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            vision.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for lm in (self.model.vlm.language_model, self.model.dit):
            for layer in lm.layers:
                if "forward" not in vars(layer.mlp):
                    layer.mlp.forward = _checkpointed(layer.mlp)

    gradient_checkpointing_enable = activation_checkpointing_enable

    # -- pieces ---------------------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        return self.model.vlm.language_model

    def layer_index(self, layer: int) -> int:
        n = self.pi0_config.depth
        if not -(n + 1) <= layer <= n:
            raise ValueError(f"align layer {layer} is beyond π0's PaliGemma depth {n} (valid: 0..{n}, or negative "
                             f"from the end)")
        return layer % (n + 1)

    def _capture(self, layer: int, store: dict[str, torch.Tensor]):
        """A hook that stores the PaliGemma stream at `layer` (HF index) in `store["h"]`."""
        lm = self.language_model
        idx = self.layer_index(layer)

        def keep(value):
            store.setdefault("h", value[0] if isinstance(value, tuple) else value)

        if idx == 0:
            return lm.layers[0].register_forward_pre_hook(lambda _m, args, kwargs: keep(
                args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
        if idx == self.pi0_config.depth:
            return lm.norm.register_forward_hook(lambda _m, _i, out: keep(out))
        return lm.layers[idx - 1].register_forward_hook(lambda _m, _i, out: keep(out))

    def visual_grid(self, hidden: torch.Tensor) -> torch.Tensor:
        """The image tokens of the prefix as `[B, V, g, g, D]` (cameras in order, row-major patches)."""
        cfg = self.pi0_config
        v, g = cfg.num_images, cfg.grid_size
        return hidden[:, :v * g * g].reshape(len(hidden), v, g, g, hidden.shape[-1])

    def sample_time(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """openpi `sample_time`: Beta(1.5, 1) * 0.999 + 0.001, float32."""
        cfg = self.config
        beta = torch.distributions.Beta(torch.tensor(cfg.time_sampling_beta_alpha, dtype=torch.float32),
                                        torch.tensor(cfg.time_sampling_beta_beta, dtype=torch.float32))
        t = beta.sample((batch_size,)) * cfg.time_sampling_scale + cfg.time_sampling_offset
        return t.to(device=device, dtype=torch.float32)

    def _check(self, batch: dict) -> None:
        cfg = self.pi0_config
        need = ("input_ids", "attention_mask", "pixel_values", "image_masks", "state")
        missing = [k for k in need if k not in batch]
        if missing:
            raise ValueError(f"π0 inputs lack {missing}; build them with Pi0Policy.training_inputs or the processor")
        pv = batch["pixel_values"]
        if pv.ndim != 5 or tuple(pv.shape[1:]) != (cfg.num_images, 3, cfg.image_size, cfg.image_size):
            raise ValueError(f"pixel_values must be [B, {cfg.num_images}, 3, {cfg.image_size}, {cfg.image_size}] "
                             f"(cameras x channels x side), found {tuple(pv.shape)}")

    def _param_dtype(self) -> torch.dtype:
        return self.action_out_proj.weight.dtype

    # -- training -------------------------------------------------------------------------------
    def forward(self, batch: dict | None = None, align_layer: int | None = None, **hf_kwargs):
        if batch is None:  # transformers' own call signature (its sampling loop, its tests)
            return super().forward(**hf_kwargs)
        if hf_kwargs:
            raise TypeError(f"Pi0Model(batch, align_layer) takes no other arguments, found {sorted(hf_kwargs)}")
        cfg = self.pi0_config
        self._check(batch)
        actions = batch.get("actions")
        if actions is None or tuple(actions.shape[1:]) != (cfg.chunk_len, cfg.max_action_dim):
            raise ValueError(f"actions must be [B, {cfg.chunk_len}, {cfg.max_action_dim}] (normalised, zero-padded), "
                             f"found {None if actions is None else tuple(actions.shape)}")
        b, device = actions.shape[0], actions.device
        actions = actions.float()
        noise = batch.get("noise")
        noise = torch.randn(actions.shape, device=device, dtype=torch.float32) if noise is None else noise.float()
        time = batch.get("time")
        time = self.sample_time(b, device) if time is None else time.float()
        store: dict[str, torch.Tensor] = {}
        hook = None if align_layer is None else self._capture(align_layer, store)
        dtype = self._param_dtype()
        try:
            out = super().forward(state=batch["state"].to(dtype), noise=noise.to(dtype), timestep=time,
                                  input_ids=batch["input_ids"], pixel_values=batch["pixel_values"].to(dtype),
                                  pixel_attention_mask=torch.ones(batch["image_masks"].shape, dtype=torch.bool,
                                                                  device=device),
                                  attention_mask=batch["attention_mask"], actions=actions.to(dtype))
        finally:
            if hook is not None:
                hook.remove()
        loss = out.loss.float()
        visual = None if align_layer is None else self.visual_grid(store["h"])
        return PolicyOutput(action_loss=loss, metrics={"action_loss": loss.detach()}, visual_hidden=visual,
                            slot_mask=batch["image_masks"] if align_layer is not None else None,
                            pad_mask=batch.get("pad_mask") if align_layer is not None else None)

    # -- inference ------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_normalized(self, batch: dict, noise: torch.Tensor | None = None,
                           generator: torch.Generator | None = None, num_steps: int | None = None) -> torch.Tensor:
        """Normalised, padded chunks `[B, K, max_action_dim]` (float32): the prefix once into a KV cache,
        then `num_steps` Euler steps from t = 1 to 0 with the expert (openpi `sample_actions`; the state
        is integrated in float32 whatever the weights' dtype)."""
        cfg = self.pi0_config
        self._check(batch)
        b, device, dtype = batch["input_ids"].shape[0], batch["input_ids"].device, self._param_dtype()
        steps = num_steps or cfg.num_steps
        if noise is None:
            noise = torch.randn(b, cfg.chunk_len, cfg.max_action_dim, generator=generator, dtype=torch.float32,
                                device="cpu" if generator is None else generator.device).to(device)
        attention_mask = batch["attention_mask"]
        pam = torch.ones(batch["image_masks"].shape, dtype=torch.bool, device=device)
        embeds = self.model.embed_prefix(batch["input_ids"], batch["pixel_values"].to(dtype), pam)
        cache = self.model.vlm(inputs_embeds=embeds, attention_mask=attention_mask,
                               position_ids=attention_mask.cumsum(-1) - 1,
                               token_type_ids=torch.zeros_like(embeds[..., 0]), use_cache=True).cache
        prefix_len = cache.get_seq_length()
        state = batch["state"].to(dtype)
        x = noise.float()
        dt = torch.tensor(-1.0 / steps, dtype=torch.float32)
        t = torch.tensor(1.0, dtype=torch.float32)
        while t >= -dt / 2:  # openpi's loop: the time is accumulated in float32
            out = super().forward(state=state, noise=x.to(dtype), timestep=t.expand(b).to(device),
                                  attention_mask=attention_mask, pixel_attention_mask=pam, cache=cache)
            cache.crop(prefix_len - cache.get_seq_length())  # drop this step: each attends to the prefix only
            x = x + dt.to(device) * out.logits.float()
            t = t + dt
        return x
