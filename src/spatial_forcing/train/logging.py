"""Run logs: TensorBoard (default, embedded, no account), Weights & Biases when asked, or none."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class RunLogger:
    def __init__(self, config: Any, enabled: str = "tensorboard") -> None:
        self.kind = enabled
        self._tb = self._wandb = None
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
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(f"train/{key}" if not key.startswith("val_") else f"val/{key[4:]}", value, step)
        if self._wandb is not None:
            self._wandb.log(dict(metrics), step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
