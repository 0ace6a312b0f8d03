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

from ..base import PolicyOutput
from .config import OFTConfig
from .model import OFTModel
from ...data.normalize import STATS_FILE, DatasetStats, load_dataset_statistics, save_dataset_statistics, select_stats
from .processor import OFTProcessor, load_tokenizer
from .weights import ConversionReport, build_model, load_model, load_upstream_model, save_model


def resolve_checkpoint(path_or_id: str | Path, allow_download: bool = True) -> Path:
    """A local folder as is; otherwise a Hugging Face hub id, downloaded with huggingface_hub."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path}: expected a checkpoint folder, found a file")
        return path
    text = str(path_or_id)
    if not allow_download or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise FileNotFoundError(f"{path_or_id}: no such checkpoint folder (and not a hub id of the form owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=text))
    except Exception as exc:  # offline, gated, missing repo: say what was tried
        raise FileNotFoundError(f"{text}: not a local folder, and downloading it from the Hugging Face hub failed "
                                f"({type(exc).__name__}: {str(exc)[:200]})") from exc


class OFTPolicy(nn.Module):
    """OpenVLA-OFT policy: `model` (OFTModel), `processor` (images, prompt, proprio), `stats`
    (dataset statistics by name; `unnorm_key` picks the default entry)."""

    action_convention = "oft"  # LIBERO: gripper 1 = open, 0 = close (the env wants -1 open, +1 close)

    def __init__(self, model: OFTModel, processor: OFTProcessor, stats: dict[str, DatasetStats] | None = None,
                 unnorm_key: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.processor = processor
        self.stats = dict(stats or {})
        self.unnorm_key = unnorm_key
        self.conversion_report: ConversionReport | None = None
        if unnorm_key is not None:
            select_stats(self.stats, unnorm_key)  # fail early on an unknown key

    @property
    def config(self) -> OFTConfig:
        return self.model.config

    # -- the student protocol ------------------------------------------------------------------
    def forward(self, batch: dict, align_layer: int | None = None) -> PolicyOutput:
        return self.model(batch, align_layer=align_layer)

    def dataset_stats(self, unnorm_key: str | None = None) -> DatasetStats:
        if not self.stats:
            raise ValueError("this policy has no dataset statistics (dataset_statistics.json) to (un)normalise with")
        return select_stats(self.stats, unnorm_key if unnorm_key is not None else self.unnorm_key)[1]

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
