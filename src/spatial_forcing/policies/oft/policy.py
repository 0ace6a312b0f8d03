"""`OFTPolicy`: the network + processor + dataset statistics, loadable in one call.

    policy = OFTPolicy.from_pretrained("path/or/hub-id")      # own format or upstream layout
    actions = policy.predict_action_chunk({"images": [agentview, wrist], "state": s,
                                           "instruction": "put the bowl on the plate"})   # [K, A] robot units
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...normalize import STATS_FILE, DatasetStats, load_dataset_statistics, save_dataset_statistics
from ..base import Policy, PolicyOutput, PolicySpec
from ..registry import resolve_checkpoint
from .config import PLATFORMS, PRESETS, OFTConfig
from .model import OFTModel
from .processor import OFTProcessor, load_tokenizer
from .weights import ConversionReport, apply_lora, build_model, load_model, load_upstream_model, save_model

__all__ = ["OFTPolicy", "resolve_checkpoint"]


def _spec(cfg: OFTConfig, center_crop: bool) -> PolicySpec:
    return PolicySpec(family="oft", image_size=cfg.image_size, num_images=cfg.num_images,
                      state_dim=cfg.proprio_dim if cfg.use_proprio else 0, chunk_len=cfg.chunk_len,
                      action_dim=cfg.action_dim, norm_type=cfg.norm_type, center_crop=bool(center_crop),
                      action_convention="oft", num_layers=cfg.num_layers)


class OFTPolicy(Policy):
    """OpenVLA-OFT policy: `model` (OFTModel), `processor` (images, prompt, proprio), `stats`
    (dataset statistics by name; `unnorm_key` picks the default entry)."""

    family = "oft"
    action_convention = "oft"  # LIBERO: gripper 1 = open, 0 = close (the env wants -1 open, +1 close)
    PRESETS = PRESETS
    MODEL_TYPES = ("oft", "openvla")
    CPU_RECIPE = {"policy": "mini"}

    def __init__(self, model: OFTModel, processor: OFTProcessor, stats: dict[str, DatasetStats] | None = None,
                 unnorm_key: str | None = None) -> None:
        super().__init__(model, stats, unnorm_key)
        self.processor = processor
        self.conversion_report: ConversionReport | None = None

    @property
    def config(self) -> OFTConfig:
        return self.model.config

    # -- the student protocol ------------------------------------------------------------------
    @property
    def spec(self) -> PolicySpec:
        return _spec(self.config, self.processor.center_crop)

    def visual_dim(self, layer: int) -> int:
        return self.config.hidden_size  # every Llama layer has the same width

    def visual_grid(self, layer: int) -> int:
        return self.config.grid_size  # one token per patch at every layer

    def training_inputs(self, images01: torch.Tensor, tasks: list[str], state: torch.Tensor,
                        actions: torch.Tensor) -> dict[str, torch.Tensor]:
        device = images01.device
        inputs = {"pixel_values": self.processor.pixel_values_batch(images01)}
        inputs.update({k: v.to(device) for k, v in self.processor.text_inputs(list(tasks)).items()})
        if self.config.use_proprio:
            inputs["proprio"] = state.to(device).float()
        inputs["actions"] = actions.to(device).float()
        return inputs

    @classmethod
    def create(cls, preset: str, stats: DatasetStats, overrides: dict | None = None,
               stats_key: str = "train") -> "OFTPolicy":
        config = OFTConfig.preset(preset, **(overrides or {}))
        if config.tokenizer != "bytes":
            raise ValueError(f"policy preset {preset!r} needs its tokenizer files: pass the checkpoint "
                             f"folder or hub id (e.g. openvla/openvla-7b) instead of the preset name")
        processor = OFTProcessor(config, load_tokenizer("bytes"))
        processor.stats = stats
        return cls(OFTModel(config), processor, {stats_key: stats}, stats_key)

    @classmethod
    def preset_spec(cls, preset: str, overrides: dict | None = None) -> PolicySpec:
        config = OFTConfig.preset(preset, **(overrides or {}))
        return _spec(config, config.center_crop)

    @classmethod
    def describe(cls, folder: Path) -> tuple[PolicySpec, list[str]]:
        folder = Path(folder)
        cfg_file = folder / "config.json"
        raw = json.loads(cfg_file.read_text())
        if raw.get("model_type") == "oft":
            cfg = OFTConfig.load(cfg_file)
            proc_file = folder / "processor_config.json"
            crop = json.loads(proc_file.read_text()).get("center_crop", cfg.center_crop) if proc_file.is_file() \
                else cfg.center_crop
        else:  # upstream "openvla": what from_pretrained(platform="libero") builds (weights.py)
            head = any(folder.glob("action_head--*checkpoint.pt"))
            proprio = any(folder.glob("proprio_projector--*checkpoint.pt")) or not head
            lib = {**PLATFORMS["libero"], "image_size": int((raw.get("image_sizes") or [224])[0])}
            cfg = OFTConfig(**lib, use_proprio=proprio)
            crop = True
        stats_file = folder / STATS_FILE
        keys = sorted(load_dataset_statistics(stats_file)) if stats_file.is_file() else []
        return _spec(cfg, crop), keys

    @classmethod
    def apply_lora(cls, model: torch.nn.Module, r: int, alpha: int | None = None) -> torch.nn.Module:
        return apply_lora(model, r=r, alpha=alpha)

    @torch.no_grad()
    def predict_action_chunk(self, observation: dict, unnorm_key: str | None = None,
                             generator: torch.Generator | None = None) -> np.ndarray:
        """`{"images": [view0, ...], "state": array, "instruction": str}` -> actions `[K, A]` in robot units
        (float64), un-normalised with the statistics `unnorm_key` (default: the policy's)."""
        stats = self.dataset_stats(unnorm_key)
        batch = self.processor(observation, stats=stats)
        param = next(self.model.parameters())
        batch = {k: v.to(param.device, dtype=param.dtype if v.is_floating_point() else v.dtype)
                 for k, v in batch.items()}
        actions = self.model.predict_normalized(batch, generator=generator)[0]
        return self.processor.unnormalize_actions(actions, stats)

    @torch.no_grad()
    def predict_action_chunks(self, observations: list[dict], unnorm_key: str | None = None) -> list[np.ndarray]:
        """One forward pass for several observations (the same numbers as one by one, up to batching)."""
        if len(observations) == 1:
            return [self.predict_action_chunk(observations[0], unnorm_key)]
        stats = self.dataset_stats(unnorm_key)
        batch = self.processor(observations, stats=stats)
        param = next(self.model.parameters())
        batch = {k: v.to(param.device, dtype=param.dtype if v.is_floating_point() else v.dtype)
                 for k, v in batch.items()}
        actions = self.model.predict_normalized(batch)
        return [self.processor.unnormalize_actions(a, stats) for a in actions]

    def with_state(self, state: dict[str, torch.Tensor]) -> "OFTPolicy":
        """A new policy with this one's config, processor and statistics, and the network weights
        `state` (OFTModel keys; strict). Used to export what a trainer holds in another form
        (LoRA merged, FSDP-gathered) without touching the live model."""
        return OFTPolicy(build_model(self.config, dict(state)), self.processor, self.stats, self.unnorm_key)

    # -- files ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, unnorm_key: str | None = None, platform: str = "libero",
                        dtype: torch.dtype = torch.float32, device: str | torch.device | None = None,
                        **overrides) -> "OFTPolicy":
        """Load this project's format, or convert an upstream OpenVLA-OFT / Spatial-Forcing folder.

        Upstream folders need `platform` (libero, aloha, bridge) for the chunk length and dims, which
        the weights do not record; `overrides` set any other OFTConfig field (e.g. num_images=1).
        """
        folder = resolve_checkpoint(path_or_id)
        cfg_file = folder / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{folder}: missing config.json")
        model_type = json.loads(cfg_file.read_text()).get("model_type")
        stats_file = folder / STATS_FILE
        if not stats_file.is_file() and model_type == "openvla":
            raise FileNotFoundError(f"{folder}: missing {STATS_FILE} (the statistics that un-normalise actions)")
        stats = load_dataset_statistics(stats_file) if stats_file.is_file() else {}
        report = None
        if model_type == "oft":
            if overrides:
                raise ValueError(f"overrides {sorted(overrides)} apply to upstream checkpoints only; "
                                 f"{folder} is already in this project's format")
            model = load_model(folder, dtype)
            processor = OFTProcessor.load(folder, model.config)
        elif model_type == "openvla":
            tokenizer = load_tokenizer("llama", folder)
            space = tokenizer.hf.convert_tokens_to_ids("▁")
            if space is not None and space != tokenizer.hf.unk_token_id:
                overrides.setdefault("prompt_space_id", int(space))
            model, report = load_upstream_model(folder, platform, dtype, **overrides)
            processor = OFTProcessor.from_upstream(folder, model.config)
        else:
            raise ValueError(f"{cfg_file}: model_type {model_type!r} is neither 'oft' (this project) nor 'openvla' "
                             "(upstream OpenVLA / OpenVLA-OFT / Spatial-Forcing)")
        if unnorm_key is None and len(stats) == 1:
            unnorm_key = next(iter(stats))
        policy = cls(model, processor, stats, unnorm_key)
        policy.conversion_report = report
        return policy.to(device) if device is not None else policy

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write `config.json`, `model.safetensors`, `dataset_statistics.json` and the processor files."""
        folder = Path(folder).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        save_model(self.model, folder)
        self.processor.save(folder)
        if self.stats:
            save_dataset_statistics(folder / STATS_FILE, self.stats)
        return folder
