"""scikit-learn's 8×8 handwritten digits (UCI optdigits): a small image data set available offline."""

from __future__ import annotations

import numpy as np
import torch

from flatminima.lightning_modules.validation import check_choice, check_fraction, check_int, invalid

from ._base import SplitDataModule, check_loader_args, check_net
from ._labels import LABEL_NOISE_MODES, LabelNoiseMode, corrupt_labels
from ._memory import BOOLS, DATA_DEVICES, DataDevice, InMemoryImages, data_device
from ._splits import sklearn_split


def load_digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits of ``sklearn.datasets.load_digits`` as float images ``(1797, 1, 8, 8)`` in [0, 1]
    (pixel counts 0–16 divided by 16) and long labels ``(1797,)``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.as_tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    return x, torch.as_tensor(digits.target, dtype=torch.long)


class DigitsDataModule(SplitDataModule):
    """The 1797 8×8 grey digits of scikit-learn (``load_digits``, Alpaydin & Kaynak 1998), 10 classes.

    A scaled-down stand-in for FashionMNIST and CIFAR-10 that ships with scikit-learn, so it needs no
    file and no download. Images are ``1×8×8`` float tensors: the pixel counts (0–16) divided by 16,
    then, with ``normalize``, standardised with the mean and (population) standard deviation of the
    **training** pixels (``pixel_mean``/``pixel_std`` after ``setup``). The test split is
    ``train_test_split(rows, test_size=test_fraction, random_state=data_seed, stratify=labels if
    stratify)`` of scikit-learn (360 test and 1437 training images by default); ``val_size`` training
    images are then held out for validation (stratified likewise, clean labels) — with ``val_size=0``
    (default, as in the studies, which report test curves) the validation loader serves the test split,
    as for the torchvision image modules. A seeded fraction ``label_noise`` of the remaining training
    labels is corrupted (``noisy_indices``: their positions in ``train_set``). No augmentation.
    The sets are :class:`~flatminima.datamodules._memory.InMemoryImages` served by the in-memory loader (batches by
    indexing, the same batches as a ``TensorDataset`` would give, resumable mid-epoch).

    Args:
        batch_size: Training batch size.
        eval_batch_size: Batch size of the validation and test loaders.
        num_workers: DataLoader worker processes: 0 (batches are index operations).
        test_fraction: Fraction of the images in the test split, in (0, 1).
        val_size: Number of training images held out for validation (0: validate on the test split).
        stratify: Keep the class proportions in every split (a stratified split) instead of a plain shuffle split.
        normalize: Standardise the pixels with the training images' mean and standard deviation.
        label_noise: Fraction of the training labels to corrupt (seeded; 0 = clean labels).
        label_noise_mode: ``"shuffle"`` the chosen labels among themselves, or draw them ``"uniform"``-ly.
        data_seed: Seed of the split, of the label noise and of the shuffling.
        device: Where the tensors live: ``"auto"`` on the Trainer's root device, ``"cpu"`` in host memory.
        with_indices: Training batches are ``(images, labels, index)``, ``index`` the LongTensor of the
            samples' positions in ``train_set``.
    """

    num_classes = 10
    in_channels = 1
    image_size = 8

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        num_workers: int = 0,
        test_fraction: float = 0.2,
        val_size: int = 0,
        stratify: bool = True,
        normalize: bool = True,
        label_noise: float = 0.0,
        label_noise_mode: LabelNoiseMode = "shuffle",
        data_seed: int = 0,
        device: DataDevice = "auto",
        with_indices: bool = False,
    ) -> None:
        super().__init__()
        batch_size, eval_batch_size, num_workers = check_loader_args(batch_size, eval_batch_size, num_workers)
        test_fraction = check_fraction("test_fraction", test_fraction)
        if test_fraction <= 0:
            raise invalid("test_fraction", test_fraction, "0 < test_fraction < 1")
        val_size = check_int("val_size", val_size, 0)
        label_noise = check_fraction("label_noise", label_noise)
        check_choice("label_noise_mode", label_noise_mode, LABEL_NOISE_MODES)
        data_seed = check_int("data_seed", data_seed, 0)
        check_choice("device", device, DATA_DEVICES)
        check_choice("with_indices", with_indices, BOOLS)
        if num_workers:
            raise invalid(
                "num_workers",
                num_workers,
                "0 (the digits are held in memory: batches are index operations in the main process)",
            )
        self.save_hyperparameters()
        self.pixel_mean: float | None = None
        self.pixel_std: float | None = None
        self.split_indices: dict[str, torch.Tensor] | None = None
        self.noisy_indices: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        """Load the digits, split them, standardise with the training pixels and corrupt training labels."""
        check_net(self, in_channels=self.in_channels, image_size=self.image_size)
        if self.train_set is not None:
            return
        h = self.hparams
        x, y = load_digit_images()
        n = len(y)
        n_train = n - int(np.ceil(h.test_fraction * n))
        if h.val_size >= n_train:
            raise ValueError(f"Invalid val_size: {h.val_size}; expected val_size < {n_train} (the training images)")
        train_idx, val_idx, test_idx = sklearn_split(
            n, h.test_fraction, h.val_size, seed=h.data_seed, stratify=y.numpy() if h.stratify else None
        )
        if h.normalize:
            mean, std = x[train_idx].mean(), x[train_idx].std(unbiased=False)
            x = (x - mean) / std
            self.pixel_mean, self.pixel_std = float(mean), float(std)
        y_train = y[train_idx]
        if h.label_noise > 0:  # training labels only; validation and test stay clean
            y_train, self.noisy_indices = corrupt_labels(
                y_train, h.label_noise, self.num_classes, h.data_seed, h.label_noise_mode
            )
        self.train_set = InMemoryImages(x[train_idx], y_train)
        self.test_set = InMemoryImages(x[test_idx], y[test_idx])
        self.val_set = InMemoryImages(x[val_idx], y[val_idx]) if h.val_size else self.test_set
        self.split_indices = {"train": train_idx, "val": val_idx, "test": test_idx}
        device = data_device(self, h.device)
        for dataset in {id(d): d for d in (self.train_set, self.val_set, self.test_set)}.values():
            dataset.to(device)
