"""Loader helpers shared by the data modules: a resumable, seeded shuffle and whole-set batches."""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler


class EpochShuffleSampler(RandomSampler):
    """A random permutation per epoch drawn from ``seed + epoch``: the same order on a resumed run.

    Lightning calls :meth:`set_epoch` at every epoch; under DDP it swaps this sampler (a
    ``RandomSampler``) for a seeded ``DistributedSampler``, which is just as reproducible.
    The global RNG is never touched.
    """

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    **kwargs,
) -> DataLoader:
    """A DataLoader whose shuffling and worker seeds come from ``seed`` (never the global RNG)."""
    sampler = EpochShuffleSampler(dataset, seed) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )


def first(batch: list[Any]) -> Any:
    """Collate a one-element batch into its element (a whole-set batch or a graph, not a list of one)."""
    return batch[0]


class FullBatch(Dataset):
    """``steps`` items, each the whole training set ``tensors``: full-batch gradient steps, ``steps`` per epoch.

    Load it with batch size 1 and :func:`first` as ``collate_fn``; every batch is then ``tensors``
    itself (no copy). Measures that draw a subset of the training set get whole-set batches too.
    """

    def __init__(self, tensors: tuple[Tensor, ...], steps: int) -> None:
        self.tensors = tensors
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        if not 0 <= index < self.steps:
            raise IndexError(f"FullBatch has {self.steps} items; got index {index}")
        return self.tensors
