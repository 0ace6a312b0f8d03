"""Run logs: TensorBoard (default, embedded, no account), Weights & Biases when asked, or none; and
always `<output_dir>/metrics.jsonl` (one JSON object per logged step, appended: a resumed run
continues the file, and where a step repeats after a crash the later line wins), the plain record
that reports and scripts read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class RunLogger:
    def __init__(self, config: Any, enabled: str = "tensorboard", jsonl: bool = True) -> None:
        self.kind = enabled
        self._tb = self._wandb = self._jsonl = None
        if jsonl:
            Path(config.output_dir).mkdir(parents=True, exist_ok=True)
            self._jsonl = open(Path(config.output_dir) / "metrics.jsonl", "a")
        if enabled == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(config.output_dir) / "tensorboard"))
            self._tb.add_text("config", "```\n" + "\n".join(f"{k}: {v}" for k, v in config.to_dict().items()) + "\n```")
        elif enabled == "wandb":
            try:
                import wandb
            except ImportError as e:  # optional: only when asked for
                raise ImportError("logger 'wandb' needs the wandb package (pip install wandb)") from e
            Path(config.output_dir).mkdir(parents=True, exist_ok=True)
            self._wandb = wandb.init(project="spatial-forcing", name=Path(config.output_dir).name, dir=config.output_dir,
                                     config=config.to_dict())

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
            self._wandb.finish()
