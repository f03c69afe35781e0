"""Two interleaving half circles (scikit-learn ``make_moons``): seed 003's toy study."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from sklearn.datasets import make_moons
from torch.utils.data import DataLoader, TensorDataset

from ._base import check_net
from ._labels import LABEL_NOISE_MODES, LabelNoiseMode, corrupt_labels
from ._loaders import make_loader


class MoonsDataModule(pl.LightningDataModule):
    """The moons data set of seed 003: 10000 points, noise 0.3, batch 64, a seeded split.

    The points are generated once from ``data_seed`` and split into train/val/test by a seeded
    permutation, so every run (and every DDP rank) sees the same split.

    Args:
        num_samples: Number of points in total.
        noise: Standard deviation of the Gaussian noise added to the points.
        val_fraction: Fraction of the points held out for validation.
        test_fraction: Fraction of the points held out for the test.
        batch_size: Training batch size.
        eval_batch_size: Batch size for validation and test (default: 1024).
        num_workers: DataLoader worker processes.
        data_seed: Seed of the generated points, of the split, of the label noise and of the shuffling.
        label_noise: Fraction of the training labels to corrupt (seeded; 0 = clean labels); their
            positions in ``train_set`` are ``noisy_indices`` after ``setup``.
        label_noise_mode: ``"shuffle"`` the chosen labels among themselves, or draw them ``"uniform"``-ly.
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
    ) -> None:
        super().__init__()
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 3:
            raise ValueError(f"Invalid num_samples: {num_samples!r}; expected an integer >= 3")
        if not noise >= 0:
            raise ValueError(f"Invalid noise: {noise!r}; expected noise >= 0")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"Invalid {name}: {value!r}; expected 0 <= {name} < 1")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"Invalid val_fraction + test_fraction: {val_fraction + test_fraction!r}; expected a sum < 1"
            )
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name}: {value!r}; expected an integer >= 1")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"Invalid num_workers: {num_workers!r}; expected an integer >= 0")
        if isinstance(label_noise, bool) or not isinstance(label_noise, (int, float)) or not 0.0 <= label_noise < 1.0:
            raise ValueError(f"Invalid label_noise: {label_noise!r}; expected 0 <= label_noise < 1")
        if label_noise_mode not in LABEL_NOISE_MODES:
            choices = ", ".join(map(repr, LABEL_NOISE_MODES))
            raise ValueError(f"Invalid label_noise_mode: {label_noise_mode!r}; expected one of {choices}")
        self.save_hyperparameters()
        self.train_set = self.val_set = self.test_set = None
        self.noisy_indices: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        """Generate the points and split them (the same on every call and every rank)."""
        check_net(self, in_features=self.num_features)
        if self.train_set is not None:
            return
        h = self.hparams
        x, y = make_moons(n_samples=h.num_samples, noise=h.noise, random_state=h.data_seed)
        x = torch.as_tensor(x, dtype=torch.float32)
        y = torch.as_tensor(y, dtype=torch.long)
        order = torch.randperm(h.num_samples, generator=torch.Generator().manual_seed(h.data_seed))
        n_val = int(round(h.val_fraction * h.num_samples))
        n_test = int(round(h.test_fraction * h.num_samples))
        n_train = h.num_samples - n_val - n_test
        parts = torch.split(order, [n_train, n_val, n_test])
        self.train_set, self.val_set, self.test_set = (TensorDataset(x[i], y[i]) for i in parts)
        if h.label_noise > 0:  # training labels only; validation and test stay clean
            noisy, self.noisy_indices = corrupt_labels(y[parts[0]], h.label_noise, self.num_classes, h.data_seed,
                                                       h.label_noise_mode)
            self.train_set = TensorDataset(x[parts[0]], noisy)

    def train_dataloader(self) -> DataLoader:
        return make_loader(self.train_set, self.hparams.batch_size, shuffle=True, seed=self.hparams.data_seed,
                           num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return make_loader(self.val_set, self.hparams.eval_batch_size, shuffle=False,
                           num_workers=self.hparams.num_workers)

    def test_dataloader(self) -> DataLoader:
        return make_loader(self.test_set, self.hparams.eval_batch_size, shuffle=False,
                           num_workers=self.hparams.num_workers)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
