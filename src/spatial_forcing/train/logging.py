"""Run logs: TensorBoard (default, embedded, no account), Weights & Biases when asked, or none; and
always `<output_dir>/metrics.jsonl` (one JSON object per logged step, appended: a resumed run
continues the file, and where a step repeats after a crash the later line wins), the plain record
that reports and scripts read.

Names (`resolve_names`): each comes from its option, else from the environment variable W&B itself
reads, else from a default. The run name (`--run-name`, `WANDB_NAME`, the output folder's name) is the
W&B run's name and TensorBoard's: events go to `<output_dir>/tensorboard/<run name>/`, which TensorBoard
lists under that name. The W&B project (`--wandb-project`, `WANDB_PROJECT`, "spatial-forcing"), entity
(`--wandb-entity`, `WANDB_ENTITY`, the account's default), group (`--wandb-group`, `WANDB_RUN_GROUP`) and
tags (`--wandb-tags`, `WANDB_TAGS` comma-separated) follow the same rule. W&B gets the resolved names and
none of those variables (they are hidden while `wandb.init` runs): W&B would otherwise parse WANDB_TAGS
itself and refuse one with an empty entry (`a,b,`) even when `--wandb-tags` is given. The W&B run id is
the training run's id, so a resumed training continues its W&B run."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEFAULT_PROJECT = "spatial-forcing"
NAME_VARIABLES = ("WANDB_NAME", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP", "WANDB_TAGS")
MAX_TAG_CHARS = 64  # W&B's limit


def resolve_names(config: Any, environ: Any = None) -> dict[str, Any]:
    """The run's logging names: option, else environment variable, else default (module docstring)."""
    env = os.environ if environ is None else environ
    tags = list(config.wandb_tags) or [t.strip() for t in env.get("WANDB_TAGS", "").split(",") if t.strip()]
    return {"name": config.run_name or env.get("WANDB_NAME") or Path(config.output_dir).resolve().name,
            "project": config.wandb_project or env.get("WANDB_PROJECT") or DEFAULT_PROJECT,
            "entity": config.wandb_entity or env.get("WANDB_ENTITY") or None,
            "group": config.wandb_group or env.get("WANDB_RUN_GROUP") or None,
            "tags": tags or None}


class RunLogger:
    def __init__(self, config: Any, enabled: str = "tensorboard", jsonl: bool = True,
                 run_id: str | None = None) -> None:
        self.kind = enabled
        self.names = resolve_names(config)
        if enabled == "wandb" and any(len(t) > MAX_TAG_CHARS for t in self.names["tags"] or []):
            raise ValueError(f"WANDB_TAGS: expected comma-separated tags of at most {MAX_TAG_CHARS} characters "
                             f"(W&B's limit), found {self.names['tags']}")  # the options are checked by TrainConfig
        self._tb = self._wandb = self._jsonl = None
        if jsonl:
            Path(config.output_dir).mkdir(parents=True, exist_ok=True)
            self._jsonl = open(Path(config.output_dir) / "metrics.jsonl", "a")
        if enabled == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(config.output_dir) / "tensorboard" / _folder(self.names["name"])))
            self._tb.add_text("config", "```\n" + "\n".join(f"{k}: {v}" for k, v in config.to_dict().items()) + "\n```")
        elif enabled == "wandb":
            try:
                import wandb
            except ImportError as e:  # optional: only when asked for
                raise ImportError("logger 'wandb' needs the wandb package (pip install wandb)") from e
            Path(config.output_dir).mkdir(parents=True, exist_ok=True)
            n = self.names
            with _names_hidden_from_wandb():
                self._wandb = wandb.init(project=n["project"], entity=n["entity"], name=n["name"], group=n["group"],
                                         tags=n["tags"], id=run_id, resume="allow" if run_id else None,
                                         dir=config.output_dir, config=config.to_dict())

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(f"train/{key}" if not key.startswith("val_") else f"val/{key[4:]}", value, step)
        if self._wandb is not None:
            self._wandb.log(dict(metrics), step=step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            import wandb

            self._wandb.finish()
            # finish() only tells W&B's service process the run is over; the service writes the run's last
            # records (offline: the run-*.wandb file) when it closes the stream, which teardown waits for.
            # Without it the file could still hold only its header when training returns (~1 run in 3).
            wandb.teardown()


@contextlib.contextmanager
def _names_hidden_from_wandb() -> Iterator[None]:
    """The WANDB_* name variables removed from the environment for the duration (`resolve_names` has read them)."""
    saved = {k: os.environ.pop(k) for k in NAME_VARIABLES if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _folder(name: str) -> str:
    """A run name as one folder name (TensorBoard shows it as the run)."""
    safe = "".join(c if c.isalnum() or c in "-_.=+@" else "_" for c in name).strip(".")
    return safe or "run"
