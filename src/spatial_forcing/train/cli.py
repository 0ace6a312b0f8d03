"""`sf train`: options generated from `TrainConfig` (and `AlignConfig` as ``--align-*``), so every field
of a preset can be overridden from the command line."""

from __future__ import annotations

import argparse
import json
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


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    if args.preset and args.config:
        raise ValueError("--preset and --config are exclusive")
    base = (TrainConfig.load(args.config).to_dict() if args.config
            else TrainConfig.preset(args.preset).to_dict() if args.preset else TrainConfig().to_dict())
    for key, value in vars(args).items():
        if key.startswith("cfg_"):
            name = key[4:]
            if name == "policy_overrides":
                pairs = dict(base.get(name) or {})
                for item in value:
                    k, sep, v = item.partition("=")
                    if not sep:
                        raise ValueError(f"--policy-override {item!r}: expected KEY=VALUE")
                    try:
                        pairs[k] = json.loads(v)
                    except json.JSONDecodeError:
                        pairs[k] = v
                value = pairs
            base[name] = value
        elif key.startswith("align_"):
            base["align"] = {**base["align"], key[6:]: value}
    return TrainConfig.from_dict(base)


def cmd_train(args: argparse.Namespace) -> int:
    from spatial_forcing.train import distributed
    from spatial_forcing.train.loop import Trainer, format_summary

    cfg = config_from_args(args)
    trainer = Trainer(cfg, resume=args.resume, progress=not args.quiet)
    if trainer.ctx.main:  # under torchrun, one process speaks
        trained = sum(p.numel() for p in trainer.params)
        print(f"run {cfg.output_dir}: policy {cfg.policy}, {'SF with ' + cfg.teacher if cfg.sf else 'no SF'}, "
              f"{len(trainer.dataset)} training samples, {trained:,} trained parameters"
              f"{' (this shard)' if distributed.is_sharded(trainer.wrapped) else ''}, {trainer.device}, "
              f"{trainer.ctx.world} process(es)"
              + (f", resuming at step {trainer.step} from {trainer.resume_from}" if trainer.resume_from else ""))
    summary = trainer.fit()
    if trainer.ctx.main:
        print(format_summary(summary))
    distributed.shutdown()
    return 0
