"""`sf train`: options generated from `TrainConfig` (and `AlignConfig` as ``--align-*``), so every field
of a preset can be overridden from the command line."""

from __future__ import annotations

import argparse
import json
import re
import typing
from dataclasses import MISSING, fields
from typing import Any

from spatial_forcing.align.config import AlignConfig
from spatial_forcing.train.config import PRESETS, TrainConfig


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_field(p: argparse.ArgumentParser, name: str, typ: Any, dest: str, help_text: str) -> None:
    origin = typing.get_origin(typ)
    if typ is bool:
        p.add_argument(_option(name), dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                       help=help_text)
    elif origin is list:
        (item,) = typing.get_args(typ)
        p.add_argument(_option(name), dest=dest, nargs="+", type=item, default=argparse.SUPPRESS, help=help_text,
                       metavar=name.upper())
    elif origin is dict:
        p.add_argument(_option(name[:-1] if name.endswith("s") else name), dest=dest, action="append",
                       metavar="KEY=VALUE", default=argparse.SUPPRESS, help=help_text + " (repeatable, JSON values)")
    else:
        p.add_argument(_option(name), dest=dest, type=typ, default=argparse.SUPPRESS, help=help_text,
                       metavar=name.upper())


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from a named recipe; options below override it")
    p.add_argument("--config", help="start from a saved train_config.json instead of a preset")
    p.add_argument("--resume", help="'latest' (newest complete checkpoint of --output-dir) or a checkpoint folder")
    p.add_argument("--overwrite", action="store_true",
                   help="train into an --output-dir that holds another run, replacing its checkpoints and logs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        if f.name == "align":
            continue
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        _add_field(p, f.name, hints[f.name], f"cfg_{f.name}", f"default {default!r}")
    align_hints = typing.get_type_hints(AlignConfig)
    for f in fields(AlignConfig):
        _add_field(p, f"align_{f.name}", align_hints[f.name], f"align_{f.name}", f"default {f.default!r}")


# Options that only matter when another field has some value: given explicitly while that field says
# otherwise, they would change nothing, so they are refused (a preset may carry them; that is fine).
_NEEDS: list[tuple[tuple[str, ...], Any, str]] = [
    (("lora_alpha",), lambda c: c.lora_rank > 0, "--lora-rank > 0"),
    (("milestones", "gamma"), lambda c: c.schedule == "multistep", "--schedule multistep"),
    (("warmup_steps",), lambda c: c.schedule != "multistep", "--schedule cosine or constant"),
    (("min_lr", "decay_steps"), lambda c: c.schedule == "cosine", "--schedule cosine"),
    (("grad_accum",), lambda c: c.global_batch_size == 0, "--global-batch-size 0 (it sets the accumulation)"),
    (("val_every",), lambda c: c.val_episodes > 0, "--val-episodes > 0"),
    (("teacher", "teacher_weights", "teacher_cache"), lambda c: c.sf, "--sf"),
    (("wandb_project", "wandb_entity", "wandb_group", "wandb_tags"), lambda c: c.logger == "wandb", "--logger wandb"),
    (("run_name",), lambda c: c.logger != "none", "--logger tensorboard or wandb"),
    (("intrinsics",), lambda c: c.sf and c.teacher == "geometry", "--teacher geometry (with --sf)"),
]


def _refuse_unused(cfg: TrainConfig, given: list[str]) -> None:
    for names, needed, condition in _NEEDS:
        for name in names:
            if name in given and not needed(cfg):
                raise ValueError(f"--{name.replace('_', '-')}: has no effect without {condition}; "
                                 f"drop it or set {condition.split(' (')[0]}")
    if not cfg.sf:
        unused = [g for g in given if g.startswith("align.")]
        if unused:
            raise ValueError(f"--{unused[0].replace('.', '-').replace('_', '-')}: has no effect with --no-sf; "
                             f"drop it or train with --sf")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    if args.preset and args.config:
        raise ValueError("--preset and --config are exclusive")
    base = (TrainConfig.load(args.config).to_dict() if args.config
            else TrainConfig.preset(args.preset).to_dict() if args.preset else TrainConfig().to_dict())
    given = []
    for key, value in vars(args).items():
        if key.startswith("cfg_"):
            name = key[4:]
            given.append(name)
            if isinstance(base.get(name), dict):  # --policy-override / --intrinsic KEY=VALUE
                pairs = dict(base.get(name) or {})
                for item in value:
                    k, sep, v = item.partition("=")
                    if not sep:
                        raise ValueError(f"--{name[:-1].replace('_', '-')} {item!r}: expected KEY=VALUE")
                    try:
                        pairs[k] = json.loads(v)
                    except json.JSONDecodeError:
                        pairs[k] = v
                value = pairs
            base[name] = value
        elif key.startswith("align_"):
            base["align"] = {**base["align"], key[6:]: value}
            given.append(f"align.{key[6:]}")
    try:
        cfg = TrainConfig.from_dict(base)
    except ValueError as exc:  # name the option the user typed rather than the field
        m = re.match(r"^(?:TrainConfig\.(?:align\.)?|AlignConfig\.)(\w+)(.*)$", str(exc), flags=re.S)
        field = m and next((g for g in given if g.split(".")[-1] == m.group(1)), None)
        if not field:
            raise
        raise ValueError(f"--{field.replace('.', '-').replace('_', '-')}{m.group(2)}") from None
    _refuse_unused(cfg, given)
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    from spatial_forcing.train import distributed
    from spatial_forcing.train.loop import Trainer, format_summary

    cfg = config_from_args(args)
    trainer = Trainer(cfg, resume=args.resume, progress=not args.quiet, overwrite=args.overwrite)
    if trainer.ctx.main:  # under torchrun, one process speaks
        trained = sum(p.numel() for p in trainer.params)
        print(f"run {cfg.output_dir}: policy {cfg.policy}, {'SF with ' + cfg.teacher if cfg.sf else 'no SF'}, "
              f"{len(trainer.dataset)} training samples, {trained:,} trained parameters"
              f"{' (this shard)' if distributed.is_sharded(trainer.wrapped) else ''}, {trainer.device}; "
              f"batch {cfg.batch_size} per process x {trainer.grad_accum} accumulated x {trainer.ctx.world} "
              f"process(es) = global batch {cfg.batch_size * trainer.grad_accum * trainer.ctx.world}"
              + (f", resuming at step {trainer.step} from {trainer.resume_from}" if trainer.resume_from else ""))
    summary = trainer.fit()
    if trainer.ctx.main:
        print(format_summary(summary))
    distributed.shutdown()
    return 0
