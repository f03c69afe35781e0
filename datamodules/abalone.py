"""UCI Abalone (Nash et al., 1995): seed 002's regression data set."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from ._base import SplitDataModule, check_fraction, check_int, check_net, data_not_found

SEXES = ("M", "F", "I")


def read_abalone(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Parse UCI's ``abalone.data``: features ``(n, 10)`` (one-hot sex M/F/I + 7 measurements), rings ``(n,)``.

    Raises ``ValueError`` naming the file and line of a malformed row.
    """
    rows, rings = [], []
    with open(path, newline="") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row:
                continue
            if len(row) != 9 or row[0] not in SEXES:
                raise ValueError(
                    f"Invalid abalone file {path}, line {line_no}: {','.join(row)!r}; expected 9 comma-separated "
                    "columns: Sex (M/F/I), 7 measurements, Rings"
                )
            try:
                values = [float(v) for v in row[1:]]
            except ValueError:
                raise ValueError(
                    f"Invalid abalone file {path}, line {line_no}: non-numeric measurement in {row!r}"
                ) from None
            rows.append([float(row[0] == s) for s in SEXES] + values[:7])
            rings.append(values[7])
    if not rows:
        raise ValueError(f"Invalid abalone file {path}: no rows")
    return torch.tensor(rows, dtype=torch.float32), torch.tensor(rings, dtype=torch.float32)


class AbaloneDataModule(SplitDataModule):
    """Abalone: predict the number of rings from sex and 7 measurements (4177 snails), with MSE.

    Seed 002 (Hammoud et al., section III.A): FCNN 10-64-64-1, an 80/20 train/test split, normalised
    features, batch 64. The file is UCI's ``abalone.data`` at ``<data_dir>/abalone/abalone.data``
    (9 columns, no header); with ``download=True`` a missing file is fetched from the UCI repository
    (MD5-checked). Features: sex one-hot (M, F, I) followed by the 7 measurements, 10 in all;
    target: the rings (float). A seeded permutation splits the rows; all 10 features are standardised
    with the mean and (population) standard deviation of the **training rows only**
    (``feature_mean``/``feature_std`` after ``setup``). With ``val_fraction=0`` (default) the validation
    loader serves the test split, as the study has no validation set.

    Args:
        data_dir: Root folder of the data (the file is ``<data_dir>/abalone/abalone.data``).
        batch_size: Training batch size.
        eval_batch_size: Batch size of the validation and test loaders.
        num_workers: DataLoader worker processes.
        test_fraction: Fraction of the rows in the test split.
        val_fraction: Fraction of the rows in a validation split (0: validate on the test split).
        standardize: Standardise the features with the training split's statistics.
        download: Fetch the file from the UCI repository when it is missing (needs internet).
        data_seed: Seed of the split and of the shuffling.
    """

    url = "https://archive.ics.uci.edu/ml/machine-learning-databases/abalone/abalone.data"
    md5 = "a769fd0119787cac09158fe08971e480"
    num_features = 10
    num_outputs = 1

    def __init__(
        self,
        data_dir: str = "./data",
        batch_size: int = 64,
        eval_batch_size: int = 1024,
        num_workers: int = 0,
        test_fraction: float = 0.2,
        val_fraction: float = 0.0,
        standardize: bool = True,
        download: bool = False,
        data_seed: int = 0,
    ) -> None:
        super().__init__()
        check_int("batch_size", batch_size, 1)
        check_int("eval_batch_size", eval_batch_size, 1)
        check_int("num_workers", num_workers, 0)
        check_fraction("test_fraction", test_fraction)
        check_fraction("val_fraction", val_fraction)
        if test_fraction <= 0:
            raise ValueError(f"Invalid test_fraction: {test_fraction!r}; expected 0 < test_fraction < 1")
        if test_fraction + val_fraction >= 1:
            raise ValueError(
                f"Invalid test_fraction + val_fraction: {test_fraction + val_fraction!r}; expected a sum < 1"
            )
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.feature_mean: torch.Tensor | None = None
        self.feature_std: torch.Tensor | None = None
        self.split_indices: dict[str, torch.Tensor] | None = None

    @property
    def path(self) -> Path:
        """Where the file is expected: ``<data_dir>/abalone/abalone.data``."""
        return self.data_dir / "abalone" / "abalone.data"

    def _missing_error(self, reason: str = ""):
        how = (
            f"Download {self.url} into {self.path.parent}/ (or copy it there), or pass download=True "
            "(data.init_args.download: true) on a machine with internet access."
        )
        return data_not_found("Abalone", [self.path], how, reason)

    def prepare_data(self) -> None:
        """Fetch the file if allowed and missing; refuse clearly if it is still missing."""
        if not self.path.is_file() and self.hparams.download:
            from torchvision.datasets.utils import download_url

            try:
                download_url(self.url, str(self.path.parent), self.path.name, md5=self.md5)
            except Exception as err:  # URLError, HTTPError, OSError, RuntimeError (MD5 mismatch)
                raise self._missing_error(f"The download failed ({type(err).__name__}: {err}).") from None
        if not self.path.is_file():
            raise self._missing_error()

    def setup(self, stage: str | None = None) -> None:
        """Read the file, split it with a seeded permutation and standardise with the training rows."""
        check_net(self, in_features=self.num_features)
        if self.train_set is not None:
            return
        if not self.path.is_file():
            raise self._missing_error()
        h = self.hparams
        x, y = read_abalone(self.path)
        n = len(y)
        n_test = int(round(h.test_fraction * n))
        n_val = int(round(h.val_fraction * n))
        if n - n_test - n_val < 1 or n_test < 1:
            raise ValueError(
                f"Invalid test_fraction/val_fraction for {n} rows: the train and test splits must not be empty"
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(h.data_seed))
        test_idx, val_idx, train_idx = torch.split(order, [n_test, n_val, n - n_test - n_val])
        if h.standardize:
            mean = x[train_idx].mean(dim=0)
            std = x[train_idx].std(dim=0, unbiased=False)
            std = torch.where(std > 0, std, torch.ones_like(std))
            x = (x - mean) / std
            self.feature_mean, self.feature_std = mean, std
        self.train_set = TensorDataset(x[train_idx], y[train_idx])
        self.test_set = TensorDataset(x[test_idx], y[test_idx])
        self.val_set = TensorDataset(x[val_idx], y[val_idx]) if n_val else self.test_set
        self.split_indices = {"train": train_idx, "val": val_idx, "test": test_idx}
