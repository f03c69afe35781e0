"""Two interleaving half circles (scikit-learn ``make_moons``): the Adaptive-GSAM toy study."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from sklearn.datasets import make_moons
from torch.utils.data import DataLoader, TensorDataset

from flatminima.lightning_modules.validation import check_choice, check_float, check_fraction, check_int, invalid

from ._base import check_loader_args, check_net
from ._labels import LABEL_NOISE_MODES, LabelNoiseMode, corrupt_labels
from ._loaders import make_loader
from ._splits import SPLIT_METHODS, SplitMethod, sklearn_split, standardize


class MoonsDataModule(pl.LightningDataModule):
    """The moons data set of Adaptive-GSAM's toy study: 10000 points, noise 0.3, batch 64, a seeded split.

    The points are ``make_moons(num_samples, noise=noise, random_state=data_seed)`` and are split into
    train/val/test once, so every run (and every DDP rank) sees the same split: by default by a
    permutation seeded with ``data_seed`` (80/10/10); with ``split="sklearn"`` exactly as
    ``train_test_split(X, y, test_size=test_fraction, random_state=split_seed)`` splits them
    (``ceil(test_fraction · n)`` test points; validation points, if any, then split off the training
    points the same way). With ``val_fraction=0`` the validation loader serves the test split (Keras'
    ``validation_data=(x_test, y_test)``). ``standardize`` rescales both features with the training
    points' mean and population standard deviation (scikit-learn's ``StandardScaler`` fitted on the
    training split; ``feature_mean``/``feature_std`` after ``setup``).

    The published Adaptive-GSAM setup (the authors' Keras notebook): ``data_seed=10``,
    ``split="sklearn"``, ``split_seed=42``, ``test_fraction=0.3``, ``val_fraction=0``, ``standardize=True``.

    Args:
        num_samples: Number of points in total.
        noise: Standard deviation of the Gaussian noise added to the points.
        val_fraction: Fraction of the points held out for validation (0: validate on the test split).
        test_fraction: Fraction of the points held out for the test.
        batch_size: Training batch size.
        eval_batch_size: Batch size for validation and test (default: 1024).
        num_workers: DataLoader worker processes.
        data_seed: Seed of the generated points, of the permutation split, of the label noise and of the shuffling.
        label_noise: Fraction of the training labels to corrupt (seeded; 0 = clean labels); their
            positions in ``train_set`` are ``noisy_indices`` after ``setup``.
        label_noise_mode: ``"shuffle"`` the chosen labels among themselves, or draw them ``"uniform"``-ly.
        split: ``"permutation"`` (seeded by ``data_seed``) or ``"sklearn"`` (``train_test_split`` with ``split_seed``).
        split_seed: ``random_state`` of the ``"sklearn"`` split (None: ``data_seed``).
        standardize: Standardise the features with the training split's statistics.
    """

    num_features = 2
    num_classes = 2

    def __init__(
        self,
        num_samples: int = 10000,
        noise: float = 0.3,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        batch_size: int = 64,
        eval_batch_size: int = 1024,
        num_workers: int = 0,
        data_seed: int = 0,
        label_noise: float = 0.0,
        label_noise_mode: LabelNoiseMode = "shuffle",
        split: SplitMethod = "permutation",
        split_seed: int | None = None,
        standardize: bool = False,
    ) -> None:
        super().__init__()
        num_samples = check_int("num_samples", num_samples, 3)
        noise = check_float("noise", noise)
        val_fraction = check_fraction("val_fraction", val_fraction)
        test_fraction = check_fraction("test_fraction", test_fraction)
        if val_fraction + test_fraction >= 1.0:
            raise invalid("val_fraction + test_fraction", val_fraction + test_fraction, "a sum < 1")
        batch_size, eval_batch_size, num_workers = check_loader_args(batch_size, eval_batch_size, num_workers)
        label_noise = check_fraction("label_noise", label_noise)
        check_choice("label_noise_mode", label_noise_mode, LABEL_NOISE_MODES)
        check_choice("split", split, SPLIT_METHODS)
        if split == "sklearn" and test_fraction <= 0:
            raise invalid("test_fraction", test_fraction, "0 < test_fraction < 1 with split='sklearn'")
        split_seed = check_int("split_seed", split_seed, 0, optional=True)
        data_seed = check_int("data_seed", data_seed, 0)
        self.save_hyperparameters()
        self.train_set = self.val_set = self.test_set = None
        self.noisy_indices: torch.Tensor | None = None
        self.feature_mean: torch.Tensor | None = None
        self.feature_std: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        """Generate the points and split them (the same on every call and every rank)."""
        check_net(self, in_features=self.num_features)
        if self.train_set is not None:
            return
        h = self.hparams
        x, y = make_moons(n_samples=h.num_samples, noise=h.noise, random_state=h.data_seed)
        x = torch.as_tensor(x, dtype=torch.float32)
        y = torch.as_tensor(y, dtype=torch.long)
        train, val, test = self._split()
        if h.standardize:
            x, self.feature_mean, self.feature_std = standardize(x, train)
        self.train_set, self.val_set, self.test_set = (TensorDataset(x[i], y[i]) for i in (train, val, test))
        if not len(val):
            self.val_set = self.test_set
        if h.label_noise > 0:  # training labels only; validation and test stay clean
            noisy, self.noisy_indices = corrupt_labels(
                y[train], h.label_noise, self.num_classes, h.data_seed, h.label_noise_mode
            )
            self.train_set = TensorDataset(x[train], noisy)

    def _split(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.hparams
        n_val = int(round(h.val_fraction * h.num_samples))
        if h.split == "sklearn":
            seed = h.data_seed if h.split_seed is None else h.split_seed
            return sklearn_split(h.num_samples, h.test_fraction, n_val, seed=seed)
        order = torch.randperm(h.num_samples, generator=torch.Generator().manual_seed(h.data_seed))
        n_test = int(round(h.test_fraction * h.num_samples))
        return torch.split(order, [h.num_samples - n_val - n_test, n_val, n_test])

    def train_dataloader(self) -> DataLoader:
        return make_loader(
            self.train_set,
            self.hparams.batch_size,
            shuffle=True,
            seed=self.hparams.data_seed,
            num_workers=self.hparams.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return make_loader(
            self.val_set, self.hparams.eval_batch_size, shuffle=False, num_workers=self.hparams.num_workers
        )

    def test_dataloader(self) -> DataLoader:
        return make_loader(
            self.test_set, self.hparams.eval_batch_size, shuffle=False, num_workers=self.hparams.num_workers
        )

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
