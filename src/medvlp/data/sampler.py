"""A resumable, rank-aware sample stream: training order and randomness as a pure function of the seed.

Training reads one long stream of *sample keys*. Key ``k`` names pass ``k // n`` over the data and, inside it,
position ``k % n`` of that pass's seeded permutation. The dataset seeds each example's randomness (crop,
caption choice) from its key, and the collator seeds text masking from the batch's first key. So the batch at
step ``s`` is the same whatever the number of workers, and a run resumed from a checkpoint at step ``s``
continues with exactly the batches an uninterrupted run would have seen: the sampler simply starts there (its
length stays that of the whole stream, as the training loop counts the batches before the checkpoint too).
Under distributed training, global batch ``b`` goes to rank ``b % world_size``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class StreamSampler(Sampler[tuple[int, int]]):
    """Yields ``(key, row)`` for ``num_batches`` batches of ``batch_size`` on one rank, from ``start_batch`` on
    (counted in this rank's batches); the dataset reads ``row`` and seeds its randomness from ``key``."""

    def __init__(self, num_rows: int, batch_size: int, num_batches: int, *, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        if num_rows <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.num_rows, self.batch_size, self.num_batches = num_rows, batch_size, num_batches
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.start_batch = 0
        self._perm: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        """The whole stream's length, the batches before ``start_batch`` included: a resumed training loop
        (Lightning's) counts the batches it already ran from its checkpoint and stops at this length, so a
        length that shrank by ``start_batch`` would end the run ``start_batch`` steps early."""
        return self.num_batches * self.batch_size

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perm = epoch, torch.randperm(self.num_rows, generator=g)
            else:
                self._perm = epoch, torch.arange(self.num_rows)
        return self._perm[1]

    def index(self, key: int) -> int:
        epoch, position = divmod(key, self.num_rows)
        return int(self.permutation(epoch)[position])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for local in range(self.start_batch, self.num_batches):
            first = (local * self.world_size + self.rank) * self.batch_size
            for key in range(first, first + self.batch_size):
                yield key, self.index(key)
