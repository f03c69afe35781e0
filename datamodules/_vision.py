"""The torchvision image data modules' base: files check, download, split, augmentation, label noise."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import ClassVar

import torch
from torch.utils.data import Subset
from torchvision import transforms as T
from torchvision.datasets import VisionDataset
from torchvision.datasets.vision import StandardTransform

from lightning_modules.validation import check_choice, check_float, check_fraction, check_int, invalid

from ._base import DataNotFoundError, SplitDataModule, check_loader_args, check_net, data_not_found, missing_files
from ._labels import LABEL_NOISE_MODES, LabelNoiseMode, corrupt_labels
from ._transforms import Cutout


class VisionDataModule(SplitDataModule):
    """Base of the torchvision image data modules; the data sets differ only by class attributes.

    ``prepare_data`` downloads through torchvision when ``download`` is true; otherwise (and after a
    failed download) missing files raise :class:`~datamodules.DataNotFoundError` naming the exact path
    expected and how to get the data. ``setup`` loads the files with the torchvision dataset class,
    holds out a seeded validation subset of ``val_size`` training images (without augmentation and
    without label noise) and corrupts a seeded fraction ``label_noise`` of the remaining training
    labels (their positions in ``train_set`` are ``noisy_indices`` after ``setup``). With
    ``val_size=0`` (the default, as in the studies, which report test curves) the validation loader
    serves the test split.

    Training images: ``[random crop with padding, horizontal flip] → tensor → per-channel
    normalisation → [cutout]``; evaluation images: ``tensor → normalisation``.

    Args:
        data_dir: Root folder of the data (torchvision's layout below it).
        batch_size: Training batch size.
        eval_batch_size: Batch size of the validation and test loaders.
        num_workers: DataLoader worker processes.
        val_size: Number of training images held out for validation (0: validate on the test split).
        augment: Apply the data set's standard training augmentation (CIFAR-10: random 32×32 crop of
            the 4-pixel zero-padded image and horizontal flip; FashionMNIST and MNIST: none).
        cutout: Side in pixels of the Cutout square on training images (0 = no cutout; 16 is usual for CIFAR-10).
        cutout_prob: Probability of applying Cutout to a training image.
        label_noise: Fraction of the training labels to corrupt (seeded; 0 = clean labels).
        label_noise_mode: ``"shuffle"`` the chosen labels among themselves, or draw them ``"uniform"``-ly.
        download: Download the files with torchvision when they are missing (needs internet).
        data_seed: Seed of the validation split, of the label noise and of the shuffling.
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
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.noisy_indices: torch.Tensor | None = None

    # ------------------------------------------------------------------ files
    @property
    def data_path(self) -> Path:
        """The folder that holds the files (torchvision's layout under ``data_dir``)."""
        return self.data_dir / self.folder

    def _missing_error(self, reason: str = ""):
        how = (
            f"{self.how_to_get} Or pass download=True (data.init_args.download: true) on a machine with internet "
            f"access. data_dir is {str(self.data_dir)!r}."
        )
        missing = missing_files(self.data_path, self.files) or [self.data_path / self.files[0]]
        return data_not_found(self.title, missing, how, reason)

    def prepare_data(self) -> None:
        """Download the files if allowed and missing; refuse clearly if they are still missing."""
        if missing_files(self.data_path, self.files) and self.hparams.download:
            try:
                for train in (True, False):
                    self.dataset_cls(str(self.data_dir), train=train, download=True)
            except Exception as err:  # URLError, HTTPError, OSError, RuntimeError from the mirrors...
                raise self._missing_error(f"The download failed ({type(err).__name__}: {err}).") from None
        if missing_files(self.data_path, self.files):
            raise self._missing_error()

    def _load(self, train: bool) -> VisionDataset:
        try:
            return self.dataset_cls(str(self.data_dir), train=train, download=False)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
            raise DataNotFoundError(
                f"{self.title} files under {self.data_path} are present but torchvision refused them ({err}): they "
                f"are probably incomplete or corrupted. Delete {self.data_path} and get them again. {self.how_to_get}"
            ) from None

    # ------------------------------------------------------------------ transforms
    def train_transform(self) -> T.Compose:
        """Training transform: the data set's augmentation, tensor, normalisation, cutout."""
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
        """Evaluation transform: tensor and per-channel normalisation."""
        return T.Compose([T.ToTensor(), T.Normalize(self.mean, self.std)])

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        """Load the files, split off the validation images and corrupt the training labels."""
        check_net(self, in_channels=self.in_channels, image_size=self.image_size)
        if self.train_set is not None:
            return
        if missing_files(self.data_path, self.files):
            raise self._missing_error()
        h = self.hparams
        full = self._load(train=True)
        test = self._load(train=False)
        n = len(full)
        if h.val_size >= n:
            raise ValueError(f"Invalid val_size: {h.val_size}; expected val_size < {n} (the training images)")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(h.data_seed))
        val_idx, train_idx = order[: h.val_size].sort().values, order[h.val_size :].sort().values

        train = _with_transform(full, self.train_transform())
        if h.label_noise > 0:
            targets = torch.as_tensor(full.targets, dtype=torch.long)
            noisy, chosen = corrupt_labels(targets[train_idx], h.label_noise, self.num_classes, h.data_seed,
                                           h.label_noise_mode)
            targets = targets.clone()
            targets[train_idx] = noisy
            train.targets = targets.tolist() if isinstance(full.targets, list) else targets
            self.noisy_indices = chosen
        self.train_set = train if h.val_size == 0 else Subset(train, train_idx.tolist())
        plain = _with_transform(train, self.eval_transform())  # same images and (noisy) labels, no augmentation
        self.train_eval_set = plain if h.val_size == 0 else Subset(plain, train_idx.tolist())
        self.test_set = _with_transform(test, self.eval_transform())
        if h.val_size:
            self.val_set = Subset(_with_transform(full, self.eval_transform()), val_idx.tolist())
        else:
            self.val_set = self.test_set


def _with_transform(dataset: VisionDataset, transform: T.Compose) -> VisionDataset:
    """A shallow copy of a torchvision dataset (the image array is shared) with another transform."""
    view = copy.copy(dataset)
    view.transform = transform
    view.transforms = StandardTransform(transform, dataset.target_transform)
    return view
