"""Data order: a sampler whose order depends only on (seed, epoch), so a resumed run sees the same batches."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """Shuffled (or file-order) indices; call set_epoch(e) before each epoch."""

    def __init__(self, num_rows: int, seed: int = 0, shuffle: bool = True):
        self.num_rows, self.seed, self.shuffle, self.epoch = num_rows, seed, shuffle, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.num_rows))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_rows, generator=generator).tolist())

    def __len__(self):
        return self.num_rows
