"""UCI Abalone (Nash et al., 1995): the regression data set of Hammoud et al.'s adaptive-sharpness study."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, TensorDataset

from flatminima.lightning_modules.validation import check_choice, check_fraction, check_int, invalid

from ._base import SplitDataModule, check_loader_args, check_net, data_not_found
from ._loaders import FullBatch, first, make_loader
from ._splits import SPLIT_METHODS, SplitMethod, sklearn_split, standardize

SEXES = ("M", "F", "I")
UCI_ROWS, UCI_BYTES, UCI_MD5 = 4177, 191_873, "a769fd0119787cac09158fe08971e480"


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


def check_uci_file(path: Path, rows: int) -> bool:
    """Warn when ``path`` is not UCI's ``abalone.data`` (4177 rows, 191,873 bytes, MD5 a769fd01...); True if it is.

    A cut or edited file still trains, but its results are not those of the published studies.
    """
    data = Path(path).read_bytes()
    md5 = hashlib.md5(data).hexdigest()
    if md5 == UCI_MD5:
        return True
    rank_zero_warn(
        f"{path} differs from UCI's abalone.data: {rows} rows, {len(data):,} bytes, MD5 {md5} (UCI's file: "
        f"{UCI_ROWS} rows, {UCI_BYTES:,} bytes, MD5 {UCI_MD5}); results will not match published ones. "
        "Fetch the original with download: true, or copy it from the UCI repository.",
        category=UserWarning,
    )
    return False


class AbaloneDataModule(SplitDataModule):
    """Abalone: predict the number of rings from sex and 7 measurements (4177 snails), with MSE.

    Hammoud et al. 2023 (section III.A): FCNN 10-64-64-1, an 80/20 train/test split, normalised
    features, batch 64. The file is UCI's ``abalone.data`` at ``<data_dir>/abalone/abalone.data``
    (9 columns, no header); with ``download=True`` a missing file is fetched from the UCI repository
    (MD5-checked). Features: sex one-hot (M, F, I) followed by the 7 measurements, 10 in all;
    target: the rings (float). By default a permutation seeded with ``data_seed`` splits the rows;
    ``split="sklearn"`` splits them exactly as ``train_test_split(X, y, test_size=test_fraction,
    random_state=split_seed)`` does (``ceil(test_fraction · n)`` test rows). All 10 features are
    standardised with the mean and (population) standard deviation of the **training rows only**
    (``feature_mean``/``feature_std`` after ``setup``); ``standardize_targets`` does the same to the
    rings (``target_mean``/``target_std``; the losses are then in units of the training rings' spread).
    With ``val_fraction=0`` (default) the validation loader serves the test split, as the study has no
    validation set. A file that is not UCI's (another size or MD5, e.g. cut to fewer rows) is used with
    a warning naming its rows, size and MD5.

    The authors' notebook differs from the report's text (``experiments/adaptive_sharpness_abalone_notebook.yaml``):
    it reads the file with pandas' default header row, so the first snail is lost (``skip_first_row``,
    4176 rows); it splits with ``train_test_split(..., test_size=0.2, random_state=42)``
    (``split="sklearn"``, ``split_seed=42``: 3340 training rows); it standardises the rings too; and
    its training loop walks the minibatch indices but computes every loss on the whole training set
    (``full_batch``: each epoch takes ``ceil(n_train / batch_size)`` = 53 full-batch steps). It
    standardises with torch's unbiased standard deviation, a factor √(n/(n−1)) ≈ 1.00015 from ours,
    and orders the sex columns last (a permutation of the inputs, which PyTorch's default
    initialisation treats alike).

    Args:
        data_dir: Root folder of the data (the file is ``<data_dir>/abalone/abalone.data``).
        batch_size: Training batch size (with ``full_batch``: sets the number of full-batch steps per epoch).
        eval_batch_size: Batch size of the validation and test loaders.
        num_workers: DataLoader worker processes.
        test_fraction: Fraction of the rows in the test split.
        val_fraction: Fraction of the rows in a validation split (0: validate on the test split).
        standardize: Standardise the features with the training split's statistics.
        download: Fetch the file from the UCI repository when it is missing (needs internet).
        data_seed: Seed of the permutation split and of the shuffling.
        split: ``"permutation"`` (seeded by ``data_seed``) or ``"sklearn"`` (``train_test_split`` with
            ``split_seed``; validation rows, if any, are then split off the training rows the same way).
        split_seed: ``random_state`` of the ``"sklearn"`` split (None: ``data_seed``).
        standardize_targets: Standardise the rings with the training split's statistics.
        skip_first_row: Drop the file's first row (the notebook's pandas header quirk).
        full_batch: Every training batch is the whole training set, ``ceil(n_train / batch_size)``
            batches per epoch (the notebook's effective loop).
    """

    url = "https://archive.ics.uci.edu/ml/machine-learning-databases/abalone/abalone.data"
    md5 = UCI_MD5
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
        split: SplitMethod = "permutation",
        split_seed: int | None = None,
        standardize_targets: bool = False,
        skip_first_row: bool = False,
        full_batch: bool = False,
    ) -> None:
        super().__init__()
        batch_size, eval_batch_size, num_workers = check_loader_args(batch_size, eval_batch_size, num_workers)
        test_fraction = check_fraction("test_fraction", test_fraction)
        val_fraction = check_fraction("val_fraction", val_fraction)
        if test_fraction <= 0:
            raise invalid("test_fraction", test_fraction, "0 < test_fraction < 1")
        if test_fraction + val_fraction >= 1:
            raise invalid("test_fraction + val_fraction", test_fraction + val_fraction, "a sum < 1")
        check_choice("split", split, SPLIT_METHODS)
        split_seed = check_int("split_seed", split_seed, 0, optional=True)
        data_seed = check_int("data_seed", data_seed, 0)
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.feature_mean: torch.Tensor | None = None
        self.feature_std: torch.Tensor | None = None
        self.target_mean: torch.Tensor | None = None
        self.target_std: torch.Tensor | None = None
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
            except Exception as err:  # noqa: BLE001 - URLError, HTTPError, OSError, RuntimeError (MD5 mismatch)
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
        check_uci_file(self.path, len(y))
        if h.skip_first_row:
            x, y = x[1:], y[1:]
        test_idx, val_idx, train_idx = self._split(len(y))
        if h.standardize:
            x, self.feature_mean, self.feature_std = standardize(x, train_idx)
        if h.standardize_targets:
            y, self.target_mean, self.target_std = standardize(y, train_idx)
        self.train_set = TensorDataset(x[train_idx], y[train_idx])
        self.test_set = TensorDataset(x[test_idx], y[test_idx])
        self.val_set = TensorDataset(x[val_idx], y[val_idx]) if len(val_idx) else self.test_set
        self.split_indices = {"train": train_idx, "val": val_idx, "test": test_idx}

    def _split(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(test, val, train)`` row indices."""
        h = self.hparams
        n_test = int(round(h.test_fraction * n))
        n_val = int(round(h.val_fraction * n))
        if n - n_test - n_val < 1 or n_test < 1:
            raise ValueError(
                f"Invalid test_fraction/val_fraction for {n} rows: the train and test splits must not be empty"
            )
        if h.split == "sklearn":
            seed = h.data_seed if h.split_seed is None else h.split_seed
            train, val, test = sklearn_split(n, h.test_fraction, n_val, seed=seed)
            return test, val, train
        order = torch.randperm(n, generator=torch.Generator().manual_seed(h.data_seed))
        return torch.split(order, [n_test, n_val, n - n_test - n_val])

    def train_dataloader(self) -> DataLoader:
        """Shuffled minibatches, or with ``full_batch`` the whole training set ``ceil(n / batch_size)`` times."""
        if not self.hparams.full_batch or self.train_set is None:
            return super().train_dataloader()
        steps = -(-len(self.train_set) // self.hparams.batch_size)
        return make_loader(
            FullBatch(self.train_set.tensors, steps),
            1,
            shuffle=False,
            num_workers=self.hparams.num_workers,
            collate_fn=first,
        )
