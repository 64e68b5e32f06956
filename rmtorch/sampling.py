"""Data order: samplers whose order depends only on (seed, epoch), so a resumed run sees the same batches."""

from __future__ import annotations

from collections.abc import Sequence

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


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of rows of similar length (less padding), in shuffled order, for DataLoader(batch_sampler=...).

    Takes the epoch's order from `sampler` (an EpochSampler), sorts each window of `batch_size * window_batches`
    rows longest first, cuts it into batches and shuffles the batches (with shuffle on), so batch composition
    still changes from epoch to epoch. Accelerate's set_epoch reaches the inner sampler through `.sampler`.
    """

    def __init__(self, sampler: EpochSampler, lengths: Sequence[int], batch_size: int, window_batches: int = 50):
        if len(lengths) != len(sampler):
            raise ValueError(f"LengthGroupedBatchSampler got {len(lengths)} lengths for {len(sampler)} rows.")
        self.sampler, self.lengths, self.batch_size, self.window = sampler, list(lengths), batch_size, batch_size * window_batches

    def set_epoch(self, epoch: int):
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        order = list(self.sampler)
        batches = []
        for window_start in range(0, len(order), self.window):
            window = sorted(order[window_start : window_start + self.window], key=lambda row: -self.lengths[row])
            batches += [window[i : i + self.batch_size] for i in range(0, len(window), self.batch_size)]
        if self.sampler.shuffle:
            generator = torch.Generator().manual_seed(self.sampler.seed + self.sampler.epoch)
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return iter(batches)

    def __len__(self):
        full_windows, rest = divmod(len(self.sampler), self.window)
        return full_windows * (self.window // self.batch_size) + -(-rest // self.batch_size)
