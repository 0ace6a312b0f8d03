"""The training loop: policy + (frozen) teacher + Spatial Forcing module, one process (CPU or one GPU).

One step: `grad_accum` micro-batches of `batch_size` samples from the data pipeline ->
``batch = policy.processor`` inputs -> ``out = policy(batch, align_layer)`` ->
``loss = out.action_loss + alpha * SF(out.visual_hidden, teacher(batch))`` -> backward -> optional
clipping over every trained tensor (the projector included) -> AdamW -> schedule. The loop knows
policies and teachers only through their protocols (`policies/base.py`, `teachers/base.py`).

Public API
----------
    Trainer(config, resume=None).fit() -> summary dict
    validate_config(config) -> None     the cheap checks that run before any model is built
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from spatial_forcing.align.module import SpatialForcing
from spatial_forcing.data.schema import ACTION, DEPTH, IMAGE, INTRINSICS, STATE, TASK
from spatial_forcing.train.checkpoint import (list_checkpoints, resolve_resume, rng_state, save_checkpoint,
                                              set_rng_state)
from spatial_forcing.train.config import TrainConfig


class TrainingError(RuntimeError):
    """A run that cannot go on (NaN loss, bad data); the message says where."""


# ------------------------------------------------------------------------------------------------
# Checks before heavy work
# ------------------------------------------------------------------------------------------------

def open_source(path: str, standardize: str = "libero") -> Any:
    """A LeRobot v3 folder (``meta/info.json``) or an RLDS folder (``dataset_info.json``)."""
    from spatial_forcing.data.lerobot import LeRobotEpisodeSource
    from spatial_forcing.data.rlds import RLDSEpisodeSource

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset: {root} is not a folder")
    if (root / "meta" / "info.json").is_file():
        return LeRobotEpisodeSource(root, standardize=standardize or None)
    if any(root.rglob("dataset_info.json")):
        return RLDSEpisodeSource(root, standardize=standardize or None)
    raise ValueError(f"dataset: {root} is neither a LeRobot v3 dataset (meta/info.json) nor RLDS (dataset_info.json)")


def _policy_config(cfg: TrainConfig) -> Any:
    from spatial_forcing.policies.oft.config import PRESETS, OFTConfig

    if cfg.policy in PRESETS:
        return OFTConfig.preset(cfg.policy, **cfg.policy_overrides)
    folder = Path(cfg.policy)
    if (folder / "config.json").is_file():
        d = json.loads((folder / "config.json").read_text())
        if d.get("model_type") == "oft":
            return OFTConfig.from_dict({k: v for k, v in d.items() if k != "model_type"})
    return None  # upstream checkpoint or hub id: checked when loaded


def validate_config(cfg: TrainConfig) -> Any:
    """Fail in the first seconds, before any model is loaded: layer index, teacher weights, cameras,
    batch divisibility. Returns the opened dataset."""
    pcfg = _policy_config(cfg)
    if pcfg is not None:
        if cfg.sf:
            n = pcfg.num_layers
            if not -(n + 1) <= cfg.align.student_layer <= n:
                raise ValueError(f"align.student_layer {cfg.align.student_layer} is beyond the student's depth: "
                                 f"{cfg.policy} has {n} layers (valid: 0..{n}, or negative from the end)")
        if len(cfg.cameras) != pcfg.num_images:
            raise ValueError(f"cameras {cfg.cameras}: the policy takes {pcfg.num_images} images")
    if cfg.sf and cfg.teacher == "vggt":
        w = Path(cfg.teacher_weights) if cfg.teacher_weights else None
        if w is None or not w.exists():
            raise FileNotFoundError(f"teacher vggt: weights {cfg.teacher_weights!r} not found (expected model.pt, "
                                    f"a .safetensors file or a folder of facebook/VGGT-1B)")
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} does not divide over {world} processes")
    if not cfg.dataset:
        raise ValueError("dataset: no dataset given (--dataset PATH)")
    source = open_source(cfg.dataset, cfg.standardize)
    missing = [c for c in cfg.cameras if c not in source.cameras]
    if missing:
        raise ValueError(f"dataset {cfg.dataset} has no camera {missing}; it has {source.cameras}")
    no_depth = [c for c in cfg.cameras if DEPTH + c not in getattr(source, "features", {})]
    if cfg.sf and cfg.teacher == "geometry" and no_depth:
        raise ValueError(f"teacher geometry needs metric depth, and {cfg.dataset} has none for cameras {no_depth}")
    if cfg.val_episodes >= source.num_episodes:
        raise ValueError(f"val_episodes {cfg.val_episodes} leaves no training episode "
                         f"({source.num_episodes} in {cfg.dataset})")
    return source


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------

def build_policy(cfg: TrainConfig, stats: Any) -> Any:
    """An OFTPolicy: a preset initialised at random, or a checkpoint (this project's or upstream)."""
    from spatial_forcing.policies.oft.config import PRESETS, OFTConfig
    from spatial_forcing.policies.oft.model import OFTModel
    from spatial_forcing.policies.oft.policy import OFTPolicy
    from spatial_forcing.policies.oft.processor import OFTProcessor, load_tokenizer

    if cfg.policy in PRESETS:
        config = OFTConfig.preset(cfg.policy, **cfg.policy_overrides)
        if config.tokenizer != "bytes":
            raise ValueError(f"policy preset {cfg.policy!r} needs its tokenizer files: pass the checkpoint "
                             f"folder or hub id (e.g. openvla/openvla-7b) instead of the preset name")
        model = OFTModel(config)
        policy = OFTPolicy(model, OFTProcessor(config, load_tokenizer("bytes")), {"train": stats}, "train")
    else:
        policy = OFTPolicy.from_pretrained(cfg.policy, **cfg.policy_overrides)
        policy.stats = {"train": stats}
        policy.unnorm_key = "train"
    policy.processor.stats = stats
    return policy


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.milestones), gamma=cfg.gamma)
    warm = max(0, cfg.warmup_steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, cfg.max_steps - warm))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def stack_views(batch: dict, prefix: str, cameras: list[str]) -> torch.Tensor | None:
    if not all(prefix + c in batch for c in cameras):
        return None
    return torch.stack([batch[prefix + c] for c in cameras], dim=1)


@dataclass
class StepInputs:
    policy: dict[str, torch.Tensor]
    teacher: dict[str, torch.Tensor]


def prepare_batch(batch: dict, cameras: list[str], processor: Any, device: torch.device) -> StepInputs:
    """A collated pipeline batch -> the policy's inputs and the teacher's (images, depth, intrinsics)."""
    images = stack_views(batch, IMAGE, cameras).to(device, non_blocking=True).float().div_(255.0)  # [B,V,3,S,S]
    inputs = {"pixel_values": processor.pixel_values_batch(images)}
    inputs.update(processor.text_inputs(list(batch[TASK])))
    if processor.config.use_proprio:
        inputs["proprio"] = batch[STATE].float()
    inputs["actions"] = batch[ACTION].float()
    teacher = {"images": images}
    for key, prefix in (("depth", DEPTH), ("intrinsics", INTRINSICS)):
        value = stack_views(batch, prefix, cameras)
        if value is not None:
            teacher[key] = value
    move = lambda d: {k: v.to(device, non_blocking=True) for k, v in d.items()}  # noqa: E731
    return StepInputs(move(inputs), move(teacher))


def _trainable(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------
# Trainer
# ------------------------------------------------------------------------------------------------

class Trainer:
    def __init__(self, config: TrainConfig, resume: str | None = None, progress: bool = True) -> None:
        source = validate_config(config)
        self.cfg = config
        self.progress = progress
        self.resume_from = resolve_resume(resume, config.output_dir) if resume else None
        if self.resume_from is not None:
            saved = TrainConfig.load(self.resume_from / "train_config.json").to_dict()
            diff = sorted(k for k, v in config.to_dict().items() if saved[k] != v)
            if diff:
                raise ValueError(f"--resume {self.resume_from}: the run was configured differently ({diff}); "
                                 f"resume with the saved configuration (train_config.json)")
        self.device = self._device()
        self._build(source)

    def _device(self) -> torch.device:
        if self.cfg.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.cfg.device)

    # ---------------------------------------------------------------- construction
    def _build(self, source: Any) -> None:
        from spatial_forcing.data.dataset import ChunkedDataset, PipelineConfig
        from spatial_forcing.data.sampler import ResumableSampler
        from spatial_forcing.data.stats import cached_statistics
        from spatial_forcing.teachers import build_teacher

        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.stats = cached_statistics(source)
        self.policy = build_policy(cfg, self.stats)
        pcfg = self.policy.config
        n = source.num_episodes
        train_eps = list(range(n - cfg.val_episodes))
        needs_depth = cfg.sf and cfg.teacher == "geometry"
        pipe = PipelineConfig(chunk_len=pcfg.chunk_len, chunk_mode=cfg.chunk_mode, image_size=pcfg.image_size,
                              augment=cfg.augment, norm_type=pcfg.norm_type, depth=needs_depth, seed=cfg.seed)
        self.dataset = ChunkedDataset(source, self.stats, pipe, cameras=cfg.cameras, episodes=train_eps)
        self.sampler = ResumableSampler(len(self.dataset), seed=cfg.seed)
        self.val_dataset = None
        if cfg.val_episodes:
            val_pipe = PipelineConfig(chunk_len=pcfg.chunk_len, chunk_mode=cfg.chunk_mode, image_size=pcfg.image_size,
                                      augment=False, norm_type=pcfg.norm_type, depth=False, seed=cfg.seed)
            self.val_dataset = ChunkedDataset(source, self.stats, val_pipe, cameras=cfg.cameras,
                                              episodes=list(range(n - cfg.val_episodes, n)))
        if cfg.lora_rank:
            from spatial_forcing.policies.oft.weights import apply_lora

            self.model = apply_lora(self.policy.model, r=cfg.lora_rank, alpha=cfg.lora_alpha)
        else:
            self.model = self.policy.model
        self.teacher = self.sf = None
        if cfg.sf:
            self.teacher = build_teacher(cfg.teacher, cfg.teacher_weights or None).to(self.device).freeze()
            self.sf = SpatialForcing(cfg.align, pcfg.hidden_size, self.teacher.dim)
        self.model.to(self.device)
        if self.sf is not None:
            self.sf.to(self.device)
        params = list(_trainable(self.model).values()) + (list(self.sf.parameters()) if self.sf else [])
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = make_scheduler(cfg, self.optimizer)
        self.step = 0
        self.consumed = 0
        if self.resume_from is not None:
            self._load_state(self.resume_from)
        self.autocast = (self.device.type == "cuda" and cfg.precision in ("auto", "bf16")) or cfg.precision == "bf16"

    def _make_loader(self, start: int) -> Any:
        """The training loader, `start` samples into the (infinite, seeded) order."""
        from spatial_forcing.data.dataset import make_loader

        self.sampler.start = start
        return make_loader(self.dataset, self.sampler, batch_size=self.cfg.batch_size,
                           num_workers=self.cfg.num_workers)

    # ---------------------------------------------------------------- one step
    def loss_on(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one micro-batch and its metrics (detached tensors: no host sync here)."""
        cfg = self.cfg
        inputs = prepare_batch(batch, cfg.cameras, self.policy.processor, self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model(inputs.policy, align_layer=cfg.align.student_layer if self.sf else None)
            loss = out.action_loss
            metrics = dict(out.metrics)
            if self.sf is not None:
                with torch.no_grad():
                    grid = self.teacher.features(**inputs.teacher)
                align, sf_metrics = self.sf(out.visual_hidden, grid.feats, grid.valid)
                loss = loss + cfg.align.coeff * align
                metrics.update(sf_metrics)
        metrics["loss"] = loss.detach()
        return loss, metrics

    def train_step(self, batches: list[dict]) -> dict[str, float]:
        self.model.train()
        sums: dict[str, torch.Tensor] = {}
        for batch in batches:
            loss, metrics = self.loss_on(batch)
            if not torch.isfinite(loss):
                raise TrainingError(f"step {self.step + 1}: loss is {loss.item()} "
                                    f"({ {k: float(v) for k, v in metrics.items()} }); the last good "
                                    f"checkpoint is {self._last_checkpoint()}")
            (loss / len(batches)).backward()
            for k, v in metrics.items():
                sums[k] = sums[k] + v.float() if k in sums else v.float()
        means = {k: v / len(batches) for k, v in sums.items()}
        if self.cfg.grad_clip > 0:
            means["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        names = list(means)  # one device->host copy for every metric of the step
        totals = dict(zip(names, torch.stack([means[k] for k in names]).tolist()))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        totals["lr"] = self.optimizer.param_groups[0]["lr"]
        return totals

    @torch.no_grad()
    def validate(self, max_samples: int = 256) -> dict[str, float]:
        """Current-action and future-action L1 (normalised units) on the held-out episodes."""
        from torch.utils.data import DataLoader

        if self.val_dataset is None:
            return {}
        self.model.eval()
        n = min(len(self.val_dataset), max_samples)
        idx = np.linspace(0, len(self.val_dataset) - 1, n).round().astype(int).tolist()
        loader = DataLoader(torch.utils.data.Subset(self.val_dataset, idx), batch_size=self.cfg.batch_size)
        sums = {"val_l1_current": 0.0, "val_l1_future": 0.0}
        for batch in loader:
            inputs = prepare_batch(batch, self.cfg.cameras, self.policy.processor, self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                out = self.model(inputs.policy)
            k = len(batch[ACTION])
            sums["val_l1_current"] += float(out.metrics.get("l1_current", out.action_loss)) * k
            sums["val_l1_future"] += float(out.metrics.get("l1_future", out.action_loss)) * k
        self.model.train()
        return {key: v / n for key, v in sums.items()}

    # ---------------------------------------------------------------- checkpoints
    def _last_checkpoint(self) -> str:
        found = list_checkpoints(self.cfg.output_dir)
        return str(found[-1][1]) if found else "none"

    def save(self) -> Path:
        from safetensors.torch import save_file

        def write(folder: Path) -> None:
            self.cfg.save(folder / "train_config.json")
            export = self.policy
            if self.cfg.lora_rank:
                trained = {n: p.detach().float().cpu().contiguous() for n, p in _trainable(self.model).items()}
                save_file(trained, str(folder / "trainable.safetensors"))
                export = _merged_copy(self.policy, self.model)
            export.save_pretrained(folder / "policy")
            if self.sf is not None:
                save_file({k: v.detach().float().cpu().contiguous() for k, v in self.sf.projector.state_dict().items()},
                          str(folder / "align_projector.safetensors"))
            torch.save({"step": self.step, "consumed": self.consumed, "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "rng": rng_state(),
                        "sampler": self.sampler.state_dict(self.consumed)}, folder / "trainer_state.pt")

        return save_checkpoint(self.cfg.output_dir, self.step, write, self.cfg.keep_last)

    def _load_state(self, folder: Path) -> None:
        from safetensors.torch import load_file

        if self.cfg.lora_rank:
            trained = load_file(str(folder / "trainable.safetensors"))
            own = _trainable(self.model)
            if set(trained) != set(own):
                raise ValueError(f"{folder}/trainable.safetensors does not match this model's trained tensors "
                                 f"(missing {sorted(set(own) - set(trained))[:5]}, extra {sorted(set(trained) - set(own))[:5]})")
            with torch.no_grad():
                for n, p in own.items():
                    p.copy_(trained[n])
        else:
            self.policy.model.load_state_dict(load_file(str(folder / "policy" / "model.safetensors")))
        if self.sf is not None:
            self.sf.projector.load_state_dict(load_file(str(folder / "align_projector.safetensors")))
        state = torch.load(folder / "trainer_state.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.step, self.consumed = int(state["step"]), int(state["consumed"])
        set_rng_state(state["rng"])

    # ---------------------------------------------------------------- the run
    def fit(self) -> dict[str, Any]:
        from spatial_forcing.train.logging import RunLogger

        cfg = self.cfg
        logger = RunLogger(cfg, enabled=cfg.logger)
        loader = iter(self._make_loader(self.consumed))
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        t0, start_step = time.perf_counter(), self.step
        first: dict[str, float] | None = None
        metrics: dict[str, float] = {}
        val: dict[str, float] = {}
        last_ckpt = None
        try:
            while self.step < cfg.max_steps:
                batches = [next(loader) for _ in range(cfg.grad_accum)]
                self.consumed += sum(len(b[ACTION]) for b in batches)
                metrics = self.train_step(batches)
                first = first or dict(metrics)
                elapsed = time.perf_counter() - t0
                metrics["samples_per_s"] = (self.step - start_step) * cfg.batch_size * cfg.grad_accum / max(elapsed, 1e-9)
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    logger.log(self.step, metrics)
                if cfg.val_every and self.step % cfg.val_every == 0:
                    val = self.validate()
                    logger.log(self.step, val)
                if self.step % cfg.save_every == 0 or self.step == cfg.max_steps:
                    last_ckpt = self.save()
                if bar is not None:
                    shown = {k: metrics[k] for k in ("loss", "action_loss", "align_loss") if k in metrics}
                    bar.set_postfix({**{k: f"{v:.4f}" for k, v in shown.items()}, "lr": f"{metrics['lr']:.2e}",
                                     "samples/s": f"{metrics['samples_per_s']:.1f}"})
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            logger.close()
        if cfg.val_every and not val:
            val = self.validate()
        return {"steps": self.step, "seconds": time.perf_counter() - t0, "first": first or {}, "last": metrics,
                "validation": val, "checkpoint": str(last_ckpt) if last_ckpt else self._last_checkpoint(),
                "output_dir": cfg.output_dir}


def _merged_copy(policy: Any, peft_model: Any) -> Any:
    """The policy with LoRA folded in, built on CPU one tensor at a time (`W + get_delta_weight`): the
    training model is left as it is, and no second copy of it lands on the accelerator."""
    from peft.tuners.lora import LoraLayer

    from spatial_forcing.policies.oft.policy import OFTPolicy
    from spatial_forcing.policies.oft.weights import build_model

    base = peft_model.get_base_model()
    deltas = {f"{name}.weight": module.get_delta_weight(module.active_adapters[0]).detach()
              for name, module in base.named_modules() if isinstance(module, LoraLayer)}
    state = {}
    for key, value in base.state_dict().items():
        if "lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        value = value.detach()
        if key in deltas:
            value = value + deltas.pop(key).to(value.dtype)
        state[key] = value.to("cpu", copy=True)
    return OFTPolicy(build_model(policy.config, state), policy.processor, policy.stats, policy.unnorm_key)


def format_summary(summary: dict[str, Any]) -> str:
    first, last = summary["first"], summary["last"]
    lines = [f"trained {summary['steps']} steps in {summary['seconds']:.1f} s"]
    for key in ("loss", "action_loss", "align_loss"):
        if key in last:
            lines.append(f"  {key:<12} {first.get(key, float('nan')):.4f} -> {last[key]:.4f}")
    if "samples_per_s" in last:
        lines.append(f"  throughput   {last['samples_per_s']:.1f} samples/s")
    for key, value in summary["validation"].items():
        lines.append(f"  {key:<12} {value:.4f}")
    lines.append(f"checkpoint: {summary['checkpoint']}")
    return "\n".join(lines)
