"""Image data sets held in memory as tensors: batches by indexing, augmentation on whole batches, resumable.

:class:`InMemoryImages` holds the decoded, normalised images ``(N, C, H, W)`` and labels ``(N,)``; a batch
is ``images[index]``, ``labels[index]`` and, for a training set, :class:`~flatminima.datamodules._augment.BatchAugment`
on the whole batch. :class:`InMemoryLoader` is a ``DataLoader`` (so Lightning still swaps its sampler for a
``DistributedSampler`` under DDP) whose iterator indexes the data set directly, batch by batch, in the
sampler's order, and which Lightning's fit loop checkpoints and restores mid-epoch through
``state_dict``/``load_state_dict``.

The augmentation of sample ``i`` in epoch ``e`` is a function of ``(seed, e, i)`` only: the draws of the
whole data set for an epoch come from one generator seeded by :func:`epoch_seed` and are indexed by sample,
so neither the batch size, nor the DDP sharding, nor a resume changes them. The epoch is the sampler's
``epoch`` (``EpochShuffleSampler`` and ``DistributedSampler`` both have it; Lightning calls ``set_epoch``).
Outside the training loader (``dataset[i]``, ``dataset.__getitems__`` as ``Subset`` and a plain
``DataLoader`` call it, e.g. the sharpness measures' fixed subsets) the draws come from torch's global
generator, as torchvision's transforms draw theirs: deterministic under a seeded global RNG.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from flatminima.lightning_modules.validation import check_choice, invalid

from ._augment import AugmentDraws, BatchAugment

DataDevice = Literal["auto", "cpu"]
DATA_DEVICES = ("auto", "cpu")
BOOLS = (True, False)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of the augmentation draws of ``epoch``: 63 bits of BLAKE2b of ``"augment:<seed>:<epoch>"``.

    Distinct (seed, epoch) pairs give unrelated streams (a plain ``seed + epoch`` would give seed 1's
    epoch 0 the draws of seed 0's epoch 1).
    """
    digest = hashlib.blake2b(f"augment:{seed}:{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


class ImageBatch(tuple):
    """A collated batch ``(images, labels)`` as :meth:`InMemoryImages.__getitems__` returns it."""


def collate_images(data: Any) -> Any:
    """The loaders' ``collate_fn``: a batch from ``__getitems__`` passes through as a tuple; a list of
    ``dataset[i]`` samples is stacked by torch's ``default_collate``."""
    if isinstance(data, ImageBatch):
        return tuple(data)
    return default_collate(data)


class InMemoryImages(Dataset):
    """Images ``(N, C, H, W)`` and labels ``(N,)`` in memory, optionally augmented batch-wise.

    Args:
        images: Normalised float images.
        labels: Integer labels (LongTensor).
        augment: The training augmentation (None: none).
        seed: The ``data_seed`` of the augmentation draws of the training loader.
    """

    def __init__(self, images: Tensor, labels: Tensor, augment: BatchAugment | None = None, seed: int = 0) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"InMemoryImages: {images.shape[0]} images but {labels.shape[0]} labels")
        self.images, self.labels = images, labels
        self.augment = augment if augment is not None and augment.active else None
        self.seed = seed
        self._draws: tuple[int, AugmentDraws] | None = None

    @property
    def tensors(self) -> tuple[Tensor, Tensor]:
        """``(images, labels)``, as a ``TensorDataset`` names them."""
        return self.images, self.labels

    @property
    def device(self) -> torch.device:
        """Where the images and labels are."""
        return self.images.device

    def to(self, device: torch.device | str) -> InMemoryImages:
        """Move the images and labels to ``device`` (in place; returns self)."""
        self.images, self.labels = self.images.to(device), self.labels.to(device)
        self._draws = None
        return self

    def __len__(self) -> int:
        return self.labels.shape[0]

    def epoch_draws(self, epoch: int) -> AugmentDraws:
        """The augmentation draws of every sample for ``epoch`` (drawn on the CPU, kept for the epoch)."""
        if self._draws is None or self._draws[0] != epoch:
            _, _, h, w = self.images.shape
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            self._draws = (epoch, self.augment.draw(len(self), h, w, generator).to(self.device))
        return self._draws[1]

    def batch(self, index: Tensor, epoch: int | None = None) -> tuple[Tensor, Tensor]:
        """Images and labels of the samples ``index``, augmented with the draws of ``epoch`` (None: torch's
        global generator draws them for this batch)."""
        x, y = self.images.index_select(0, index), self.labels.index_select(0, index)  # faster than x[index]
        if self.augment is not None:
            if epoch is None:
                draws = self.augment.draw(len(index), x.shape[2], x.shape[3]).to(x.device)
            else:
                draws = self.epoch_draws(epoch).take(index)
            x = self.augment(x, draws)
        return x, y

    def __getitems__(self, indices: Sequence[int]) -> ImageBatch:
        """A whole batch at once (torch's fetcher and ``Subset`` call it); collate with :func:`collate_images`."""
        return ImageBatch(self.batch(torch.as_tensor(indices, dtype=torch.long, device=self.device)))

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"InMemoryImages has {len(self)} images; got index {i}")
        x, y = self.__getitems__([i % len(self)])
        return x[0], int(y[0])


class InMemoryLoader(DataLoader):
    """A ``DataLoader`` over :class:`InMemoryImages` that builds each batch by indexing, in the main process.

    The order is the sampler's (``EpochShuffleSampler``, or the ``DistributedSampler`` Lightning puts in its
    place under DDP); augmentation uses the draws of the sampler's ``epoch`` (0 without one). With
    ``with_indices`` a batch is ``(images, labels, index)``, ``index`` the LongTensor of the samples'
    positions in the data set. ``num_workers`` must be 0: a batch is a few index operations.

    Resumable: :meth:`state_dict` records the epoch and the number of batches handed out by the current
    iterator; after :meth:`load_state_dict` the next iterator of that same epoch skips them. Lightning's
    fit loop saves it in every checkpoint. Lightning 2.6's data fetcher does not prefetch from a loader
    with a length (this one has one), so the batches handed out are the batches consumed;
    ``tests/test_image_data.py`` pins it with a mid-epoch resume through a Trainer.
    """

    def __init__(
        self, dataset: InMemoryImages, batch_size: int | None = 1, with_indices: bool = False, **kwargs: Any
    ) -> None:
        if kwargs.get("num_workers", 0):
            raise invalid(
                "num_workers",
                kwargs["num_workers"],
                "0 with the in-memory data (batches are index "
                "operations in the main process; set in_memory: false to use worker processes)",
            )
        kwargs.setdefault("collate_fn", collate_images)
        super().__init__(dataset, batch_size=batch_size, **kwargs)
        self.with_indices = with_indices
        self._epoch = 0
        self._handed_out = 0
        self._resume: dict[str, int] | None = None

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:  # type: ignore[override]
        return self._batches()

    def _sampler_epoch(self) -> int:
        sampler = self.batch_sampler.sampler if self.batch_sampler is not None else self.sampler
        return int(getattr(sampler, "epoch", 0))

    def _batches(self) -> Iterator[tuple[Tensor, ...]]:
        # a generator: the epoch is read at the first next(), after Lightning's set_epoch
        epoch = self._sampler_epoch()
        resume, self._resume = self._resume, None
        skip = resume["batches"] if resume is not None and resume["epoch"] == epoch else 0
        self._epoch, self._handed_out = epoch, skip
        dataset: InMemoryImages = self.dataset  # type: ignore[assignment]
        for k, indices in enumerate(self.batch_sampler):
            if k < skip:
                continue
            index = torch.as_tensor(indices, dtype=torch.long).to(dataset.device, non_blocking=True)
            x, y = dataset.batch(index, epoch)
            self._handed_out = k + 1
            yield (x, y, index) if self.with_indices else (x, y)

    def state_dict(self) -> dict[str, int]:
        """The epoch, the batches handed out in it, and what they mean (batch size, batches per epoch)."""
        if self._resume is not None:  # restored but not iterated yet: keep the restored position
            return dict(self._resume)
        return {
            "epoch": self._epoch,
            "batches": self._handed_out,
            "batch_size": self.batch_size or 0,
            "num_batches": len(self),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume after the ``batches`` first batches of ``epoch`` (at the next iterator of that epoch).

        A mid-epoch position saved with another batch size or number of batches per epoch (another DDP
        world size) would not mean the same samples: it is refused.
        """
        batches, saved = int(state["batches"]), (state.get("batch_size"), state.get("num_batches"))
        if 0 < batches < (saved[1] or 0) and saved != (self.batch_size or 0, len(self)):
            raise ValueError(
                f"Cannot resume the in-memory loader mid-epoch: the checkpoint's loader had batch_size {saved[0]} "
                f"and {saved[1]} batches per epoch, this one {self.batch_size} and {len(self)}; resume with the "
                "same batch size and devices, or from an end-of-epoch checkpoint"
            )
        self._resume = dict(state)


def check_memory_args(in_memory: object, device: object, with_indices: object, num_workers: int) -> None:
    """Refuse a bad ``in_memory``/``device``/``with_indices`` or workers with the in-memory data."""
    check_choice("in_memory", in_memory, BOOLS)
    check_choice("device", device, DATA_DEVICES)
    check_choice("with_indices", with_indices, BOOLS)
    if in_memory and num_workers:
        raise invalid(
            "num_workers",
            num_workers,
            "0 with in_memory: true (batches are index operations in the "
            "main process; set in_memory: false to use worker processes)",
        )
    if with_indices and not in_memory:
        raise invalid(
            "with_indices",
            with_indices,
            "false with in_memory: false (the sample indices come with the in-memory loader)",
        )


def data_device(datamodule: object, device: DataDevice) -> torch.device:
    """``"cpu"``, or for ``"auto"`` the attached Trainer's root device (the CPU without a Trainer)."""
    strategy = getattr(getattr(datamodule, "trainer", None), "strategy", None)
    if device == "cpu" or strategy is None:
        return torch.device("cpu")
    return strategy.root_device
