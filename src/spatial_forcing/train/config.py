"""`TrainConfig`: one typed record for a training run, with named presets (SPATIAL_FORCING.md recipes).

Every field is a command-line option of `sf train` (``--lr 1e-4``, ``--no-sf``, ``--align-layer 12``);
a preset fills the fields first, the command line overrides them, and the resolved record is saved in
every checkpoint (``train_config.json``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from spatial_forcing.align.config import AlignConfig

SCHEDULES = ("multistep", "cosine", "constant")
TEACHERS = ("vggt", "geometry")
PRECISIONS = ("auto", "fp32", "bf16")
LOGGERS = ("tensorboard", "wandb", "none")
PARALLEL = ("ddp", "fsdp")
SUITES = ("spatial", "object", "goal", "10")


@dataclass
class TrainConfig:
    # -- what to train ------------------------------------------------------------------------
    policy: str = "mini"  # an OFT preset (random init) or a checkpoint folder / hub id to fine-tune
    policy_overrides: dict[str, Any] = field(default_factory=dict)  # OFTConfig fields (presets only)
    dataset: str = ""  # a LeRobot v3 folder or an RLDS folder
    standardize: str = "libero"  # reader transform of state/action ("libero": OFT's gripper convention) or ""
    cameras: list[str] = field(default_factory=lambda: ["agentview", "wrist"])
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: int = 16
    # -- Spatial Forcing ------------------------------------------------------------------------
    sf: bool = True
    teacher: str = "geometry"
    teacher_weights: str = ""  # vggt: model.pt / safetensors / folder
    teacher_cache: str = ""  # a store of `sf cache-teacher` ("auto": <dataset>/teacher_cache/<teacher>); "" = online
    align: AlignConfig = field(default_factory=AlignConfig)
    # -- data -----------------------------------------------------------------------------------
    chunk_mode: str = "drop_last"
    augment: bool = True
    num_workers: int = 2
    val_episodes: int = 0  # episodes held out for validation (the last ones)
    # -- optimisation ---------------------------------------------------------------------------
    batch_size: int = 8  # per process
    grad_accum: int = 1
    global_batch_size: int = 0  # > 0: sets grad_accum = global / (batch_size x processes), which must divide
    lr: float = 5e-4
    weight_decay: float = 0.01
    schedule: str = "multistep"
    milestones: list[int] = field(default_factory=lambda: [100_000])
    gamma: float = 0.1
    warmup_steps: int = 0
    max_steps: int = 150_000
    grad_clip: float = 0.0  # 0: off; covers every trained parameter, the projector included
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    parallel: str = "ddp"  # under torchrun: "ddp" (LoRA, small models) or "fsdp" (full fine-tuning, sharded)
    grad_checkpointing: bool = False  # recompute the HF blocks' activations in backward (less memory)
    seed: int = 7
    # -- bookkeeping ----------------------------------------------------------------------------
    output_dir: str = "runs/sf"
    save_every: int = 10_000
    keep_last: int = 3
    val_every: int = 0
    log_every: int = 10
    logger: str = "tensorboard"
    device: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.align, dict):
            self.align = AlignConfig.from_dict(self.align)
        checks = [
            (self.schedule in SCHEDULES, f"schedule: expected one of {SCHEDULES}, found {self.schedule!r}"),
            (self.teacher in TEACHERS, f"teacher: expected one of {TEACHERS}, found {self.teacher!r}"),
            (self.precision in PRECISIONS, f"precision: expected one of {PRECISIONS}, found {self.precision!r}"),
            (self.parallel in PARALLEL, f"parallel: expected one of {PARALLEL}, found {self.parallel!r}"),
            (not (self.parallel == "fsdp" and self.lora_rank), "parallel: fsdp shards full fine-tuning; a LoRA run "
             "trains a few tensors and uses ddp"),
            (self.global_batch_size >= 0, f"global_batch_size must be >= 0, found {self.global_batch_size}"),
            (self.logger in LOGGERS, f"logger: expected one of {LOGGERS}, found {self.logger!r}"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (self.max_steps >= 1, f"max_steps must be >= 1, found {self.max_steps}"),
            (self.lora_rank >= 0, f"lora_rank must be >= 0, found {self.lora_rank}"),
            (self.keep_last >= 1, f"keep_last must be >= 1, found {self.keep_last}"),
            (self.save_every >= 1, f"save_every must be >= 1, found {self.save_every}"),
            (self.grad_clip >= 0, f"grad_clip must be >= 0, found {self.grad_clip}"),
            (self.val_episodes >= 0, f"val_episodes must be >= 0, found {self.val_episodes}"),
            (len(self.cameras) >= 1, "cameras: expected at least one camera"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"TrainConfig.{message}")

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if not k.startswith("_")}  # "_notes": written by the trainer, informative
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    def save(self, path: str | Path, notes: dict[str, str] | None = None) -> None:
        doc = {**self.to_dict(), **({"_notes": notes} if notes else {})}
        Path(path).write_text(json.dumps(doc, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TrainConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown training preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


# ------------------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------------------

def _oft(suite: str, sf: bool) -> dict[str, Any]:
    """The published OpenVLA-OFT(+SF) LIBERO recipe (SPATIAL_FORCING.md §10, OPENVLA_OFT.md §12)."""
    return dict(policy="openvla/openvla-7b", policy_overrides={"visual_token_shift": 1} if sf else {},
                dataset=f"data/libero_{suite}_no_noops", cameras=["agentview", "wrist"], lora_rank=32,
                lora_alpha=16, sf=sf, teacher="vggt", teacher_weights="facebook/VGGT-1B",
                align=AlignConfig.preset("openvla-oft-sf").to_dict(), batch_size=8, lr=5e-4,
                schedule="multistep", milestones=[100_000], gamma=0.1, max_steps=150_000, augment=True,
                chunk_mode="drop_last", output_dir=f"runs/{'oft-sf' if sf else 'oft'}-libero-{suite}",
                save_every=10_000)


def _mini(suite: str, sf: bool) -> dict[str, Any]:
    """The compact student on one GPU: same data and loss, a 4M-parameter policy, full fine-tuning."""
    return dict(policy="mini", dataset=f"data/libero_{suite}_no_noops", lora_rank=0, sf=sf, teacher="vggt",
                teacher_weights="facebook/VGGT-1B",
                align={**AlignConfig.preset("openvla-oft-sf").to_dict(), "student_layer": 2},
                batch_size=64, lr=3e-4, schedule="cosine", warmup_steps=500, max_steps=30_000,
                output_dir=f"runs/{'mini-sf' if sf else 'mini'}-libero-{suite}", save_every=5_000)


PRESETS: dict[str, dict[str, Any]] = {}
for _suite in SUITES:
    PRESETS[f"oft-sf-libero-{_suite}"] = _oft(_suite, True)
    PRESETS[f"oft-libero-{_suite}"] = _oft(_suite, False)
    PRESETS[f"mini-sf-libero-{_suite}"] = _mini(_suite, True)
    PRESETS[f"mini-libero-{_suite}"] = _mini(_suite, False)
PRESETS["quickstart"] = dict(
    policy="mini", dataset="outputs/libero_expert", lora_rank=0, sf=True, teacher="geometry",
    align={**AlignConfig.preset("openvla-oft-sf").to_dict(), "student_layer": 2, "use_pos_embed": False},
    batch_size=16, lr=1e-3, schedule="cosine", warmup_steps=20, max_steps=300, num_workers=2,
    val_episodes=2, val_every=100, output_dir="runs/quickstart", save_every=100, keep_last=2, log_every=10)
