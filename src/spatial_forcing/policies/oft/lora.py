"""LoRA as the published OpenVLA-OFT(+SF) recipe trains it, and upstream's `lora_adapter/` both ways.

Upstream (`vla-scripts/finetune.py` of openvla-oft and openvla-SF, peft 0.11.1, timm 0.9.10):
`LoraConfig(r, lora_alpha=min(r, 16), lora_dropout=0, target_modules="all-linear",
init_lora_weights="gaussian")` over the Prismatic model. peft 0.11.1 resolves "all-linear" to the
*base names* of every `nn.Linear` (qkv, proj, fc1, fc2, fc3, q, kv, q_proj ... down_proj, lm_head)
and matches them as name suffixes, so the adapted modules are:

- every Linear of both timm towers: the fused `attn.qkv` (one A of r x d, one B of 3d x r), `attn.proj`,
  `mlp.fc1`, `mlp.fc2` of every block, the last one included (OFT never runs it);
- the two patch-embedding convolutions `patch_embed.proj`: a Conv2d whose name ends in `.proj`,
  which peft's Conv2d LoRA takes (A a conv with the patch kernel, B a 1x1 conv);
- SigLIP's `attn_pool.{q, kv, proj, mlp.fc1, mlp.fc2}` (never run by OFT);
- the projector `fc1-fc3`, every Llama linear, and `lm_head` (peft 0.11.1 subtracts the output
  layer's full name from a set of base names, so it stays; never run by OFT).

Our towers are the transformers classes with separate q, k and v projections. `apply_lora` (in
`weights.py`) puts peft LoRA on every Linear of the vision backbone, projector and LLM and on the two
patch-embedding convolutions, then `tie_fused_qkv` makes q, k and v of each vision block share one
A: `[q; k; v] = W_qkv x + s [B_q; B_k; B_v] A x` is upstream's fused adapter exactly (B split in three
row blocks), with its parameter count (r·d + 3d·r per block). With lora_dropout > 0 (not the recipe)
the three projections draw their own dropout masks, upstream one.

`save_lora_adapter` / `load_lora_adapter` read and write upstream's `lora_adapter/`
(`adapter_config.json` + `adapter_model.safetensors`, keys `base_model.model.<timm name>.lora_{A,B}.weight`,
as peft 0.11.1 `save_pretrained` writes them). Modules OFT never computes are dropped when loading
and written as zeros when saving (the same function), so peft loads our file into upstream's model
with every LoRA key present. peft also stores the frozen base `lm_head` when `lm_head` is a target
(`...lm_head.base_layer.weight`); it is read past on loading and not written (OFT has no lm_head;
peft then keeps the base model's own).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import OFTConfig

DINO = "vision_backbone.featurizer."
SIGLIP = "vision_backbone.fused_featurizer."
PREFIX = "base_model.model."  # peft's key prefix (PeftModel.base_model = LoraModel, .model = the VLA)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LM_HEAD_COPY = "language_model.lm_head.base_layer.weight"
ADAPTER = "default"  # peft's adapter name
# What peft 0.11.1's "all-linear" resolves to on the Prismatic model (saved in adapter_config.json).
UPSTREAM_TARGETS = sorted(["qkv", "proj", "fc1", "fc2", "fc3", "q", "kv", "q_proj", "k_proj", "v_proj", "o_proj",
                           "gate_proj", "up_proj", "down_proj", "lm_head"])


@dataclass(frozen=True)
class _Tower:
    up: str  # upstream (timm) prefix
    block: str  # our block path, "{}" = index
    attn: str  # our attention module inside a block
    out: str  # our attention output projection
    patch: str  # our patch-embedding conv


_TOWERS = {
    "dino": _Tower(DINO, "encoder.layer.{}.", "attention", "o_proj", "embeddings.patch_embeddings.projection"),
    "siglip": _Tower(SIGLIP, "encoder.layers.{}.", "self_attn", "out_proj", "embeddings.patch_embedding"),
}


# -------------------------------------------------------------------------------- targets
def lora_targets(model: nn.Module) -> list[str]:
    """The modules the recipe adapts that OFT computes with: every Linear of the vision backbone,
    projector and LLM (FiLM excluded: it is trained fully) and the two patch-embedding convolutions."""
    linears = {name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)
               and name.startswith(("vision_backbone.", "projector.", "language_model."))
               and ".film." not in name}
    convs = {t.up + t.patch for t in _TOWERS.values()}
    found = {name for name, mod in model.named_modules() if name in convs and isinstance(mod, nn.Conv2d)}
    if found != convs:
        raise ValueError(f"the vision backbone has no patch-embedding convolution {sorted(convs - found)}")
    return sorted(linears | convs)


def vision_attention(cfg: OFTConfig) -> list[tuple[str, int, str]]:
    """`(tower, block, our attention module path)` of every vision block OFT builds."""
    out = []
    for tower, depth in (("dino", cfg.dino_depth), ("siglip", cfg.siglip_depth)):
        t = _TOWERS[tower]
        out += [(tower, i, t.up + t.block.format(i) + t.attn) for i in range(depth - 1)]
    return out


def _lora_layer(model: nn.Module, name: str) -> nn.Module:
    from peft.tuners.lora import LoraLayer

    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the model has no module {name}") from None
    if not isinstance(module, LoraLayer) or ADAPTER not in module.lora_A:
        raise ValueError(f"{name} carries no LoRA adapter (apply_lora first)")
    return module


def tie_fused_qkv(model: nn.Module) -> int:
    """Make q, k and v of every vision block share one LoRA A (upstream's fused-qkv adapter); `model` is
    the OFTModel inside the peft model. The A kept is the first of the three in module order (the name
    `named_parameters` reports). Returns the number of blocks tied."""
    blocks = vision_attention(model.config)
    for _, _, attn in blocks:
        parent = model.get_submodule(attn)
        names = [n for n in parent._modules if n in ("q_proj", "k_proj", "v_proj")]
        layers = [_lora_layer(model, f"{attn}.{n}") for n in names]
        shared = layers[0].lora_A[ADAPTER]
        for layer in layers[1:]:
            layer.lora_A[ADAPTER] = shared
    return len(blocks)


# -------------------------------------------------------------------------------- upstream layout
@dataclass(frozen=True)
class AdapterEntry:
    """One module of upstream's adapter: its timm/Prismatic name, the LoRA shapes, and our module(s)
    holding it: one module, the (q, k, v) of a fused qkv, or none (a module OFT never computes)."""

    upstream: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    ours: tuple[str, ...] = ()


def adapter_layout(cfg: OFTConfig, r: int) -> list[AdapterEntry]:
    """Every module upstream's peft adapts, in the upstream module order."""
    if cfg.use_film:
        raise ValueError("lora_adapter/ files of FiLM models are not supported: upstream wraps the vision "
                         "backbone after LoRA, which renames its modules")
    out: list[AdapterEntry] = []

    def lin(up: str, d_in: int, d_out: int, ours: tuple[str, ...] = ()) -> None:
        out.append(AdapterEntry(up, (r, d_in), (d_out, r), ours))

    p = cfg.patch_size
    for tower, d, mlp, depth in (("dino", cfg.dino_hidden, cfg.dino_hidden * cfg.dino_mlp_ratio, cfg.dino_depth),
                                 ("siglip", cfg.siglip_hidden, cfg.siglip_intermediate, cfg.siglip_depth)):
        t = _TOWERS[tower]
        out.append(AdapterEntry(t.up + "patch_embed.proj", (r, 3, p, p), (d, r, 1, 1), (t.up + t.patch,)))
        for i in range(depth):
            up, used = f"{t.up}blocks.{i}.", i < depth - 1  # the last block is never run
            ours = t.up + t.block.format(i)
            att = ours + t.attn + "."
            lin(up + "attn.qkv", d, 3 * d, tuple(att + f"{x}_proj" for x in "qkv") if used else ())
            lin(up + "attn.proj", d, d, (att + t.out,) if used else ())
            lin(up + "mlp.fc1", d, mlp, (ours + "mlp.fc1",) if used else ())
            lin(up + "mlp.fc2", mlp, d, (ours + "mlp.fc2",) if used else ())
        if tower == "siglip":  # the attention-pool head (timm `global_pool="map"`), never run
            lin(t.up + "attn_pool.q", d, d)
            lin(t.up + "attn_pool.kv", d, 2 * d)
            lin(t.up + "attn_pool.proj", d, d)
            lin(t.up + "attn_pool.mlp.fc1", d, mlp)
            lin(t.up + "attn_pool.mlp.fc2", mlp, d)
    v, h = cfg.fused_vision_dim, cfg.hidden_size
    lin("projector.fc1", v, 4 * v, ("projector.fc1",))
    lin("projector.fc2", 4 * v, h, ("projector.fc2",))
    lin("projector.fc3", h, h, ("projector.fc3",))
    kv, inter = cfg.num_kv_heads * (h // cfg.num_heads), cfg.intermediate_size
    for i in range(cfg.num_layers):
        up, ours = f"language_model.model.layers.{i}.", f"language_model.layers.{i}."
        for name, d_in, d_out in (("self_attn.q_proj", h, h), ("self_attn.k_proj", h, kv), ("self_attn.v_proj", h, kv),
                                  ("self_attn.o_proj", h, h), ("mlp.gate_proj", h, inter), ("mlp.up_proj", h, inter),
                                  ("mlp.down_proj", inter, h)):
            lin(up + name, d_in, d_out, (ours + name,))
    lin("language_model.lm_head", h, cfg.vocab_size)  # never run: OFT reads hidden states
    return out


def adapter_parameter_count(cfg: OFTConfig, r: int, used_only: bool = False) -> int:
    """LoRA parameters of upstream's adapter (all of it, or only the modules OFT computes with)."""
    def numel(shape: tuple[int, ...]) -> int:
        n = 1
        for s in shape:
            n *= s
        return n

    return sum(numel(e.a_shape) + numel(e.b_shape) for e in adapter_layout(cfg, r) if e.ours or not used_only)


@dataclass
class AdapterReport:
    """What `load_lora_adapter` did: modules filled, and file keys read past (modules OFT never runs)."""

    loaded: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"loaded LoRA of {len(self.loaded)} modules; read past {len(self.dropped)} keys of modules OFT never runs"


def _unwrap(model: nn.Module) -> tuple[nn.Module, Any]:
    """(the OFTModel inside a peft model, its LoRA config)."""
    if not hasattr(model, "peft_config") or not hasattr(model, "get_base_model"):
        raise ValueError("expected the peft model that apply_lora returns")
    lcfg = model.peft_config[ADAPTER]
    problems = [f"{k}={getattr(lcfg, k)!r}" for k, ok in (
        ("use_rslora", not lcfg.use_rslora), ("use_dora", not getattr(lcfg, "use_dora", False)),
        ("bias", lcfg.bias == "none"), ("rank_pattern", not lcfg.rank_pattern),
        ("alpha_pattern", not lcfg.alpha_pattern)) if not ok]
    if problems:
        raise ValueError(f"the model's LoRA is not upstream's kind ({', '.join(problems)})")
    return model.get_base_model(), lcfg


# -------------------------------------------------------------------------------- files
def save_lora_adapter(peft_model: nn.Module, folder: str | Path, base_model_name_or_path: str = "openvla/openvla-7b",
                      dtype: torch.dtype | None = None) -> Path:
    """Write the model's LoRA as upstream's `lora_adapter/` (peft 0.11.1 layout over timm names), in
    `dtype` (default: the adapters' own; upstream's training wrote bf16). Returns the folder."""
    from safetensors.torch import save_file

    base, lcfg = _unwrap(peft_model)
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    layout = adapter_layout(base.config, lcfg.r)
    own = _lora_layer(base, next(e.ours[0] for e in layout if e.ours)).lora_A[ADAPTER].weight.dtype
    for e in layout:
        if e.ours:
            layers = [_lora_layer(base, n) for n in e.ours]
            a = layers[0].lora_A[ADAPTER].weight
            if any(layer.lora_A[ADAPTER].weight is not a for layer in layers[1:]):
                raise ValueError(f"{', '.join(e.ours)}: separate LoRA A matrices, not one fused-qkv adapter "
                                 "(apply_lora ties them)")
            b = torch.cat([layer.lora_B[ADAPTER].weight for layer in layers], dim=0)
        else:
            a, b = torch.zeros(e.a_shape, dtype=own), torch.zeros(e.b_shape, dtype=own)
        if tuple(a.shape) != e.a_shape or tuple(b.shape) != e.b_shape:
            raise ValueError(f"{e.upstream}: LoRA shapes A {tuple(a.shape)} B {tuple(b.shape)} differ from upstream's "
                             f"A {e.a_shape} B {e.b_shape}")
        for kind, t in (("A", a), ("B", b)):
            t = t.detach().to("cpu", dtype=dtype or t.dtype, copy=True).contiguous()
            tensors[f"{PREFIX}{e.upstream}.lora_{kind}.weight"] = t
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {
        "alpha_pattern": {}, "auto_mapping": {"base_model_class": "OpenVLAForActionPrediction",
                                              "parent_library": "transformers_modules.openvla-7b.modeling_prismatic"},
        "base_model_name_or_path": base_model_name_or_path, "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": lcfg.init_lora_weights, "layer_replication": None,
        "layers_pattern": None, "layers_to_transform": None, "loftq_config": {}, "lora_alpha": lcfg.lora_alpha,
        "lora_dropout": lcfg.lora_dropout, "megatron_config": None, "megatron_core": "megatron.core",
        "modules_to_save": None, "peft_type": "LORA", "r": lcfg.r, "rank_pattern": {}, "revision": None,
        "target_modules": UPSTREAM_TARGETS, "task_type": None, "use_dora": False, "use_rslora": False}
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


def read_adapter_config(folder: Path) -> dict:
    """`adapter_config.json` of an upstream `lora_adapter/`, checked to be a plain LoRA peft can fold."""
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (a peft lora_adapter/ folder holds {ADAPTER_CONFIG} and "
                                f"{ADAPTER_WEIGHTS})")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object of LoraConfig fields")
    r, alpha = raw.get("r"), raw.get("lora_alpha")
    checks = [(raw.get("peft_type", "LORA") == "LORA", "peft_type", "LORA"),
              (isinstance(r, int) and not isinstance(r, bool) and r > 0, "r", "a positive integer"),
              (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0, "lora_alpha", "a positive number"),
              (not raw.get("use_rslora", False), "use_rslora", "false"),
              (not raw.get("use_dora", False), "use_dora", "false"),
              (raw.get("bias", "none") == "none", "bias", "'none'"),
              (not raw.get("fan_in_fan_out", False), "fan_in_fan_out", "false"),
              (not raw.get("rank_pattern"), "rank_pattern", "empty"),
              (not raw.get("alpha_pattern"), "alpha_pattern", "empty")]
    for ok, key, expected in checks:
        if not ok:
            raise ValueError(f"{path}: {key} is {raw.get(key)!r}, expected {expected} (upstream's plain LoRA)")
    return raw


def load_lora_adapter(model: nn.Module, folder: str | Path) -> tuple[nn.Module, AdapterReport]:
    """Fill the model's LoRA from upstream's `lora_adapter/`. `model` is an OFTModel (LoRA is applied with
    the file's r, alpha and dropout) or the peft model `apply_lora` returned (r and alpha must agree).
    Returns (peft model, report). Every module OFT computes with must be in the file; keys of modules
    it never runs are read past; anything else is refused, naming the file and key."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    raw = read_adapter_config(folder)
    cfg_path, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not hasattr(model, "peft_config"):
        from .weights import apply_lora

        model = apply_lora(model, r=raw["r"], alpha=raw["lora_alpha"], dropout=float(raw.get("lora_dropout", 0.0)))
    base, lcfg = _unwrap(model)
    if (raw["r"], raw["lora_alpha"]) != (lcfg.r, lcfg.lora_alpha):
        raise ValueError(f"{cfg_path}: r={raw['r']}, lora_alpha={raw['lora_alpha']}, but the model's LoRA has "
                         f"r={lcfg.r}, lora_alpha={lcfg.lora_alpha}")
    if not weights.is_file():
        hint = " (adapter_model.bin is a pickle; re-save it with safetensors)" if (folder / "adapter_model.bin").is_file() else ""
        raise FileNotFoundError(f"{weights}: missing{hint}")
    try:
        sd = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{weights}: not a readable safetensors file ({exc})") from None
    layout = {e.upstream: e for e in adapter_layout(base.config, lcfg.r)}
    found: dict[tuple[str, str], torch.Tensor] = {}
    report, unexpected, wrong = AdapterReport(), [], []
    for key, value in sd.items():
        m = re.fullmatch(re.escape(PREFIX) + r"(.+)\.lora_([AB])\.weight", key)
        entry = layout.get(m.group(1)) if m else None
        if key == PREFIX + LM_HEAD_COPY:
            report.dropped.append(key)  # peft's copy of the frozen lm_head (lm_head was a target)
        elif entry is None:
            unexpected.append(key)
        elif tuple(value.shape) != (entry.a_shape if m.group(2) == "A" else entry.b_shape):
            wrong.append(f"{key}: file {tuple(value.shape)}, expected "
                         f"{entry.a_shape if m.group(2) == 'A' else entry.b_shape}")
        elif not entry.ours:
            report.dropped.append(key)
        else:
            found[(entry.upstream, m.group(2))] = value
    missing = [f"{PREFIX}{e.upstream}.lora_{k}.weight" for e in layout.values() if e.ours
               for k in "AB" if (e.upstream, k) not in found]
    problems = [f"{what}: {items[:4]}{' ...' if len(items) > 4 else ''} ({len(items)} in all)"
                for what, items in (("keys that are no LoRA factor of the OpenVLA-OFT modules", unexpected),
                                    ("missing keys", missing), ("shape mismatches", wrong)) if items]
    if problems:
        raise ValueError(f"{weights} (r={lcfg.r}) does not match this model's LoRA: " + "; ".join(problems))
    with torch.no_grad():
        for e in layout.values():
            if not e.ours:
                continue
            layers = [_lora_layer(base, n) for n in e.ours]
            a = layers[0].lora_A[ADAPTER].weight
            if any(layer.lora_A[ADAPTER].weight is not a for layer in layers[1:]):
                raise ValueError(f"{', '.join(e.ours)}: separate LoRA A matrices, not one fused-qkv adapter")
            a.copy_(found[(e.upstream, "A")])
            for layer, b in zip(layers, found[(e.upstream, "B")].chunk(len(layers), dim=0)):
                layer.lora_B[ADAPTER].weight.copy_(b)
            report.loaded.append(e.upstream)
    return model, report
