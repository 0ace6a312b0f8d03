"""The student protocol shared by every policy family.

    policy.model(inputs, align_layer=k) -> PolicyOutput(action_loss, metrics, visual_hidden [B,V,h,w,D] | None)
    policy.training_inputs(images01, tasks, state, actions) -> inputs     (a pipeline batch in the model's terms)
    policy.predict_action_chunk(observation) -> actions [T, A] in robot units
    policy.spec -> PolicySpec                   (what trainers, harnesses and servers need to know)
    policy.visual_dim(layer) -> int             (width of `visual_hidden` at that layer: the SF projector's input)
    policy.visual_grid(layer) -> int            (side of each view's grid at that layer)

The policy owns its token layout: `visual_hidden` is already a per-view grid, so the Spatial
Forcing module never sees sequence offsets. A family is one folder (`policies/<family>/`) whose
policy class subclasses `Policy` and is named in `policies/registry.py`.
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from spatial_forcing.normalize import DatasetStats, select_stats


@dataclass
class PolicyOutput:
    action_loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    visual_hidden: torch.Tensor | None = None
    actions: torch.Tensor | None = None  # normalised predictions [B, T, A]
    slot_mask: torch.Tensor | None = None  # [B, V] bool: False = an absent camera (its tokens are not aligned)
    pad_mask: torch.Tensor | None = None  # [B, V, H, W] bool on the views' pixels: False = letterbox padding


@dataclass(frozen=True)
class PolicySpec:
    """What a policy takes and gives, readable without its weights.

    image_size: side of the square views it takes (the harness resizes to it); num_images: views, in
    the dataset's camera order; state_dim: proprio width (0 = none); chunk_len x action_dim: one query's
    actions; norm_type: statistics rule; center_crop: whether its processor centre-crops at inference
    (it then trained on random crops); action_convention: "oft" (gripper 1 open / 0 close) or "raw";
    num_layers: the alignable layers are 0..num_layers (0 = the earliest visual states);
    replan_steps: actions executed per query in closed loop by default (0 = the whole chunk);
    image_ops: how an evaluation harness prepares camera frames: "oft" (JPEG q95 round trip + Lanczos3 to
    image_size, OpenVLA-OFT's client) or "openpi" (resize-with-pad, PIL bilinear, no JPEG: openpi's
    LIBERO client)."""

    family: str
    image_size: int
    num_images: int
    state_dim: int
    chunk_len: int
    action_dim: int
    norm_type: str
    center_crop: bool
    action_convention: str
    num_layers: int
    replan_steps: int = 0
    image_ops: str = "oft"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Policy(nn.Module, abc.ABC):
    """Base of every family's policy: `model` (the trained network), `stats` (dataset statistics by name;
    `unnorm_key` picks the default entry) and the protocol above. Subclasses set `family`, `PRESETS`
    (random-initialisation presets) and `MODEL_TYPES` (the `config.json` model types they load)."""

    family: ClassVar[str] = ""
    action_convention: ClassVar[str] = "oft"
    PRESETS: ClassVar[dict[str, dict]] = {}
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ()
    # The family on 2 CPU cores (`sf quickstart` / `sf study --policy-family`): "policy" names a small preset,
    # the other keys are the training fields the family needs (TrainConfig names).
    CPU_RECIPE: ClassVar[dict[str, Any]] = {}

    def __init__(self, model: nn.Module, stats: dict[str, DatasetStats] | None = None,
                 unnorm_key: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.stats = dict(stats or {})
        self.unnorm_key = unnorm_key
        if unnorm_key is not None:
            select_stats(self.stats, unnorm_key)  # fail early on an unknown key

    # -- construction (classmethods every family implements) ----------------------------------
    @classmethod
    @abc.abstractmethod
    def create(cls, preset: str, stats: DatasetStats, overrides: dict | None = None,
               stats_key: str = "train") -> "Policy":
        """A randomly initialised policy of `preset`, normalising with `stats`."""

    @classmethod
    @abc.abstractmethod
    def preset_spec(cls, preset: str, overrides: dict | None = None) -> PolicySpec:
        """The spec of a preset (no weights built)."""

    @classmethod
    @abc.abstractmethod
    def describe(cls, folder: Path) -> tuple[PolicySpec, list[str]]:
        """(spec, dataset-statistics keys) of a checkpoint folder, from its files (no weights loaded)."""

    @classmethod
    @abc.abstractmethod
    def from_pretrained(cls, path_or_id: str | Path, unnorm_key: str | None = None,
                        dtype: torch.dtype = torch.float32, device: str | torch.device | None = None,
                        **overrides: Any) -> "Policy":
        """Load a checkpoint folder (or hub id) of this family."""

    @classmethod
    def claims(cls, config: dict[str, Any]) -> bool:
        """Whether this family loads a checkpoint folder whose `config.json` holds `config` (default: its
        `model_type` is one of `MODEL_TYPES`; a family that converts upstream folders without a model_type,
        such as openpi's, recognises them here)."""
        return config.get("model_type") in cls.MODEL_TYPES

    @classmethod
    def apply_lora(cls, model: nn.Module, r: int, alpha: int | None = None) -> nn.Module:
        raise ValueError(f"the {cls.family} family does not support LoRA; train it fully (lora_rank 0)")

    # -- the protocol ----------------------------------------------------------------------------
    @property
    def config(self) -> Any:
        return self.model.config

    @property
    @abc.abstractmethod
    def spec(self) -> PolicySpec:
        """The policy's `PolicySpec`."""

    @abc.abstractmethod
    def visual_dim(self, layer: int) -> int:
        """Width of `visual_hidden` at `layer`."""

    @abc.abstractmethod
    def visual_grid(self, layer: int) -> int:
        """Side of each view's `visual_hidden` grid at `layer`."""

    @abc.abstractmethod
    def training_inputs(self, images01: torch.Tensor, tasks: list[str], state: torch.Tensor,
                        actions: torch.Tensor) -> dict[str, torch.Tensor]:
        """A pipeline batch (views `[B,V,3,S,S]` in [0, 1], augmented; instructions; normalised state
        `[B,P]` and action chunks `[B,K,A]`) -> the model's inputs, on the images' device."""

    def slot_mask(self, images01: torch.Tensor) -> torch.Tensor | None:
        """`[B, V]` bool, False for a view that is an absent camera (None: every view is real). The trainer
        hides absent views from the teacher (white, VGGT's padding) before the policy runs."""
        return None

    def forward(self, batch: dict, align_layer: int | None = None) -> PolicyOutput:
        return self.model(batch, align_layer=align_layer)

    def dataset_stats(self, unnorm_key: str | None = None) -> DatasetStats:
        if not self.stats:
            raise ValueError("this policy has no dataset statistics (dataset_statistics.json) to (un)normalise with")
        return select_stats(self.stats, unnorm_key if unnorm_key is not None else self.unnorm_key)[1]

    @abc.abstractmethod
    def predict_action_chunk(self, observation: dict, unnorm_key: str | None = None) -> np.ndarray:
        """`{"images": [view0, ...] (uint8 HxWx3), "state": array, "instruction": str}` -> actions `[K, A]`
        in robot units (float64)."""

    def predict_action_chunks(self, observations: list[dict], unnorm_key: str | None = None) -> list[np.ndarray]:
        """A batch of observations in one forward pass (servers batch clients with it)."""
        return [self.predict_action_chunk(o, unnorm_key) for o in observations]

    @abc.abstractmethod
    def with_state(self, state: dict[str, torch.Tensor]) -> "Policy":
        """A new policy with this one's config and statistics and the network weights `state` (strict)."""

    @abc.abstractmethod
    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the checkpoint folder (config.json with `model_type`, weights, statistics, processor files)."""
