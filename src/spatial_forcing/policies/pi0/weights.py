"""π0 weights: this project's folders, openpi's PyTorch checkpoints, lerobot and transformers folders;
strict key accounting; building without initialising; LoRA.

Upstream layouts (`ConversionReport` accounts for every source tensor):
- openpi `model.safetensors` (`examples/convert_jax_model_to_pytorch.py`, openpi-SF training): keys of
  `PI0Pytorch` = `paligemma_with_expert.paligemma.model.{vision_tower.vision_model, multi_modal_projector,
  language_model}.*`, `paligemma_with_expert.gemma_expert.model.*`, `state_proj`, `action_in_proj`,
  `action_time_mlp_{in,out}`, `action_out_proj`. `safetensors.torch.save_model` keeps one name per tied
  tensor, so the PaliGemma embedding usually arrives as `paligemma.lm_head.weight`; the expert's
  `gemma_expert.lm_head.weight` is an unused vocabulary head (openpi drops the expert's embedding) and is
  dropped here. Its `config.json` names the Gemma variants and the padded sizes only.
- lerobot folders: the same keys under `model.`; normaliser buffers (`normalize_inputs.*`, ...) dropped
  (statistics come from `dataset_statistics.json`).
- older transformers layouts (`paligemma.language_model.model.*`, `paligemma.vision_tower.*`) and
  transformers' own `PI0ForConditionalGeneration` folders (`model.vlm.*`, `model.dit.*`, `embed_action_time.*`).
π0.5 checkpoints (`time_mlp_*`, adaptive norms) are refused: transformers' PI0 has no π0.5.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import GEMMA_VARIANTS, MODEL_TYPE, PLATFORMS, Pi0Config
from .model import Pi0Model

WEIGHTS_FILE = "model.safetensors"
_PG = "paligemma_with_expert.paligemma."
_EXPERT = "paligemma_with_expert.gemma_expert."
_HEADS = ("state_proj", "action_in_proj", "action_time_mlp_in", "action_time_mlp_out")
_DROP_PREFIXES = ("normalize_inputs.", "normalize_targets.", "unnormalize_outputs.")


@dataclass
class ConversionReport:
    """Every source key is mapped to a target key or dropped on purpose (with the reason)."""

    layout: str
    mapped: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"layout": self.layout, "mapped": self.mapped, "dropped": self.dropped}

    def summary(self) -> str:
        reasons: dict[str, int] = {}
        for why in self.dropped.values():
            reasons[why] = reasons.get(why, 0) + 1
        dropped = "; ".join(f"{n} {why}" for why, n in sorted(reasons.items())) or "none"
        return f"{self.layout}: mapped {len(self.mapped)} tensors; dropped {len(self.dropped)} ({dropped})"


# ------------------------------------------------------------------------------------ key mapping
def _strip_common_prefix(keys: list[str]) -> str:
    """lerobot's policy wraps the network as `model.` (the HF layout also starts with `model.`, but it
    holds `embed_action_time.*` at the top level)."""
    if keys and all(k.startswith("model.") for k in keys) and any(k.startswith("model.paligemma_with_expert.")
                                                                  for k in keys):
        return "model."
    return ""


def map_upstream_key(key: str) -> str | None:
    """One upstream (openpi / lerobot / older transformers) key -> this model's key, None if unknown."""
    if key.startswith(_PG):
        rest = key[len(_PG):]
        for old, new in (("model.vision_tower.vision_model.", "model.vlm.vision_tower."),
                         ("vision_tower.vision_model.", "model.vlm.vision_tower."),
                         ("model.vision_tower.", "model.vlm.vision_tower."),
                         ("vision_tower.", "model.vlm.vision_tower."),
                         ("model.multi_modal_projector.", "model.vlm.multi_modal_projector."),
                         ("multi_modal_projector.", "model.vlm.multi_modal_projector."),
                         ("model.language_model.", "model.vlm.language_model."),
                         ("language_model.model.", "model.vlm.language_model.")):
            if rest.startswith(old):
                return new + rest[len(old):]
        if rest in ("lm_head.weight", "language_model.lm_head.weight"):
            return "model.vlm.language_model.embed_tokens.weight"  # tied with the embedding
        return None
    if key.startswith(_EXPERT + "model."):
        return "model.dit." + key[len(_EXPERT + "model."):]
    head = key.split(".", 1)[0]
    if head in _HEADS:
        return "embed_action_time." + key
    if head == "action_out_proj":
        return key
    return None


def convert_state_dict(state: dict[str, torch.Tensor], expected: set[str]) -> tuple[dict[str, torch.Tensor],
                                                                                   ConversionReport]:
    """Upstream or HF-layout tensors -> this model's keys, strictly: every expected key filled once, every
    source key mapped or dropped for a stated reason; anything else is an error naming the keys."""
    keys = sorted(state)
    if any(k.startswith(("time_mlp_in", "time_mlp_out")) or ".norm.dense." in k or "input_layernorm.dense" in k
           for k in keys):
        raise ValueError("this is a π0.5 checkpoint (time_mlp_* / adaptive RMSNorm keys): only π0 is supported "
                         "(transformers' PI0 has no π0.5)")
    prefix = _strip_common_prefix(keys)
    hf_layout = not prefix and any(k.startswith(("model.vlm.", "embed_action_time.")) for k in keys)
    report = ConversionReport("transformers PI0" if hf_layout else ("lerobot" if prefix else "openpi"))
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key in keys:
        source = key[len(prefix):]
        if source.startswith(_DROP_PREFIXES):
            report.dropped[key] = "normaliser buffers (statistics come from dataset_statistics.json)"
            continue
        if source in (_EXPERT + "lm_head.weight", "model.dit.embed_tokens.weight"):
            report.dropped[key] = "the action expert's unused vocabulary table"
            continue
        target = source if hf_layout else map_upstream_key(source)
        if target is None or target not in expected:
            unknown.append(key)
            continue
        if target in out:  # a tied duplicate (embedding saved under both names): must be the same tensor
            if not torch.equal(out[target], state[key]):
                raise ValueError(f"{key} and the key already read for {target} differ; expected tied copies")
            report.dropped[key] = "tied copy of the PaliGemma embedding"
            continue
        out[target] = state[key]
        report.mapped[key] = target
    missing = sorted(expected - set(out))
    if unknown or missing:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors the model needs: {missing[:6]}")
        if unknown:
            parts.append(f"{len(unknown)} tensors of no known π0 layout: {unknown[:6]}")
        raise ValueError("not a π0 checkpoint this project can load: " + "; ".join(parts))
    return out, report


# ------------------------------------------------------------------------------ architecture
def _count(state: dict[str, torch.Tensor], pattern: str) -> int:
    idx = {int(m.group(1)) for k in state if (m := re.search(pattern, k))}
    return max(idx) + 1 if idx else 0


def infer_config(state: dict[str, torch.Tensor], raw_config: dict[str, Any], platform: str | None,
                 overrides: dict[str, Any]) -> Pi0Config:
    """The architecture of converted tensors (this model's keys): widths, depths and vocabulary from the
    shapes; attention heads from the Gemma variants the upstream `config.json` names (openpi:
    `paligemma_variant`, `action_expert_variant`; default gemma_2b / gemma_300m), checked against the
    shapes; SigLIP heads of width 72 (So400m); robot sizes from `platform` (PLATFORMS)."""
    emb = state["model.vlm.language_model.embed_tokens.weight"]
    patch = state["model.vlm.vision_tower.embeddings.patch_embedding.weight"]
    positions = state["model.vlm.vision_tower.embeddings.position_embedding.weight"].shape[0]
    grid = int(round(positions ** 0.5))
    vlm = GEMMA_VARIANTS.get(str(raw_config.get("paligemma_variant", "gemma_2b")))
    exp = GEMMA_VARIANTS.get(str(raw_config.get("action_expert_variant", "gemma_300m")))
    if vlm is None or exp is None:
        raise ValueError(f"unknown Gemma variants {raw_config.get('paligemma_variant')!r} / "
                         f"{raw_config.get('action_expert_variant')!r}; known: {sorted(GEMMA_VARIANTS)}")
    vision_width = patch.shape[0]
    arch = dict(
        image_size=grid * patch.shape[-1], patch_size=patch.shape[-1], vision_width=vision_width,
        vision_depth=_count(state, r"vision_tower\.encoder\.layers\.(\d+)\."),
        vision_heads=max(1, vision_width // 72),
        vision_mlp_dim=state["model.vlm.vision_tower.encoder.layers.0.mlp.fc1.weight"].shape[0],
        width=emb.shape[1], vocab_size=emb.shape[0],
        mlp_dim=state["model.vlm.language_model.layers.0.mlp.gate_proj.weight"].shape[0],
        depth=_count(state, r"language_model\.layers\.(\d+)\."),
        num_heads=vlm["num_heads"], num_kv_heads=vlm["num_kv_heads"], head_dim=vlm["head_dim"],
        expert_width=state["model.dit.norm.weight"].shape[0],
        expert_mlp_dim=state["model.dit.layers.0.mlp.gate_proj.weight"].shape[0],
        max_state_dim=state["embed_action_time.state_proj.weight"].shape[1],
        max_action_dim=state["embed_action_time.action_in_proj.weight"].shape[1],
        chunk_len=int(raw_config.get("action_horizon", raw_config.get("chunk_size", 50))),
    )
    q = state["model.vlm.language_model.layers.0.self_attn.q_proj.weight"].shape[0]
    k = state["model.vlm.language_model.layers.0.self_attn.k_proj.weight"].shape[0]
    if q != arch["num_heads"] * arch["head_dim"] or k != arch["num_kv_heads"] * arch["head_dim"] \
            or exp["head_dim"] != arch["head_dim"] or exp["num_heads"] != arch["num_heads"]:
        raise ValueError(f"the attention shapes (q {q}, kv {k}) do not match the Gemma variants "
                         f"{raw_config.get('paligemma_variant', 'gemma_2b')} / "
                         f"{raw_config.get('action_expert_variant', 'gemma_300m')} named by config.json")
    if _count(state, r"model\.dit\.layers\.(\d+)\.") != arch["depth"]:
        raise ValueError("the action expert and the PaliGemma Gemma have different depths; π0 shares attention "
                         "layer by layer, so they must match")
    if platform is not None and platform not in PLATFORMS:
        raise ValueError(f"platform {platform!r}: expected one of {sorted(PLATFORMS)}")
    robot = dict(PLATFORMS[platform or "libero"])
    return Pi0Config(**{**arch, **robot, **overrides})


# ------------------------------------------------------------------------------------ building
@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(config: Pi0Config, state: dict[str, torch.Tensor] | None = None, dtype: torch.dtype = torch.float32,
                device: str | torch.device | None = None, source: str = "state") -> Pi0Model:
    """A `Pi0Model`: randomly initialised (transformers' init) when `state` is None, else allocated without
    initialising and filled strictly from `state` (this model's keys)."""
    if state is None:
        model = Pi0Model(config)
        return model.to(device=device, dtype=dtype) if device is not None else model.to(dtype)
    from transformers.initialization import no_init_weights

    with no_init_weights(), torch.device(device or "cpu"):
        model = Pi0Model(config)
    load_strict(model, state, source)
    return model.to(dtype)


def load_strict(model: Pi0Model, state: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = [f"{what}: {items[:6]} ({len(items)} in all)" for what, items in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)) if items]
    if problems:
        raise ValueError(f"{source} does not match the π0 model (width {model.pi0_config.width}, depth "
                         f"{model.pi0_config.depth}): " + "; ".join(problems))
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(state[k])


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent}: missing {path.name} (the π0 weights)")
    try:
        return load_file(str(path))
    except Exception as exc:  # a truncated or foreign file: name it
        raise ValueError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None


def save_model(model: Pi0Model, folder: Path) -> None:
    model.pi0_config.save(folder / "config.json")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt", "model_type": MODEL_TYPE})


def load_model(folder: Path, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None) -> Pi0Model:
    config = Pi0Config.load(folder / "config.json")
    return build_model(config, read_weights(folder / WEIGHTS_FILE), dtype, device, source=str(folder / WEIGHTS_FILE))


def upstream_kind(raw: dict[str, Any]) -> str | None:
    """Which upstream layout a `config.json` describes: "openpi", "lerobot", "transformers" or None."""
    if raw.get("model_type") == "pi0" and "vlm_config" in raw:
        return "transformers"
    if raw.get("type") == "pi0":
        return "lerobot"
    if "paligemma_variant" in raw and "action_horizon" in raw and "model_type" not in raw:
        return "openpi"
    return None


def load_upstream_model(folder: Path, raw: dict[str, Any], platform: str | None, dtype: torch.dtype,
                        device: str | torch.device | None, overrides: dict[str, Any]
                        ) -> tuple[Pi0Model, ConversionReport]:
    """Convert an upstream folder: read the tensors, map the keys, infer the architecture, load strictly."""
    path = folder / WEIGHTS_FILE
    state = read_weights(path)
    raw = dict(raw)
    if upstream_kind(raw) in ("transformers", "lerobot"):
        raw.setdefault("action_horizon", raw.get("chunk_size", 50))
    (converted, config), report = convert_with_inference(state, raw, platform, overrides)
    return build_model(config, converted, dtype, device, source=str(path)), report


def convert_with_inference(state: dict[str, torch.Tensor], raw: dict[str, Any], platform: str | None,
                            overrides: dict[str, Any]):
    """Map the keys against the key set of a model whose depths match the file, then infer the sizes."""
    prefix = _strip_common_prefix(sorted(state))
    hf_layout = not prefix and any(k.startswith(("model.vlm.", "embed_action_time.")) for k in state)
    renamed = {}
    for k, v in state.items():
        s = k[len(prefix):]
        t = s if hf_layout else map_upstream_key(s)
        if t is not None and t not in renamed:
            renamed[t] = v
    needed = ("model.vlm.language_model.embed_tokens.weight", "model.vlm.vision_tower.embeddings.patch_embedding.weight",
              "model.vlm.vision_tower.embeddings.position_embedding.weight", "model.dit.norm.weight",
              "embed_action_time.state_proj.weight", "embed_action_time.action_in_proj.weight",
              "model.vlm.vision_tower.encoder.layers.0.mlp.fc1.weight",
              "model.vlm.language_model.layers.0.mlp.gate_proj.weight",
              "model.vlm.language_model.layers.0.self_attn.q_proj.weight",
              "model.vlm.language_model.layers.0.self_attn.k_proj.weight",
              "model.dit.layers.0.mlp.gate_proj.weight")
    absent = [k for k in needed if k not in renamed]
    if absent:
        raise ValueError(f"not a π0 checkpoint this project can load: missing {absent[:4]} (after mapping the "
                         f"openpi / lerobot / transformers key names)")
    config = infer_config(renamed, raw, platform, overrides)
    with torch.device("meta"):
        expected = set(Pi0Model(config).state_dict())
    converted, report = convert_state_dict(state, expected)
    return (converted, config), report


# ------------------------------------------------------------------------------------------ LoRA
def lora_targets(model: Pi0Model) -> list[str]:
    """Every Linear of the PaliGemma Gemma and of the action expert (openpi's `gemma_2b_lora` /
    `gemma_300m_lora` put LoRA on their attention and feed-forward projections)."""
    return sorted(name for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)
                  and name.startswith(("model.vlm.language_model.", "model.dit.")))


def apply_lora(model: Pi0Model, r: int = 16, alpha: int | None = None, dropout: float = 0.0,
               init: str | bool = True):
    """peft LoRA on the two Gemmas; as openpi's LoRA fine-tuning, the Gemma weights and embeddings stay
    frozen while the SigLIP tower, its projector and the action/state/time projections train fully."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=r, lora_alpha=r if alpha is None else alpha, lora_dropout=dropout,
                      target_modules=lora_targets(model), init_lora_weights=init)
    peft_model = get_peft_model(model, lora)
    for module in (model.model.vlm.vision_tower, model.model.vlm.multi_modal_projector, model.embed_action_time,
                   model.action_out_proj):
        module.requires_grad_(True)
    return peft_model


def read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(d).__name__}")
    return d
