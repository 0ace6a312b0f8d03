"""Checkpoints of OpenVLA-OFT: the upstream layouts (OPENVLA_OFT.md §7, §8) and this project's
own format, with strict key accounting; LoRA through peft (`lora.py`: upstream's targets, the fused
vision qkv, `lora_adapter/` files).

Upstream folder (OpenVLA base, OFT or Spatial-Forcing fine-tune):
    config.json (model_type "openvla"), model.safetensors.index.json + shards (or model.safetensors),
    action_head--<step>_checkpoint.pt, proprio_projector--<step>_checkpoint.pt (keys `module.*`),
    dataset_statistics.json, preprocessor_config.json, tokenizer files, optional lora_adapter/.
Own folder:
    config.json (model_type "oft"), model.safetensors, dataset_statistics.json, processor files.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from .config import PLATFORMS, OFTConfig
from .lora import lora_targets, tie_fused_qkv
from .model import OFTModel

DINO = "vision_backbone.featurizer."
SIGLIP = "vision_backbone.fused_featurizer."
LLM = "language_model.model."
# Head widths of the published backbones: heads = width / head width (no qk-norm to read them from).
DINO_HEAD_DIM, SIGLIP_HEAD_DIM = 64, 72


@dataclass
class ConversionReport:
    """Every source key is either mapped (to one or more target keys) or dropped on purpose."""

    mapped: dict[str, list[str]] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)  # target keys with no source (zero, unused)

    def to_dict(self) -> dict:
        return {"mapped": self.mapped, "dropped": self.dropped, "created": self.created}

    def summary(self) -> str:
        return (f"mapped {len(self.mapped)} source tensors to {sum(len(v) for v in self.mapped.values())} "
                f"target tensors; dropped {len(self.dropped)} unused ({_groups(self.dropped)}); "
                f"created {len(self.created)} ({', '.join(self.created) or 'none'})")


def _groups(keys: list[str]) -> str:
    counts: dict[str, int] = {}
    for k in keys:
        g = re.sub(r"\.\d+\..*$", ".N", k) if ".blocks." in k else k.rsplit(".", 1)[0]
        g = re.sub(r"(attn_pool)\..*$", r"\1", g)
        counts[g] = counts.get(g, 0) + 1
    return ", ".join(f"{g} ({n})" for g, n in sorted(counts.items()))


# -------------------------------------------------------------------------------- files
def read_sharded_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors` or of the shards listed in `model.safetensors.index.json`."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: expected a 'weight_map' of tensor name -> shard file")
        sd: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            path = folder / shard
            if not path.is_file():
                raise FileNotFoundError(f"{path}: shard listed in {index.name} is missing")
            sd.update(load_file(str(path)))
        missing = sorted(set(weight_map) - set(sd))
        if missing:
            raise ValueError(f"{index}: tensors listed but not found in the shards: {missing[:8]}")
        return sd
    single = folder / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    raise FileNotFoundError(f"{folder}: no model weights; expected model.safetensors.index.json with its shards, "
                            "or model.safetensors")


def find_head_file(folder: Path, name: str) -> Path:
    """`<name>--<step>_checkpoint.pt` (or `--latest_checkpoint.pt`); the highest step if several."""
    files = sorted(folder.glob(f"{name}--*checkpoint.pt"))
    if not files:
        raise FileNotFoundError(f"{folder}: missing {name}--<step>_checkpoint.pt (the {name.replace('_', ' ')} "
                                "weights of an OFT fine-tune)")

    def step(p: Path) -> float:
        m = re.search(r"--(\d+)_checkpoint\.pt$", p.name)
        return float(m.group(1)) if m else float("inf")  # latest_checkpoint.pt wins

    return max(files, key=step)


def read_head(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a torch state dict file ({type(exc).__name__}: {str(exc)[:200]})") from exc
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a state dict of name -> tensor")
    return {k.removeprefix("module."): v for k, v in sd.items()}


# -------------------------------------------------------------------------------- config
def _count_blocks(sd: dict, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"blocks\.(\d+)\.")
    ids = {int(m.group(1)) for k in sd if (m := pat.match(k))}
    return max(ids) + 1 if ids else 0


def upstream_config(folder: Path, sd: dict, action_head: dict | None, proprio: dict | None,
                    platform: str = "libero", **overrides) -> OFTConfig:
    """OFTConfig of an upstream checkpoint: LLM dims from `text_config` (Llama-2-7B defaults where
    absent), vision dims from tensor shapes, chunk/action/proprio dims from the platform, checked
    against the head files."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder}: missing config.json")
    raw = json.loads(cfg_path.read_text())
    if raw.get("model_type") != "openvla":
        raise ValueError(f"{cfg_path}: model_type is {raw.get('model_type')!r}, expected 'openvla' for an upstream "
                         "OpenVLA/OFT checkpoint")
    if not raw.get("use_fused_vision_backbone", True):
        raise ValueError(f"{cfg_path}: only the fused DINOv2+SigLIP backbone is supported")
    if platform not in PLATFORMS:
        raise ValueError(f"unknown platform {platform!r}; choose one of {sorted(PLATFORMS)}")
    text = raw.get("text_config", {})
    llm = dict(vocab_size=text.get("vocab_size", 32064), hidden_size=text.get("hidden_size", 4096),
               intermediate_size=text.get("intermediate_size", 11008),
               num_layers=text.get("num_hidden_layers", 32), num_heads=text.get("num_attention_heads", 32),
               rms_norm_eps=text.get("rms_norm_eps", 1e-6), pad_token_id=raw.get("pad_token_id", 32000))
    llm["num_kv_heads"] = text.get("num_key_value_heads", llm["num_heads"])
    try:
        dino_hidden = sd[DINO + "cls_token"].shape[-1]
        siglip_hidden = sd[SIGLIP + "pos_embed"].shape[-1]
        vision = dict(
            image_size=int((raw.get("image_sizes") or [224])[0]),
            patch_size=sd[DINO + "patch_embed.proj.weight"].shape[-1],
            dino_hidden=dino_hidden, dino_depth=_count_blocks(sd, DINO), dino_heads=max(1, dino_hidden // DINO_HEAD_DIM),
            dino_registers=sd[DINO + "reg_token"].shape[1],
            dino_mlp_ratio=sd[DINO + "blocks.0.mlp.fc1.weight"].shape[0] // dino_hidden,
            siglip_hidden=siglip_hidden, siglip_depth=_count_blocks(sd, SIGLIP),
            siglip_heads=max(1, siglip_hidden // SIGLIP_HEAD_DIM),
            siglip_intermediate=sd[SIGLIP + "blocks.0.mlp.fc1.weight"].shape[0])
    except KeyError as exc:
        raise ValueError(f"{folder}: not an OpenVLA fused-backbone checkpoint, missing tensor {exc}") from exc
    # A fine-tune has head files; the base OpenVLA has none (its heads are created new for fine-tuning).
    d = {**PLATFORMS[platform], **llm, **vision, "use_proprio": proprio is not None or action_head is None}
    d.update(overrides)
    cfg = OFTConfig(**d)
    if action_head is None:
        return cfg
    head_out = action_head["model.fc2.weight"].shape[0]
    head_in = action_head["model.layer_norm1.weight"].shape[0]
    if head_out != cfg.action_dim or head_in != cfg.action_dim * cfg.hidden_size:
        raise ValueError(f"{folder}: the action head predicts {head_out} action dims from {head_in} inputs, but the "
                         f"config says action_dim={cfg.action_dim} (platform {platform!r}, hidden {cfg.hidden_size}); "
                         "pick the matching --platform or override action_dim")
    if proprio is not None and proprio["fc1.weight"].shape[1] != cfg.proprio_dim:
        raise ValueError(f"{folder}: the proprio projector takes {proprio['fc1.weight'].shape[1]} values, but the "
                         f"config says proprio_dim={cfg.proprio_dim}")
    return cfg


# -------------------------------------------------------------------------------- mapping
def _split_qkv(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = t.shape[0] // 3
    return t[:d], t[d:2 * d], t[2 * d:]


def convert_upstream_state_dict(sd: dict[str, torch.Tensor], cfg: OFTConfig,
                                action_head: dict | None = None, proprio: dict | None = None
                                ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Map upstream (timm-style vision, `language_model.model.*`) keys onto `OFTModel` names."""
    out: dict[str, torch.Tensor] = {}
    rep = ConversionReport()

    def put(src: str, dst: str, value: torch.Tensor) -> None:
        out[dst] = value
        rep.mapped.setdefault(src, []).append(dst)

    last_dino, last_siglip = cfg.dino_depth - 1, cfg.siglip_depth - 1
    vit_dst = {"norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for key, value in sd.items():
        if key.startswith(DINO):
            rest = key[len(DINO):]
            m = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias|scale_factor)$", rest)
            if rest == "cls_token":
                put(key, "vision_backbone.featurizer.embeddings.cls_token", value)
            elif rest == "reg_token":
                put(key, "vision_backbone.featurizer.embeddings.register_tokens", value)
            elif rest == "pos_embed":  # timm adds no position to CLS: a zero row makes HF's layout identical
                put(key, "vision_backbone.featurizer.embeddings.position_embeddings",
                    torch.cat([torch.zeros_like(value[:, :1]), value], dim=1))
            elif rest.startswith("patch_embed.proj."):
                put(key, "vision_backbone.featurizer.embeddings.patch_embeddings.projection." + rest.split(".")[-1], value)
            elif m and int(m.group(1)) < last_dino:
                i, name, kind = int(m.group(1)), m.group(2), m.group(3)
                base = f"vision_backbone.featurizer.encoder.layer.{i}."
                if name == "attn.qkv":
                    for part, t in zip("qkv", _split_qkv(value)):
                        put(key, f"{base}attention.{part}_proj.{kind}", t)
                elif name == "attn.proj":
                    put(key, f"{base}attention.o_proj.{kind}", value)
                elif name in ("ls1", "ls2"):
                    put(key, f"{base}layer_scale{name[-1]}.lambda1", value)
                elif name in vit_dst:
                    put(key, f"{base}{vit_dst[name]}.{kind}", value)
                else:
                    raise ValueError(f"unexpected DINOv2 key {key}")
            elif (m and int(m.group(1)) == last_dino) or rest.startswith("norm."):
                rep.dropped.append(key)
            else:
                raise ValueError(f"unexpected DINOv2 key {key}")
        elif key.startswith(SIGLIP):
            rest = key[len(SIGLIP):]
            m = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias)$", rest)
            if rest == "pos_embed":
                put(key, "vision_backbone.fused_featurizer.embeddings.position_embedding.weight", value[0])
            elif rest.startswith("patch_embed.proj."):
                put(key, "vision_backbone.fused_featurizer.embeddings.patch_embedding." + rest.split(".")[-1], value)
            elif m and int(m.group(1)) < last_siglip:
                i, name, kind = int(m.group(1)), m.group(2), m.group(3)
                base = f"vision_backbone.fused_featurizer.encoder.layers.{i}."
                if name == "attn.qkv":
                    for part, t in zip("qkv", _split_qkv(value)):
                        put(key, f"{base}self_attn.{part}_proj.{kind}", t)
                elif name == "attn.proj":
                    put(key, f"{base}self_attn.out_proj.{kind}", value)
                elif name in ("norm1", "norm2"):
                    put(key, f"{base}layer_norm{name[-1]}.{kind}", value)
                elif name in ("mlp.fc1", "mlp.fc2"):
                    put(key, f"{base}{name}.{kind}", value)
                else:
                    raise ValueError(f"unexpected SigLIP key {key}")
            elif (m and int(m.group(1)) == last_siglip) or rest.startswith(("norm.", "attn_pool.")):
                rep.dropped.append(key)
            else:
                raise ValueError(f"unexpected SigLIP key {key}")
        elif key.startswith("projector."):
            put(key, key, value)
        elif key.startswith(LLM):
            put(key, "language_model." + key[len(LLM):], value)
        elif key == "language_model.lm_head.weight":
            rep.dropped.append(key)  # discrete-token decoding is not used by OFT
        else:
            raise ValueError(f"unexpected key {key} in the upstream checkpoint")
    for prefix, head in (("action_head.", action_head), ("proprio_projector.", proprio)):
        for key, value in (head or {}).items():
            put(f"{prefix[:-1]}--{key}", prefix + key, value)
    mask = "vision_backbone.featurizer.embeddings.mask_token"
    out[mask] = torch.zeros(1, cfg.dino_hidden)
    rep.created.append(mask)
    if action_head is None:  # the base model: every head is new, to be fine-tuned
        for name, module in OFTModel.new_heads(cfg).items():
            out.update({f"{name}.{key}": value for key, value in module.state_dict().items()})
            rep.created.append(f"{name}.* (new, randomly initialised)")
    return out, rep


# -------------------------------------------------------------------------------- building
def build_model(cfg: OFTConfig, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                source: str = "checkpoint") -> OFTModel:
    """Create the model on the meta device and load `state` strictly (no 2x memory for 7B).
    `state` is consumed: its tensors move into the model one by one."""
    with torch.device("meta"):
        model = OFTModel(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = [f"{what}: {items[:8]}{' ...' if len(items) > 8 else ''} ({len(items)} in all)"
                for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("shape mismatches", wrong)) if items]
    if problems:
        raise ValueError(f"{source} does not match OFTModel({cfg.hidden_size}-wide, {cfg.num_layers} layers): "
                         + "; ".join(problems))
    # Fresh, aligned copies (one tensor at a time): tensors read from a file can sit at unaligned
    # addresses, which sends BLAS down another SIMD path and changes results in the last bit.
    owned = {}
    for key in list(state):
        owned[key] = state.pop(key).to(dtype=dtype, copy=True)
    model.load_state_dict(owned, strict=True, assign=True)
    # Non-persistent buffers are not in any checkpoint: rebuild them off the meta device.
    model.language_model.rotary_emb = LlamaRotaryEmbedding(config=model.language_model.config)
    emb = model.vision_backbone.fused_featurizer.embeddings
    emb.position_ids = torch.arange(emb.num_positions).expand(1, -1)
    model.vision_backbone.featurizer.embeddings.mask_token.requires_grad_(False)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device after loading: {left[:8]}")
    return model.eval()


def load_upstream_model(folder: Path, platform: str = "libero", dtype: torch.dtype = torch.float32,
                        **overrides) -> tuple[OFTModel, ConversionReport]:
    """Fine-tuned folders load their heads; the base `openvla/openvla-7b` (no head files) gets new,
    randomly initialised heads, listed in the report as created. A `lora_adapter/` is not read: the
    merged weights already contain it."""
    sd = read_sharded_safetensors(folder)
    has_head = any(folder.glob("action_head--*checkpoint.pt"))
    has_proprio = any(folder.glob("proprio_projector--*checkpoint.pt"))
    if not has_head and (has_proprio or (folder / "lora_adapter").is_dir()):  # a fine-tune that lost its head
        find_head_file(folder, "action_head")  # raises, naming the missing file
    head = read_head(find_head_file(folder, "action_head")) if has_head else None
    proprio = read_head(find_head_file(folder, "proprio_projector")) if has_proprio else None
    cfg = upstream_config(folder, sd, head, proprio, platform, **overrides)
    if has_head and cfg.use_proprio and proprio is None:
        raise FileNotFoundError(f"{folder}: use_proprio is set but proprio_projector--<step>_checkpoint.pt is missing")
    state, report = convert_upstream_state_dict(sd, cfg, head, proprio if cfg.use_proprio else None)
    return build_model(cfg, state, dtype, source=str(folder)), report


def save_model(model: OFTModel, folder: Path) -> None:
    model.config.save(folder / "config.json")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt", "model_type": "oft"})


def load_model(folder: Path, dtype: torch.dtype = torch.float32) -> OFTModel:
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: missing {name}")
    cfg = OFTConfig.load(folder / "config.json")
    return build_model(cfg, load_file(str(folder / "model.safetensors")), dtype, source=str(folder / "model.safetensors"))


# -------------------------------------------------------------------------------- LoRA
def apply_lora(model: OFTModel, r: int = 32, alpha: int | None = None, dropout: float = 0.0,
               init: str = "gaussian"):
    """LoRA as the published recipe (`all-linear`, alpha = min(r, 16), gaussian init; `lora.py`): peft on
    every Linear of the vision backbone, projector and LLM and on the two patch-embedding convolutions,
    with q, k and v of each vision block sharing one A (upstream's fused `attn.qkv` adapter). The heads
    (and FiLM) stay fully trainable. Returns the peft model."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=r, lora_alpha=min(r, 16) if alpha is None else alpha, lora_dropout=dropout,
                      target_modules=lora_targets(model), init_lora_weights=init)
    peft_model = get_peft_model(model, lora)
    tie_fused_qkv(peft_model.get_base_model())
    for module in (model.action_head, model.proprio_projector, model.noisy_action_projector, model.vision_backbone.film):
        if module is not None:
            module.requires_grad_(True)
    return peft_model


def merge_lora(peft_model) -> OFTModel:
    """Fold the adapters into the base weights and return the plain `OFTModel` (for export)."""
    return peft_model.merge_and_unload()
