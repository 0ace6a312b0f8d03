"""Started by `torchrun` from tests/test_train_distributed.py (not a test module itself).

    distributed_worker.py CONFIG OUT [--grads] [--resume latest]

--grads: one micro-batch forward + backward through the wrapped model; rank 0 saves every trained
parameter's gradient (gathered whole under FSDP) to OUT/grads.pt. Then every run trains with
`Trainer.fit()` and rank 0 writes OUT/summary.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import faulthandler

import torch

from spatial_forcing.train import distributed
from spatial_forcing.train.config import TrainConfig
from spatial_forcing.train.loop import Trainer


def trained_grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in trainer.module.named_parameters():
        if p.requires_grad:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            out[name] = g.detach().clone()
    return out


def main(argv: list[str]) -> None:
    faulthandler.enable(all_threads=True)
    cfg, out = TrainConfig.load(argv[0]), Path(argv[1])
    resume = argv[argv.index("--resume") + 1] if "--resume" in argv else None
    if "--grads" in argv:
        trainer = Trainer(cfg, progress=False)
        trainer.accumulate([next(iter(trainer._make_loader(0)))])
        grads = trained_grads(trainer)
        if trainer.ctx.main:
            torch.save(grads, out / "grads.pt")
        del trainer
    summary = Trainer(cfg, resume=resume, progress=False).fit()
    if distributed.world_from_env() == 1 or torch.distributed.get_rank() == 0:
        (out / "summary.json").write_text(json.dumps(summary, default=str))
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
