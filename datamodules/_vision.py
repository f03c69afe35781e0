"""The image data modules' base: files check, download, split, label noise, in-memory or torchvision batches."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Subset
from torchvision import transforms as T
from torchvision.datasets import VisionDataset
from torchvision.datasets.vision import StandardTransform

from flatminima.lightning_modules.validation import check_choice, check_float, check_fraction, check_int, invalid

from ._augment import BatchAugment
from ._base import DataNotFoundError, SplitDataModule, check_loader_args, check_net, data_not_found, missing_files
from ._labels import LABEL_NOISE_MODES, LabelNoiseMode, corrupt_labels
from ._memory import DataDevice, InMemoryImages, check_memory_args, data_device
from ._transforms import Cutout


class VisionDataModule(SplitDataModule):
    """Base of the image data modules (CIFAR-10, FashionMNIST, MNIST); the data sets differ by class attributes.

    ``prepare_data`` downloads through torchvision when ``download`` is true and the files are missing;
    otherwise (and after a failed download) missing files raise :class:`~flatminima.datamodules.DataNotFoundError`
    naming the exact path expected and how to get the data. ``setup`` reads the files, holds out a seeded
    validation subset of ``val_size`` training images (``randperm(n)`` seeded by ``data_seed``; without
    augmentation and without label noise) and corrupts a seeded fraction ``label_noise`` of the remaining
    training labels (their positions in ``train_set`` are ``noisy_indices``; the split is
    ``split_indices``). With ``val_size=0`` (the default, as in the studies, which report test curves) the
    validation loader serves the test split.

    **In memory** (``in_memory: true``, the default): the images are decoded and normalised once into
    float32 tensors (bit for bit what torchvision's ``ToTensor`` + ``Normalize`` give; the data sets here
    all need under 1 GiB that way: MNIST/FashionMNIST 220 MB, CIFAR-10 740 MB), a batch is a couple of
    index operations, and the training augmentation runs on the whole batch
    (:class:`~flatminima.datamodules._augment.BatchAugment`) with per-sample draws that are a function of
    ``(data_seed, epoch, sample)`` only. The training loader is resumable mid-epoch (see
    :class:`~flatminima.datamodules._memory.InMemoryLoader`). ``in_memory: false`` is torchvision's per-sample path
    (PIL images, ``transforms``; augmentation draws from torch's global generator, so its draws differ
    from the in-memory ones; without augmentation both give the same batches).

    Training images: ``[random crop with padding, horizontal flip] → tensor → per-channel
    normalisation → [cutout]``; evaluation images: ``tensor → normalisation``.

    Args:
        data_dir: Root folder of the data (torchvision's layout below it).
        batch_size: Training batch size.
        eval_batch_size: Batch size of the validation and test loaders.
        num_workers: DataLoader worker processes (0 with ``in_memory``: batches are index operations).
        val_size: Number of training images held out for validation (0: validate on the test split).
        augment: Apply the data set's standard training augmentation (CIFAR-10: random 32×32 crop of
            the 4-pixel zero-padded image and horizontal flip; FashionMNIST and MNIST: none).
        cutout: Side in pixels of the Cutout square on training images (0 = no cutout; 16 is usual for CIFAR-10).
        cutout_prob: Probability of applying Cutout to a training image.
        label_noise: Fraction of the training labels to corrupt (seeded; 0 = clean labels).
        label_noise_mode: ``"shuffle"`` the chosen labels among themselves, or draw them ``"uniform"``-ly.
        download: Download the files with torchvision when they are missing (needs internet).
        data_seed: Seed of the validation split, of the label noise, of the shuffling and (in memory) of
            the augmentation draws.
        in_memory: Hold the data as tensors and build batches by indexing (false: torchvision's per-sample path).
        device: Where the in-memory tensors live: ``"auto"`` on the Trainer's root device (a GPU when
            training on one: batches need no copy), ``"cpu"`` in host memory.
        with_indices: Training batches are ``(images, labels, index)``, ``index`` the LongTensor of the
            samples' positions in ``train_set`` (in memory only).
    """

    dataset_cls: ClassVar[type[VisionDataset]]
    title: ClassVar[str]
    folder: ClassVar[str]
    files: ClassVar[tuple[str, ...]]
    how_to_get: ClassVar[str]
    num_classes: ClassVar[int] = 10
    in_channels: ClassVar[int]
    image_size: ClassVar[int]
    mean: ClassVar[tuple[float, ...]]
    std: ClassVar[tuple[float, ...]]
    crop_padding: ClassVar[int] = 0
    horizontal_flip: ClassVar[bool] = False

    def __init__(
        self,
        data_dir: str = "./data",
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        num_workers: int = 0,
        val_size: int = 0,
        augment: bool = True,
        cutout: int = 0,
        cutout_prob: float = 1.0,
        label_noise: float = 0.0,
        label_noise_mode: LabelNoiseMode = "shuffle",
        download: bool = False,
        data_seed: int = 0,
        in_memory: bool = True,
        device: DataDevice = "auto",
        with_indices: bool = False,
    ) -> None:
        super().__init__()
        batch_size, eval_batch_size, num_workers = check_loader_args(batch_size, eval_batch_size, num_workers)
        val_size = check_int("val_size", val_size, 0)
        cutout = check_int("cutout", cutout, 0)
        cutout_prob = check_float("cutout_prob", cutout_prob)
        if not 0.0 < cutout_prob <= 1.0:
            raise invalid("cutout_prob", cutout_prob, "0 < cutout_prob <= 1")
        label_noise = check_fraction("label_noise", label_noise)
        check_choice("label_noise_mode", label_noise_mode, LABEL_NOISE_MODES)
        data_seed = check_int("data_seed", data_seed, 0)
        check_memory_args(in_memory, device, with_indices, num_workers)
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.noisy_indices: torch.Tensor | None = None
        self.split_indices: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ files
    @property
    def data_path(self) -> Path:
        """The folder that holds the files (torchvision's layout under ``data_dir``)."""
        return self.data_dir / self.folder

    def missing(self) -> list[Path]:
        """The expected paths of the files that are missing (empty when the data can be read)."""
        return missing_files(self.data_path, self.files)

    def _missing_error(self, reason: str = "") -> DataNotFoundError:
        how = (
            f"{self.how_to_get} Or pass download=True (data.init_args.download: true) on a machine with internet "
            f"access. data_dir is {str(self.data_dir)!r}."
        )
        missing = self.missing() or [self.data_path / self.files[0]]
        return data_not_found(self.title, missing, how, reason)

    def prepare_data(self) -> None:
        """Download the files if allowed and missing; refuse clearly if they are still missing."""
        if self.missing() and self.hparams.download:
            try:
                for train in (True, False):
                    self.dataset_cls(str(self.data_dir), train=train, download=True)
            except Exception as err:  # noqa: BLE001 - URLError, HTTPError, OSError, RuntimeError from the mirrors...
                raise self._missing_error(f"The download failed ({type(err).__name__}: {err}).") from None
        if self.missing():
            raise self._missing_error()

    def _load(self, train: bool) -> VisionDataset:
        try:
            return self.dataset_cls(str(self.data_dir), train=train, download=False)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
            raise DataNotFoundError(
                f"{self.title} files under {self.data_path} are present but torchvision refused them ({err}): they "
                f"are probably incomplete or corrupted. Delete {self.data_path} and get them again. {self.how_to_get}"
            ) from None

    def torchvision_sets(self) -> tuple[VisionDataset, VisionDataset]:
        """The training and test sets as torchvision datasets (no transform yet)."""
        return self._load(train=True), self._load(train=False)

    def read_arrays(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(train images, train labels, test images, test labels)``: uint8 ``(N, C, H, W)`` and long ``(N,)``."""
        train, test = self.torchvision_sets()
        return (
            as_nchw(train.data),
            torch.as_tensor(train.targets, dtype=torch.long),
            as_nchw(test.data),
            torch.as_tensor(test.targets, dtype=torch.long),
        )

    # ------------------------------------------------------------------ transforms
    def train_transform(self) -> T.Compose:
        """Training transform (torchvision path): the data set's augmentation, tensor, normalisation, cutout."""
        ops: list = []
        if self.hparams.augment and self.crop_padding:
            ops.append(T.RandomCrop(self.image_size, padding=self.crop_padding))
        if self.hparams.augment and self.horizontal_flip:
            ops.append(T.RandomHorizontalFlip())
        ops += [T.ToTensor(), T.Normalize(self.mean, self.std)]
        if self.hparams.cutout:
            ops.append(Cutout(self.hparams.cutout, self.hparams.cutout_prob))
        return T.Compose(ops)

    def eval_transform(self) -> T.Compose:
        """Evaluation transform (torchvision path): tensor and per-channel normalisation."""
        return T.Compose([T.ToTensor(), T.Normalize(self.mean, self.std)])

    def batch_augment(self) -> BatchAugment:
        """The training augmentation of the in-memory path (the same as :meth:`train_transform`'s)."""
        h = self.hparams
        return BatchAugment(
            fill=tuple(
                normalize(torch.zeros(1, len(self.mean), 1, 1, dtype=torch.uint8), self.mean, self.std)
                .flatten()
                .tolist()
            ),
            padding=self.crop_padding if h.augment else 0,
            flip=bool(self.horizontal_flip and h.augment),
            cutout=h.cutout,
            cutout_prob=h.cutout_prob,
        )

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        """Read the files, split off the validation images and corrupt the training labels."""
        check_net(self, in_channels=self.in_channels, image_size=self.image_size)
        if self.train_set is not None:
            return
        if self.missing():
            raise self._missing_error()
        if self.hparams.in_memory:
            self._setup_in_memory()
        else:
            self._setup_torchvision()

    def _split(self, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(train_idx, val_idx, training labels)``: the seeded validation split and the label noise."""
        h = self.hparams
        n = len(targets)
        if h.val_size >= n:
            raise ValueError(f"Invalid val_size: {h.val_size}; expected val_size < {n} (the training images)")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(h.data_seed))
        val_idx, train_idx = order[: h.val_size].sort().values, order[h.val_size :].sort().values
        labels = targets[train_idx]
        if h.label_noise > 0:
            labels, self.noisy_indices = corrupt_labels(
                labels, h.label_noise, self.num_classes, h.data_seed, h.label_noise_mode
            )
        self.split_indices = {"train": train_idx, "val": val_idx}
        return train_idx, val_idx, labels

    def _setup_in_memory(self) -> None:
        h = self.hparams
        train_x, train_y, test_x, test_y = self.read_arrays()
        train_idx, val_idx, labels = self._split(train_y)
        x = normalize(train_x, self.mean, self.std)
        del train_x
        train_images = x if h.val_size == 0 else x[train_idx]  # val_size 0: train_idx is every image, in order
        self.train_set = InMemoryImages(train_images, labels, self.batch_augment(), seed=h.data_seed)
        self.test_set = InMemoryImages(normalize(test_x, self.mean, self.std), test_y)
        self.val_set = InMemoryImages(x[val_idx], train_y[val_idx]) if h.val_size else self.test_set
        device = data_device(self, h.device)
        for dataset in {id(d): d for d in (self.train_set, self.val_set, self.test_set)}.values():
            dataset.to(device)
        self.train_eval_set = InMemoryImages(self.train_set.images, self.train_set.labels)  # no augmentation

    def _setup_torchvision(self) -> None:
        h = self.hparams
        full, test = self.torchvision_sets()
        targets = torch.as_tensor(full.targets, dtype=torch.long)
        train_idx, val_idx, labels = self._split(targets)
        train = _with_transform(full, self.train_transform())
        if h.label_noise > 0:
            targets = targets.clone()
            targets[train_idx] = labels
            train.targets = targets.tolist() if isinstance(full.targets, list) else targets
        self.train_set = train if h.val_size == 0 else Subset(train, train_idx.tolist())
        plain = _with_transform(train, self.eval_transform())  # same images and (noisy) labels, no augmentation
        self.train_eval_set = plain if h.val_size == 0 else Subset(plain, train_idx.tolist())
        self.test_set = _with_transform(test, self.eval_transform())
        if h.val_size:
            self.val_set = Subset(_with_transform(full, self.eval_transform()), val_idx.tolist())
        else:
            self.val_set = self.test_set


def as_nchw(images: np.ndarray | Tensor) -> Tensor:
    """uint8 images ``(N, H, W)`` or ``(N, H, W, C)`` (torchvision's ``data``) as contiguous ``(N, C, H, W)``."""
    x = torch.as_tensor(images)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return x.contiguous()


def normalize(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 ``(N, C, H, W)`` → float32 ``(x / 255 − mean) / std``, the very operations of torchvision's
    ``ToTensor`` and ``Normalize`` (so the values are bit for bit theirs)."""
    x = images.to(torch.float32).div_(255)
    m = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return x.sub_(m).div_(s)


def _with_transform(dataset: VisionDataset, transform: T.Compose) -> VisionDataset:
    """A shallow copy of a torchvision dataset (the image array is shared) with another transform."""
    view = copy.copy(dataset)
    view.transform = transform
    view.transforms = StandardTransform(transform, dataset.target_transform)
    return view
