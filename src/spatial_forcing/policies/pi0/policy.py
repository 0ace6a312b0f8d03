"""`Pi0Policy`: the π0 network + openpi's processor + dataset statistics, loadable in one call.

    policy = Pi0Policy.from_pretrained("checkpoints/pi0_libero_pytorch")   # own format or openpi / lerobot
    actions = policy.predict_action_chunk({"images": [agentview, wrist], "state": s,
                                           "instruction": "put the bowl on the plate"})   # [50, 7] robot units
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...normalize import (STATS_FILE, ArrayStats, DatasetStats, load_dataset_statistics,
                               save_dataset_statistics)
from ..base import Policy, PolicySpec
from ..registry import resolve_checkpoint
from .config import MODEL_TYPE, PLATFORMS, PRESETS, Pi0Config
from .model import Pi0Model
from .processor import Pi0Processor, load_tokenizer
from .weights import (ConversionReport, apply_lora, build_model, load_model, load_upstream_model, read_json,
                      save_model, upstream_kind)

__all__ = ["Pi0Policy"]


def _spec(cfg: Pi0Config) -> PolicySpec:
    return PolicySpec(family="pi0", image_size=cfg.image_size, num_images=cfg.num_images, state_dim=cfg.state_dim,
                      chunk_len=cfg.chunk_len, action_dim=cfg.action_dim, norm_type=cfg.norm_type, center_crop=False,
                      action_convention="raw", num_layers=cfg.depth, replan_steps=cfg.replan_steps,
                      image_ops="openpi")


def _upstream_config(raw: dict[str, Any], platform: str | None, overrides: dict[str, Any]) -> Pi0Config:
    """What an upstream folder's config.json says, without reading tensors (the standard sizes: openpi's
    Gemma variants and SigLIP So400m at 224)."""
    from .config import GEMMA_VARIANTS

    kind = upstream_kind(raw)
    if kind == "transformers":
        text, dit = raw["vlm_config"].get("text_config", {}), raw.get("dit_config", {})
        arch = dict(width=text.get("hidden_size", 2048), depth=text.get("num_hidden_layers", 18),
                    num_heads=text.get("num_attention_heads", 8), num_kv_heads=text.get("num_key_value_heads", 1),
                    head_dim=text.get("head_dim", 256), mlp_dim=text.get("intermediate_size", 16384),
                    expert_width=dit.get("hidden_size", 1024), expert_mlp_dim=dit.get("intermediate_size", 4096),
                    chunk_len=raw.get("chunk_size", 50))
    else:
        vlm = GEMMA_VARIANTS.get(str(raw.get("paligemma_variant", "gemma_2b")), GEMMA_VARIANTS["gemma_2b"])
        exp = GEMMA_VARIANTS.get(str(raw.get("action_expert_variant", "gemma_300m")), GEMMA_VARIANTS["gemma_300m"])
        arch = dict(**vlm, expert_width=exp["width"], expert_mlp_dim=exp["mlp_dim"],
                    chunk_len=int(raw.get("action_horizon", raw.get("chunk_size", 50))))
    if platform is not None and platform not in PLATFORMS:
        raise ValueError(f"platform {platform!r}: expected one of {sorted(PLATFORMS)}")
    return Pi0Config(**{**arch, **PLATFORMS[platform or "libero"], **overrides})


def load_openpi_stats(folder: Path, cfg: Pi0Config) -> dict[str, DatasetStats]:
    """openpi's `assets/<asset_id>/norm_stats.json` (`{"norm_stats": {"state": {...}, "actions": {...}}}`,
    mean / std / q01 / q99) -> statistics keyed by asset id, cut to the robot's state and action sizes.
    The file has no min / max: they are set to q01 / q99 (used only by the training rule for constant dims)."""
    out: dict[str, DatasetStats] = {}
    for path in sorted((folder / "assets").glob("*/norm_stats.json")):
        doc = read_json(path)
        ns = doc.get("norm_stats", doc)
        try:
            def one(d: dict, n: int) -> ArrayStats:
                mean, std = np.asarray(d["mean"], float), np.asarray(d["std"], float)
                q01 = np.asarray(d.get("q01") if d.get("q01") is not None else mean - std, float)
                q99 = np.asarray(d.get("q99") if d.get("q99") is not None else mean + std, float)
                if len(mean) < n:
                    raise ValueError(f"{len(mean)} dims, the policy needs {n}")
                return ArrayStats(q01=q01[:n], q99=q99[:n], min=q01[:n], max=q99[:n], mean=mean[:n], std=std[:n],
                                  mask=np.ones(n, bool), extra={"source": "openpi norm_stats.json"})

            out[path.parent.name] = DatasetStats(action=one(ns["actions"], cfg.action_dim),
                                                 proprio=one(ns["state"], cfg.state_dim))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: not openpi norm stats with 'state' and 'actions' ({exc})") from None
    return out


class Pi0Policy(Policy):
    """π0 policy: `model` (Pi0Model), `processor` (openpi's inputs), `stats` (statistics by name)."""

    family = "pi0"
    action_convention = "raw"  # the dataset's own action units (LIBERO: gripper -1 open / +1 close)
    PRESETS = PRESETS
    MODEL_TYPES = (MODEL_TYPE,)
    # raw actions (no OFT gripper rewrite) and openpi's padded last chunk, as the pi0-mini-sf training preset
    CPU_RECIPE = {"policy": "pi0-mini", "standardize": "", "chunk_mode": "repeat_last"}

    def __init__(self, model: Pi0Model, processor: Pi0Processor, stats: dict[str, DatasetStats] | None = None,
                 unnorm_key: str | None = None) -> None:
        super().__init__(model, stats, unnorm_key)
        self.processor = processor
        self.conversion_report: ConversionReport | None = None

    @property
    def config(self) -> Pi0Config:
        return self.model.pi0_config

    @classmethod
    def claims(cls, config: dict[str, Any]) -> bool:
        return config.get("model_type") in cls.MODEL_TYPES or upstream_kind(config) is not None

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def create(cls, preset: str, stats: DatasetStats, overrides: dict | None = None,
               stats_key: str = "train") -> "Pi0Policy":
        overrides = dict(overrides or {})
        tokenizer_file = overrides.pop("tokenizer_file", None)
        config = Pi0Config.preset(preset, **overrides)
        tokenizer = load_tokenizer(config, None, tokenizer_file) if (tokenizer_file or config.tokenizer == "bytes") \
            else None
        if tokenizer is None:
            raise ValueError(f"policy preset {preset!r} needs PaliGemma's tokenizer: pass a π0 checkpoint folder "
                             f"(e.g. one converted with openpi's convert_jax_model_to_pytorch.py) instead of the "
                             f"preset name, or --policy-override tokenizer_file=PATH")
        return cls(build_model(config), Pi0Processor(config, tokenizer), {stats_key: stats}, stats_key)

    @classmethod
    def preset_spec(cls, preset: str, overrides: dict | None = None) -> PolicySpec:
        overrides = {k: v for k, v in (overrides or {}).items() if k != "tokenizer_file"}
        return _spec(Pi0Config.preset(preset, **overrides))

    @classmethod
    def describe(cls, folder: Path) -> tuple[PolicySpec, list[str]]:
        folder = Path(folder)
        raw = read_json(folder / "config.json")
        if raw.get("model_type") == MODEL_TYPE:
            cfg = Pi0Config.load(folder / "config.json")
        else:
            cfg = _upstream_config(raw, None, {})
        stats_file = folder / STATS_FILE
        keys = sorted(load_dataset_statistics(stats_file)) if stats_file.is_file() else \
            sorted(load_openpi_stats(folder, cfg))
        return _spec(cfg), keys

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, unnorm_key: str | None = None,
                        dtype: torch.dtype = torch.float32, device: str | torch.device | None = None,
                        platform: str | None = None, tokenizer_file: str | None = None,
                        **overrides: Any) -> "Pi0Policy":
        """This project's folders, or openpi / lerobot / transformers π0 folders converted on the fly
        (`platform` "libero" (default) or "aloha" gives the robot sizes those files do not record;
        `overrides` set any other Pi0Config field)."""
        folder = resolve_checkpoint(path_or_id)
        raw = read_json(folder / "config.json") if (folder / "config.json").is_file() else None
        if raw is None:
            raise FileNotFoundError(f"{folder}: missing config.json (not a π0 checkpoint)")
        report = None
        if raw.get("model_type") == MODEL_TYPE:
            if overrides or platform:
                raise ValueError(f"overrides {sorted(overrides) + (['platform'] if platform else [])} apply to "
                                 f"upstream checkpoints only; {folder} is already in this project's format")
            model = load_model(folder, dtype, device)
        elif upstream_kind(raw) is not None:
            model, report = load_upstream_model(folder, raw, platform, dtype, device, overrides)
        else:
            raise ValueError(f"{folder}/config.json: model_type {raw.get('model_type')!r} is not a π0 checkpoint "
                             f"(expected {MODEL_TYPE!r}, or an openpi / lerobot / transformers π0 folder)")
        cfg = model.pi0_config
        stats_file = folder / STATS_FILE
        stats = load_dataset_statistics(stats_file) if stats_file.is_file() else load_openpi_stats(folder, cfg)
        if unnorm_key is None and len(stats) == 1:
            unnorm_key = next(iter(stats))
        policy = cls(model, Pi0Processor(cfg, load_tokenizer(cfg, folder, tokenizer_file)), stats, unnorm_key)
        policy.conversion_report = report
        return policy.to(device) if device is not None else policy

    def save_pretrained(self, folder: str | Path) -> Path:
        """`config.json`, `model.safetensors` (transformers' PI0 key names), statistics, `tokenizer.model`."""
        folder = Path(folder).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        save_model(self.model, folder)
        self.processor.tokenizer.save(folder)
        if self.stats:
            save_dataset_statistics(folder / STATS_FILE, self.stats)
        return folder

    def with_state(self, state: dict[str, torch.Tensor]) -> "Pi0Policy":
        param = next(self.model.parameters())
        model = build_model(self.config, dict(state), param.dtype, "cpu")
        return Pi0Policy(model, self.processor, self.stats, self.unnorm_key)

    @classmethod
    def apply_lora(cls, model: torch.nn.Module, r: int, alpha: int | None = None) -> torch.nn.Module:
        return apply_lora(model, r=r, alpha=alpha)

    # -- the student protocol --------------------------------------------------------------------
    @property
    def spec(self) -> PolicySpec:
        return _spec(self.config)

    def visual_dim(self, layer: int) -> int:
        return self.config.width

    def visual_grid(self, layer: int) -> int:
        return self.config.grid_size

    def slot_mask(self, images01: torch.Tensor) -> torch.Tensor:
        """Cameras present per sample `[B, V]`: a view exactly 0 everywhere is an absent camera (openpi fills
        absent cameras with zeros and masks them; openpi-SF shows them to the teacher as white)."""
        return images01.flatten(2).ne(0).any(-1)

    def training_inputs(self, images01: torch.Tensor, tasks: list[str], state: torch.Tensor,
                        actions: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.config
        b, v = images01.shape[:2]
        if v != cfg.num_images or tuple(images01.shape[-2:]) != (cfg.image_size, cfg.image_size):
            raise ValueError(f"π0 takes {cfg.num_images} views of {cfg.image_size} px, found {v} of "
                             f"{tuple(images01.shape[-2:])}")
        if state.shape[-1] != cfg.state_dim or tuple(actions.shape[1:]) != (cfg.chunk_len, cfg.action_dim):
            raise ValueError(f"π0 ({cfg.state_dim}-D state, chunks of {cfg.chunk_len} x {cfg.action_dim}) got a "
                             f"{state.shape[-1]}-D state and chunks {tuple(actions.shape[1:])}")
        if cfg.delta_action_mask:
            raise ValueError("delta_action_mask is an inference setting for upstream checkpoints; the pipeline "
                             "normalises absolute actions, so train with delta_action_mask []")
        return self.processor.batch(images01 * 2.0 - 1.0, self.slot_mask(images01), list(tasks), state, actions)

    def _to_model(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        param = next(self.model.parameters())
        return {k: v.to(param.device) for k, v in batch.items()}

    @torch.no_grad()
    def predict_action_chunks(self, observations: list[dict], unnorm_key: str | None = None,
                              generator: torch.Generator | None = None) -> list[np.ndarray]:
        """One forward pass (the prefix once, 10 Euler steps) for several observations."""
        stats = self.dataset_stats(unnorm_key)
        batch = self._to_model(self.processor(observations, stats))
        chunks = self.model.predict_normalized(batch, generator=generator)
        return [self.processor.unnormalize_actions(c, stats, o.get("state")) for c, o in zip(chunks, observations)]

    def predict_action_chunk(self, observation: dict, unnorm_key: str | None = None,
                             generator: torch.Generator | None = None) -> np.ndarray:
        return self.predict_action_chunks([observation], unnorm_key, generator)[0]
