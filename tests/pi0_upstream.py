"""Test helpers: a tiny π0 checkpoint in openpi's PyTorch layout, and an independent oracle of openpi's forward.

`write_openpi_checkpoint(folder)` writes what openpi's `examples/convert_jax_model_to_pytorch.py` (and
openpi-SF's training) leaves: `model.safetensors` with `PI0Pytorch`'s key names (the PaliGemma embedding
saved under its tied name `paligemma.lm_head.weight`, the expert's unused `gemma_expert.lm_head.weight`),
`config.json` `{action_dim, action_horizon, paligemma_variant, action_expert_variant, precision}`,
`assets/<asset_id>/norm_stats.json`, plus PaliGemma-style `tokenizer.model` (a tiny SentencePiece with
PaliGemma's special ids 0 pad / 1 eos / 2 bos / 3 unk). Sizes: openpi's "dummy" Gemma (width 64, 4 blocks,
8 query heads, 1 KV head of 16), a narrower expert (width 32), a 2-block SigLIP of width 144 at 56 px.

`oracle_loss` / `oracle_sample` are a literal plain-torch reading of openpi's `PI0Pytorch` (embed_prefix,
embed_suffix, make_att_2d_masks, the per-layer joint attention of `PaliGemmaWithExpertModel`, Euler
sampling) on the ORIGINAL key names, with openpi's three camera slots (LIBERO: the right wrist empty and
masked). Sampling runs the joint forward at every step (prefix tokens never attend to the suffix, so this
is the cached computation). It imports nothing from `spatial_forcing`.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

PG = "paligemma_with_expert.paligemma.model."
EXPERT = "paligemma_with_expert.gemma_expert."
DIMS = dict(width=64, depth=4, mlp=128, heads=8, kv=1, hd=16, expert_width=32, expert_mlp=64, vocab=300,
            v_width=144, v_depth=2, v_heads=2, v_mlp=96, patch=14, image=56, horizon=10, max_dim=32)
ASSET = "libero_tiny"
STATE_MEAN = [0.1 * i for i in range(8)]
STATE_STD = [0.5 + 0.1 * i for i in range(8)]
ACTION_MEAN = [0.05 * i - 0.1 for i in range(7)]
ACTION_STD = [0.2 + 0.05 * i for i in range(7)]
SENTENCES = ["pick up the black bowl and place it on the plate", "put the bowl on the plate",
             "pick up the alphabet soup and place it in the basket", "open the middle drawer of the cabinet"]


def _rand(g, *shape, std=0.2):
    return torch.randn(*shape, generator=g) * std


def make_state_dict(d: dict = DIMS, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    v = PG + "vision_tower.vision_model."
    sd[v + "embeddings.patch_embedding.weight"] = _rand(g, d["v_width"], 3, d["patch"], d["patch"], std=0.05)
    sd[v + "embeddings.patch_embedding.bias"] = _rand(g, d["v_width"])
    n = (d["image"] // d["patch"]) ** 2
    sd[v + "embeddings.position_embedding.weight"] = _rand(g, n, d["v_width"])
    for i in range(d["v_depth"]):
        p = f"{v}encoder.layers.{i}."
        for ln in ("layer_norm1", "layer_norm2"):
            sd[p + ln + ".weight"] = 1 + _rand(g, d["v_width"], std=0.1)
            sd[p + ln + ".bias"] = _rand(g, d["v_width"], std=0.1)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[p + f"self_attn.{proj}.weight"] = _rand(g, d["v_width"], d["v_width"], std=0.08)
            sd[p + f"self_attn.{proj}.bias"] = _rand(g, d["v_width"], std=0.05)
        sd[p + "mlp.fc1.weight"] = _rand(g, d["v_mlp"], d["v_width"], std=0.08)
        sd[p + "mlp.fc1.bias"] = _rand(g, d["v_mlp"], std=0.05)
        sd[p + "mlp.fc2.weight"] = _rand(g, d["v_width"], d["v_mlp"], std=0.08)
        sd[p + "mlp.fc2.bias"] = _rand(g, d["v_width"], std=0.05)
    sd[v + "post_layernorm.weight"] = 1 + _rand(g, d["v_width"], std=0.1)
    sd[v + "post_layernorm.bias"] = _rand(g, d["v_width"], std=0.1)
    sd[PG + "multi_modal_projector.linear.weight"] = _rand(g, d["width"], d["v_width"], std=0.08)
    sd[PG + "multi_modal_projector.linear.bias"] = _rand(g, d["width"], std=0.05)
    # the embedding arrives under its tied name (safetensors' save_model keeps the first name in sort order)
    sd["paligemma_with_expert.paligemma.lm_head.weight"] = _rand(g, d["vocab"], d["width"], std=0.1)

    def gemma(prefix, width, mlp):
        for i in range(d["depth"]):
            p = f"{prefix}layers.{i}."
            sd[p + "input_layernorm.weight"] = _rand(g, width, std=0.1)
            sd[p + "post_attention_layernorm.weight"] = _rand(g, width, std=0.1)
            sd[p + "self_attn.q_proj.weight"] = _rand(g, d["heads"] * d["hd"], width, std=0.1)
            sd[p + "self_attn.k_proj.weight"] = _rand(g, d["kv"] * d["hd"], width, std=0.1)
            sd[p + "self_attn.v_proj.weight"] = _rand(g, d["kv"] * d["hd"], width, std=0.1)
            sd[p + "self_attn.o_proj.weight"] = _rand(g, width, d["heads"] * d["hd"], std=0.1)
            sd[p + "mlp.gate_proj.weight"] = _rand(g, mlp, width, std=0.1)
            sd[p + "mlp.up_proj.weight"] = _rand(g, mlp, width, std=0.1)
            sd[p + "mlp.down_proj.weight"] = _rand(g, width, mlp, std=0.1)
        sd[prefix + "norm.weight"] = _rand(g, width, std=0.1)

    gemma(PG + "language_model.", d["width"], d["mlp"])
    gemma(EXPERT + "model.", d["expert_width"], d["expert_mlp"])
    sd[EXPERT + "lm_head.weight"] = _rand(g, d["vocab"], d["expert_width"])
    ew, m = d["expert_width"], d["max_dim"]
    for name, (o, i) in {"state_proj": (ew, m), "action_in_proj": (ew, m), "action_out_proj": (m, ew),
                         "action_time_mlp_in": (ew, 2 * ew), "action_time_mlp_out": (ew, ew)}.items():
        sd[name + ".weight"] = _rand(g, o, i, std=0.15)
        sd[name + ".bias"] = _rand(g, o, std=0.05)
    return sd


def train_tokenizer() -> bytes:
    """A tiny SentencePiece (BPE, byte fallback) with PaliGemma's special ids: 0 pad, 1 eos, 2 bos, 3 unk."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 4), model_writer=buf, model_type="bpe", vocab_size=290,
        hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0, pad_id=0, eos_id=1, bos_id=2,
        unk_id=3, num_threads=1, minloglevel=2)
    return buf.getvalue()


def write_openpi_checkpoint(folder: Path, seed: int = 0, layout: str = "openpi") -> dict[str, torch.Tensor]:
    """Write the folder; `layout="lerobot"` prefixes every key with `model.` and writes lerobot's config."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = make_state_dict(seed=seed)
    if layout == "lerobot":
        save_file({"model." + k: v for k, v in sd.items()}, str(folder / "model.safetensors"))
        cfg = {"type": "pi0", "chunk_size": DIMS["horizon"], "max_state_dim": 32, "max_action_dim": 32,
               "paligemma_variant": "dummy", "action_expert_variant": "dummy"}
    else:
        save_file(sd, str(folder / "model.safetensors"))
        cfg = {"action_dim": 32, "action_horizon": DIMS["horizon"], "paligemma_variant": "dummy",
               "action_expert_variant": "dummy", "precision": "float32"}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    stats = {"norm_stats": {"state": {"mean": STATE_MEAN, "std": STATE_STD, "q01": None, "q99": None},
                            "actions": {"mean": ACTION_MEAN, "std": ACTION_STD, "q01": None, "q99": None}}}
    (folder / "assets" / ASSET).mkdir(parents=True, exist_ok=True)
    (folder / "assets" / ASSET / "norm_stats.json").write_text(json.dumps(stats))
    (folder / "tokenizer.model").write_bytes(train_tokenizer())
    return sd


# ================================================================================== openpi's inputs
def openpi_prompt(model_proto: bytes, prompt: str, max_len: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """openpi `PaligemmaTokenizer.tokenize` (π0 format), padded to `max_len`."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    cleaned = prompt.strip().replace("_", " ").replace("\n", " ")
    tokens = (sp.encode(cleaned, add_bos=True) + sp.encode("\n"))[:max_len]
    mask = [True] * len(tokens) + [False] * (max_len - len(tokens))
    return torch.tensor(tokens + [0] * (max_len - len(tokens))), torch.tensor(mask)


def openpi_image(image: np.ndarray, size: int) -> torch.Tensor:
    """openpi-client `resize_with_pad` (PIL bilinear, black) then `x / 255 * 2 - 1`, CHW float32."""
    from PIL import Image

    h, w = image.shape[:2]
    if (h, w) != (size, size):
        ratio = max(w / size, h / size)
        rh, rw = int(h / ratio), int(w / ratio)
        small = Image.fromarray(image).resize((rw, rh), resample=Image.BILINEAR)
        canvas = Image.new(small.mode, (size, size), 0)
        canvas.paste(small, (int((size - rw) / 2), int((size - rh) / 2)))
        image = np.asarray(canvas)
    return torch.from_numpy(image.astype(np.float32) / 255.0 * 2.0 - 1.0).permute(2, 0, 1)


# ============================================================================================ oracle
def _ln(x, sd, p, eps=1e-6):
    return F.layer_norm(x, (x.shape[-1],), sd[p + ".weight"], sd[p + ".bias"], eps)


def _lin(x, sd, p):
    return F.linear(x, sd[p + ".weight"], sd.get(p + ".bias"))


def siglip(images, sd, d=DIMS):
    """SigLIP on [N, 3, S, S] in [-1, 1] -> PaliGemma image embeddings [N, P, width] (not scaled)."""
    v = PG + "vision_tower.vision_model."
    x = F.conv2d(images, sd[v + "embeddings.patch_embedding.weight"], sd[v + "embeddings.patch_embedding.bias"],
                 stride=d["patch"])
    x = x.flatten(2).transpose(1, 2) + sd[v + "embeddings.position_embedding.weight"]
    n, t, c = x.shape
    hd = c // d["v_heads"]
    for i in range(d["v_depth"]):
        p = f"{v}encoder.layers.{i}."
        h = _ln(x, sd, p + "layer_norm1")
        q, k, vv = (_lin(h, sd, p + f"self_attn.{s}").view(n, t, d["v_heads"], hd).transpose(1, 2)
                    for s in ("q_proj", "k_proj", "v_proj"))
        a = torch.softmax(q @ k.transpose(-1, -2) * hd ** -0.5, dim=-1) @ vv
        x = x + _lin(a.transpose(1, 2).reshape(n, t, c), sd, p + "self_attn.out_proj")
        h = _ln(x, sd, p + "layer_norm2")
        x = x + _lin(F.gelu(_lin(h, sd, p + "mlp.fc1"), approximate="tanh"), sd, p + "mlp.fc2")
    x = _ln(x, sd, v + "post_layernorm")
    return _lin(x, sd, PG + "multi_modal_projector.linear")


def _rms(x, w, eps=1e-6):
    var = torch.mean(torch.square(x.float()), dim=-1, keepdim=True)
    return x * torch.rsqrt(var + eps) * (1.0 + w.float())


def _rope(x, pos, hd, theta=10000.0):
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    f = pos[..., None].float() * inv
    emb = torch.cat([f, f], dim=-1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def make_att_2d_masks(pad_masks, att_masks):
    cumsum = torch.cumsum(att_masks, dim=1)
    return (cumsum[:, None, :] <= cumsum[:, :, None]) & (pad_masks[:, None, :] * pad_masks[:, :, None])


def joint_gemma(prefix, suffix, mask_2d, positions, sd, d=DIMS):
    """`PaliGemmaWithExpertModel.forward` (training branch): per layer, both streams' q/k/v concatenated,
    RoPE, eager attention with the additive mask, per-stream o_proj, MLP; final norms."""
    streams = [(prefix, PG + "language_model."), (suffix, EXPERT + "model.")]
    add = torch.where(mask_2d[:, None], 0.0, -2.3819763e38)
    hd = d["hd"]
    for i in range(d["depth"]):
        qs, ks, vs, normed = [], [], [], []
        for x, p in streams:
            h = _rms(x, sd[f"{p}layers.{i}.input_layernorm.weight"])
            b, t, _ = h.shape
            qs.append(F.linear(h, sd[f"{p}layers.{i}.self_attn.q_proj.weight"]).view(b, t, -1, hd).transpose(1, 2))
            ks.append(F.linear(h, sd[f"{p}layers.{i}.self_attn.k_proj.weight"]).view(b, t, -1, hd).transpose(1, 2))
            vs.append(F.linear(h, sd[f"{p}layers.{i}.self_attn.v_proj.weight"]).view(b, t, -1, hd).transpose(1, 2))
        q, k, v = (torch.cat(z, dim=2) for z in (qs, ks, vs))
        q, k = _rope(q, positions, hd), _rope(k, positions, hd)
        rep = d["heads"] // d["kv"]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        w = torch.softmax((q @ k.transpose(-1, -2)) * hd ** -0.5 + add, dim=-1, dtype=torch.float32)
        att = (w @ v).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)
        out, start = [], 0
        for x, p in streams:
            end = start + x.shape[1]
            y = x + F.linear(att[:, start:end], sd[f"{p}layers.{i}.self_attn.o_proj.weight"])
            h = _rms(y, sd[f"{p}layers.{i}.post_attention_layernorm.weight"])
            mlp = F.linear(F.gelu(F.linear(h, sd[f"{p}layers.{i}.mlp.gate_proj.weight"]), approximate="tanh")
                           * F.linear(h, sd[f"{p}layers.{i}.mlp.up_proj.weight"]), sd[f"{p}layers.{i}.mlp.down_proj.weight"])
            out.append(y + mlp)
            start = end
        streams = [(o, p) for o, (_, p) in zip(out, streams)]
    return [_rms(x, sd[p + "norm.weight"]) for x, p in streams]


def _time_embedding(t, width):
    fraction = torch.linspace(0.0, 1.0, width // 2, dtype=torch.float64)
    period = 4e-3 * (4.0 / 4e-3) ** fraction
    s = (1.0 / period * 2 * math.pi)[None, :] * t[:, None].double()
    return torch.cat([torch.sin(s), torch.cos(s)], dim=1).float()


def _prefix(images, img_masks, tokens, token_masks, sd):
    """embed_prefix: per camera slot 256 (here P) image tokens + the prompt scaled by sqrt(width)."""
    embs, pads = [], []
    for img, m in zip(images, img_masks):
        e = siglip(img, sd)
        embs.append(e)
        pads.append(m[:, None].expand(e.shape[0], e.shape[1]))
    lang = F.embedding(tokens, sd["paligemma_with_expert.paligemma.lm_head.weight"]) * math.sqrt(DIMS["width"])
    embs.append(lang)
    pads.append(token_masks)
    pad = torch.cat(pads, dim=1)
    return torch.cat(embs, dim=1), pad, torch.zeros_like(pad, dtype=torch.long)


def _suffix(state, x_t, t, sd):
    s = _lin(state, sd, "state_proj")[:, None]
    a = _lin(x_t, sd, "action_in_proj")
    te = _time_embedding(t, a.shape[-1])[:, None].expand_as(a)
    at = _lin(F.silu(_lin(torch.cat([a, te], dim=2), sd, "action_time_mlp_in")), sd, "action_time_mlp_out")
    b, h = at.shape[:2]
    att = torch.tensor([1, 1] + [0] * (h - 1))[None].expand(b, -1)
    return torch.cat([s, at], dim=1), torch.ones(b, h + 1, dtype=torch.bool), att


def velocity(images, img_masks, tokens, token_masks, state, x_t, t, sd):
    pe, ppad, patt = _prefix(images, img_masks, tokens, token_masks, sd)
    se, spad, satt = _suffix(state, x_t, t, sd)
    pad, att = torch.cat([ppad, spad], dim=1), torch.cat([patt, satt], dim=1)
    positions = torch.cumsum(pad, dim=1) - 1
    _, out = joint_gemma(pe, se, make_att_2d_masks(pad, att), positions, sd)
    return _lin(out[:, -x_t.shape[1]:].float(), sd, "action_out_proj")


def oracle_loss(images, img_masks, tokens, token_masks, state, actions, noise, time, sd):
    """openpi `PI0Pytorch.forward` (action loss): MSE(noise - actions, v(x_t, t))."""
    t = time[:, None, None]
    x_t = t * noise + (1 - t) * actions
    return F.mse_loss(noise - actions, velocity(images, img_masks, tokens, token_masks, state, x_t, time, sd))


def oracle_sample(images, img_masks, tokens, token_masks, state, noise, sd, num_steps=10):
    """openpi `PI0Pytorch.sample_actions`: Euler from t = 1, dt = -1/num_steps, time accumulated in float32."""
    dt = torch.tensor(-1.0 / num_steps, dtype=torch.float32)
    x, time = noise, torch.tensor(1.0, dtype=torch.float32)
    while time >= -dt / 2:
        x = x + dt * velocity(images, img_masks, tokens, token_masks, state, x, time.expand(len(x)), sd)
        time = time + dt
    return x
