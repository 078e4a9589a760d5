"""Fast, resumable DataLoaders over in-memory tensors (what the built-in jobs use).

`tensor_loader(x, y, batch_size=64, shuffle=True, seed=s)` yields `(x[idx], y[idx])`
batches without per-example collation: the sampler yields whole index batches and the
dataset indexes the tensors with them. With `shuffle`, epoch e's order is a pure function
of (seed, e) (`ShuffledBatches.set_epoch`), so a run resumed mid-epoch replays the same
batches, and the global RNG is never touched.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class TensorBatches(Dataset):
    """Tensors of equal first dimension; indexing with an index batch returns the batch."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        if not tensors or any(len(t) != len(tensors[0]) for t in tensors):
            raise ValueError(f"tensors must be non-empty and of one length, got "
                             f"{[len(t) for t in tensors]}")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t[index] for t in self.tensors)


class ShuffledBatches(Sampler[torch.Tensor]):
    """Index batches of `batch_size` over `n` examples, reshuffled per epoch from (seed, epoch)."""

    def __init__(self, n: int, batch_size: int, *, seed: int, shuffle: bool = True) -> None:
        if n < 1 or batch_size < 1:
            raise ValueError(f"n={n} and batch_size={batch_size} must be >= 1")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        if not self.shuffle:
            return iter(torch.arange(self.n).split(self.batch_size))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=gen).split(self.batch_size))


def tensor_loader(x: torch.Tensor, y: torch.Tensor, *, batch_size: int, shuffle: bool,
                  seed: int = 0) -> DataLoader:
    """A DataLoader of `(x[idx], y[idx])` batches (see the module docstring)."""
    return DataLoader(TensorBatches(x, y), sampler=ShuffledBatches(len(x), batch_size, seed=seed,
                                                                   shuffle=shuffle),
                      batch_size=None)
