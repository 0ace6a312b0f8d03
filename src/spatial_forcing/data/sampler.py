"""A deterministic, resumable, DDP-aware sampler for step-based training.

The order is a pure function of `(seed, epoch)`: epoch `k` is `randperm(n, seed + k)` (or
`arange(n)`), each rank takes every `world_size`-th index of it. The sampler streams indices
forever from `start` (samples already consumed by this rank), so resuming is exact: save the
number of samples consumed, pass it back as `start`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    def __init__(self, size: int, seed: int = 0, shuffle: bool = True, start: int = 0,
                 rank: int | None = None, world_size: int | None = None) -> None:
        if size < 1:
            raise ValueError(f"cannot sample from an empty dataset (size {size})")
        if rank is None or world_size is None:
            ready = dist.is_available() and dist.is_initialized()
            rank = dist.get_rank() if ready else 0
            world_size = dist.get_world_size() if ready else 1
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.per_rank = size // world_size  # equal shares: every rank does the same number of steps
        if self.per_rank < 1:
            raise ValueError(f"{size} samples cannot be shared by {world_size} ranks")
        self.start = start

    def order(self, epoch: int) -> torch.Tensor:
        """This rank's indices for `epoch`."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.size, generator=g)
        else:
            perm = torch.arange(self.size)
        return perm[self.rank::self.world_size][:self.per_rank]

    def position(self, consumed: int) -> tuple[int, int]:
        """(epoch, offset) after `consumed` samples of this rank."""
        return divmod(consumed, self.per_rank)

    def state_dict(self, consumed: int) -> dict:
        return {"seed": self.seed, "size": self.size, "shuffle": self.shuffle, "world_size": self.world_size,
                "consumed": consumed}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "size", "shuffle", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state was saved with {key}={state[key]}, this run has "
                                 f"{key}={getattr(self, key)}: the data order would not continue")
        self.start = int(state["consumed"])

    def __iter__(self) -> Iterator[int]:
        epoch, offset = self.position(self.start)
        while True:
            for i in self.order(epoch)[offset:].tolist():
                yield i
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:
        return self.per_rank
