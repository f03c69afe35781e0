"""The fixed, seeded subset of the training set that a sharpness measure runs on.

Drawn once from ``trainer.train_dataloader``'s (map-style) dataset with a seed, its indices kept in the
callback state so a resumed run measures the same examples; collated with the loader's ``collate_fn``
under the seeded global RNGs, so dataset transforms draw the same values whenever the batches are built.
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Subset

BatchToInputs = Callable[[Any], tuple[Any, Any]]
"""Converts a collated training batch into ``(inputs, targets)``."""

Sampling = Literal["subset", "replacement"]


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG and Python's/NumPy's global RNGs (dataset transforms may draw from them), then restore.

    The subset's batches are then the same whenever they are drawn (first measurement, early check, resume).
    """
    python = random.getstate()
    numpy = sys.modules.get("numpy")
    numpy_state = numpy.random.get_state() if numpy is not None else None
    with torch.random.fork_rng(devices=[]):
        try:
            torch.manual_seed(seed)
            random.seed(seed)
            if numpy is not None:
                numpy.random.seed(seed)
            yield
        finally:
            random.setstate(python)
            if numpy_state is not None:
                numpy.random.set_state(numpy_state)


def training_loader(loader: Any, kind: str) -> DataLoader:
    """``trainer.train_dataloader`` when it is a DataLoader over a map-style dataset; ``TypeError`` otherwise."""
    if not isinstance(loader, DataLoader):
        raise TypeError(
            f"{kind} needs the training DataLoader to draw its fixed subset from; "
            f"trainer.train_dataloader is {type(loader).__name__}"
        )
    dataset = loader.dataset
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise TypeError(f"{kind} needs a map-style training dataset (with len and indexing)")
    return loader


def draw_indices(n: int, num_samples: int | None, sampling: Sampling, seed: int) -> list[int]:
    """``num_samples`` indices of ``range(n)`` (all when None), distinct (``"subset"``) or i.i.d. draws."""
    generator = torch.Generator().manual_seed(seed)
    if sampling == "replacement":
        count = n if num_samples is None else num_samples
        return torch.randint(n, (count,), generator=generator).tolist()
    count = n if num_samples is None else min(num_samples, n)
    return torch.randperm(n, generator=generator)[:count].tolist()


def check_indices(indices: list[int], n: int, kind: str) -> None:
    """Refuse stored indices that do not fit the training set any more (it changed since they were drawn)."""
    if indices and max(indices) >= n:
        raise ValueError(
            f"{kind}: the stored subset indexes {max(indices)} but the training set has {n} examples "
            "(it changed since the subset was drawn)"
        )


def collate_subset(loader: DataLoader, indices: list[int], batch_size: int, seed: int) -> list[Any]:
    """The examples ``indices`` of the loader's dataset in batches of ``batch_size``, collated under ``seed``."""
    with seeded_rng(seed):
        subset = DataLoader(
            Subset(loader.dataset, indices),
            batch_size=batch_size,
            shuffle=False,
            collate_fn=loader.collate_fn,
            num_workers=0,
        )
        return list(subset)


def convert_batches(batches: list[Any], batch_to_inputs: BatchToInputs | None, owner: str) -> list[Any]:
    """Each batch through ``batch_to_inputs`` (unchanged without it); a failure names ``owner``."""
    if batch_to_inputs is None:
        return batches
    try:
        return [batch_to_inputs(b) for b in batches]
    except Exception as err:
        raise ValueError(
            f"Invalid batch_to_inputs: {batch_to_inputs!r} failed on a training batch of "
            f"{owner}: {type(err).__name__}: {err}"
        ) from err
