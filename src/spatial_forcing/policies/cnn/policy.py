"""`CNNPolicy`: the compact convolutional student with its statistics, loadable in one call.

    policy = CNNPolicy.from_pretrained("runs/x/checkpoints/step-N/policy")
    actions = policy.predict_action_chunk({"images": [agentview, wrist], "state": s,
                                           "instruction": "pick up the soup and place it in the basket"})

Inference applies what training saw: views resized to `image_size` (PIL bicubic, as the OFT processor),
the TF-exact 90 %-area centre crop when `center_crop` (training used random crops of that area), the
state normalised with the training rule (q01/q99, masked dims untouched, constant dims 0), and the
chunk un-normalised in float64. Files: `config.json` (model_type "cnn"), `model.safetensors`,
`dataset_statistics.json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ...normalize import (STATS_FILE, DatasetStats, load_dataset_statistics, normalize, save_dataset_statistics,
                               unnormalize, zero_constant_dims)
from ..base import Policy, PolicySpec
from ..images import as_view_tensor, center_crop, resize_view
from ..registry import resolve_checkpoint
from .config import PRESETS, CNNConfig
from .model import CNNModel


def _spec(cfg: CNNConfig) -> PolicySpec:
    return PolicySpec(family="cnn", image_size=cfg.image_size, num_images=cfg.num_images,
                      state_dim=cfg.proprio_dim if cfg.use_proprio else 0, chunk_len=cfg.chunk_len,
                      action_dim=cfg.action_dim, norm_type=cfg.norm_type, center_crop=cfg.center_crop,
                      action_convention="oft", num_layers=cfg.num_layers)


def text_ids(instructions: list[str], max_bytes: int) -> torch.Tensor:
    """UTF-8 bytes + 1 (0 pads), right-padded to the longest instruction (at most `max_bytes`)."""
    encoded = [list(s.encode("utf-8")[:max_bytes]) or [32] for s in instructions]
    out = torch.zeros(len(encoded), max(len(e) for e in encoded), dtype=torch.long)
    for i, e in enumerate(encoded):
        out[i, :len(e)] = torch.tensor(e) + 1
    return out


class CNNPolicy(Policy):
    family = "cnn"
    action_convention = "oft"  # trained on OFT-standardised actions: gripper 1 = open, 0 = close
    PRESETS = PRESETS
    MODEL_TYPES = ("cnn",)
    CPU_RECIPE = {"policy": "cnn"}

    def __init__(self, model: CNNModel, stats: dict[str, DatasetStats] | None = None,
                 unnorm_key: str | None = None) -> None:
        super().__init__(model, stats, unnorm_key)
        self._text_cache: dict[str, torch.Tensor] = {}

    @property
    def config(self) -> CNNConfig:
        return self.model.config

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def create(cls, preset: str, stats: DatasetStats, overrides: dict | None = None,
               stats_key: str = "train") -> "CNNPolicy":
        return cls(CNNModel(CNNConfig.preset(preset, **(overrides or {}))), {stats_key: stats}, stats_key)

    @classmethod
    def preset_spec(cls, preset: str, overrides: dict | None = None) -> PolicySpec:
        return _spec(CNNConfig.preset(preset, **(overrides or {})))

    @classmethod
    def describe(cls, folder: Path) -> tuple[PolicySpec, list[str]]:
        stats_file = Path(folder) / STATS_FILE
        keys = sorted(load_dataset_statistics(stats_file)) if stats_file.is_file() else []
        return _spec(CNNConfig.load(Path(folder) / "config.json")), keys

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, unnorm_key: str | None = None,
                        dtype: torch.dtype = torch.float32, device: str | torch.device | None = None,
                        **overrides: Any) -> "CNNPolicy":
        if overrides:
            raise ValueError(f"overrides {sorted(overrides)}: a cnn checkpoint's configuration is fixed by its files")
        folder = resolve_checkpoint(path_or_id)
        for name in ("config.json", "model.safetensors"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder}: missing {name}")
        model = CNNModel(CNNConfig.load(folder / "config.json"))
        weights = folder / "model.safetensors"
        try:
            state = load_file(str(weights))
        except Exception as exc:  # a truncated or foreign file: name it
            raise ValueError(f"{weights}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
        _load_strict(model, state, str(weights))
        stats_file = folder / STATS_FILE
        stats = load_dataset_statistics(stats_file) if stats_file.is_file() else {}
        if unnorm_key is None and len(stats) == 1:
            unnorm_key = next(iter(stats))
        policy = cls(model.to(dtype), stats, unnorm_key)
        return policy.to(device) if device is not None else policy

    def save_pretrained(self, folder: str | Path) -> Path:
        folder = Path(folder).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save(folder / "config.json")
        save_file({k: v.detach().contiguous() for k, v in self.model.state_dict().items()},
                  str(folder / "model.safetensors"), metadata={"format": "pt", "model_type": "cnn"})
        if self.stats:
            save_dataset_statistics(folder / STATS_FILE, self.stats)
        return folder

    def with_state(self, state: dict[str, torch.Tensor]) -> "CNNPolicy":
        model = CNNModel(self.config)
        _load_strict(model, dict(state), "state")
        return CNNPolicy(model, self.stats, self.unnorm_key)

    # -- the student protocol --------------------------------------------------------------------
    @property
    def spec(self) -> PolicySpec:
        return _spec(self.config)

    def visual_dim(self, layer: int) -> int:
        return self.config.channels[layer]

    def visual_grid(self, layer: int) -> int:
        return self.config.grid_side(layer % (self.config.num_layers + 1))

    def _text(self, instructions: list[str], device: torch.device) -> torch.Tensor:
        key = "\x00".join(instructions)
        ids = self._text_cache.get(key)
        if ids is None:
            ids = text_ids(instructions, self.config.max_text_bytes)
            if len(self._text_cache) < 4096:
                self._text_cache[key] = ids
        return ids.to(device)

    def training_inputs(self, images01: torch.Tensor, tasks: list[str], state: torch.Tensor,
                        actions: torch.Tensor) -> dict[str, torch.Tensor]:
        device = images01.device
        inputs = {"pixels": images01, "text_ids": self._text(list(tasks), device),
                  "actions": actions.to(device).float()}
        if self.config.use_proprio:
            inputs["proprio"] = state.to(device).float()
        return inputs

    def observation_inputs(self, observations: list[dict], stats: DatasetStats) -> dict[str, torch.Tensor]:
        """Raw observations -> model inputs (views resized/cropped as in training, state normalised)."""
        cfg = self.config
        param = next(self.model.parameters())
        views = []
        for obs in observations:
            images = obs["images"]
            if len(images) != cfg.num_images:
                raise ValueError(f"observation has {len(images)} images; the policy takes {cfg.num_images}")
            per = []
            for i, image in enumerate(images):
                v = as_view_tensor(image, f"images[{i}]")
                v = center_crop(v, cfg.image_size) if cfg.center_crop else resize_view(v, cfg.image_size)
                per.append(v.float() / 255.0 if v.dtype == torch.uint8 else v.float())
            views.append(torch.stack(per))
        inputs = {"pixels": torch.stack(views).to(param.device, param.dtype),
                  "text_ids": self._text([str(o["instruction"]) for o in observations], param.device)}
        if cfg.use_proprio:
            if stats.proprio is None:
                raise ValueError("the dataset statistics have no 'proprio' entry, but the policy uses the state")
            state = np.stack([np.asarray(o["state"], dtype=np.float64) for o in observations])
            if state.shape[-1] != cfg.proprio_dim:
                raise ValueError(f"state has {state.shape[-1]} values; the policy expects {cfg.proprio_dim}")
            x = zero_constant_dims(normalize(state, stats.proprio, cfg.norm_type, what="state"), stats.proprio,
                                   what="state")
            inputs["proprio"] = torch.as_tensor(x, dtype=param.dtype, device=param.device)
        return inputs

    @torch.no_grad()
    def predict_action_chunks(self, observations: list[dict], unnorm_key: str | None = None) -> list[np.ndarray]:
        stats = self.dataset_stats(unnorm_key)
        chunks = self.model.predict_normalized(self.observation_inputs(observations, stats))
        out = chunks.detach().float().cpu().numpy().astype(np.float64)
        return [unnormalize(a, stats.action, self.config.norm_type, what="actions") for a in out]

    def predict_action_chunk(self, observation: dict, unnorm_key: str | None = None) -> np.ndarray:
        return self.predict_action_chunks([observation], unnorm_key)[0]


def _load_strict(model: CNNModel, state: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = [f"{what}: {items[:8]} ({len(items)} in all)" for what, items in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)) if items]
    if problems:
        raise ValueError(f"{source} does not match CNNModel(channels {model.config.channels}): " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
