"""What the data modules share: the net check, the missing-data error and the split loaders.

The argument checks are :mod:`flatminima.lightning_modules.validation` (one set for the whole project).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset

from flatminima.lightning_modules.validation import check_int, is_integer

from ._loaders import EpochShuffleSampler, make_loader
from ._memory import InMemoryImages, InMemoryLoader


class DataNotFoundError(FileNotFoundError):
    """A data set's files are missing (and may not or could not be downloaded).

    The message names the exact path that was expected and how to get the data.
    """


def check_loader_args(batch_size: object, eval_batch_size: object, num_workers: object) -> tuple[int, int, int]:
    """Check the loader arguments every data module takes: batch sizes >= 1, worker processes >= 0."""
    return (
        check_int("batch_size", batch_size, 1),
        check_int("eval_batch_size", eval_batch_size, 1),
        check_int("num_workers", num_workers, 0),
    )


def missing_files(folder: Path, files: Sequence[str]) -> list[Path]:
    """The paths of ``files`` under ``folder`` that are not regular files."""
    return [folder / f for f in files if not (folder / f).is_file()]


def data_not_found(title: str, missing: Sequence[Path], how: str, reason: str = "") -> DataNotFoundError:
    """A :class:`DataNotFoundError` naming the first missing path, the count of the others and ``how``."""
    more = f" (and {len(missing) - 1} more file(s) in the same folder)" if len(missing) > 1 else ""
    why = f" {reason}" if reason else ""
    return DataNotFoundError(f"{title} not found: missing {missing[0]}{more}.{why} {how}")


def check_net(datamodule: pl.LightningDataModule, **expected: int) -> None:
    """Refuse a model whose net was built for another input than this data's, before any batch runs.

    When a trainer is attached, reads ``trainer.lightning_module.net`` and compares each integer
    attribute named in ``expected`` (``in_channels``, ``image_size``, ``in_features``, ``dim``) that
    the net has; a mismatch raises ``ValueError`` naming the config key to set. Nets without the
    attribute (ResNet18 has no ``image_size``) are not checked for it.
    """
    trainer = getattr(datamodule, "trainer", None)
    model = getattr(trainer, "lightning_module", None) if trainer is not None else None
    net = getattr(model, "net", None)
    if net is None:
        return
    for attr, value in expected.items():
        got = getattr(net, attr, None)
        if is_integer(got) and got != value:
            raise ValueError(
                f"Invalid net for {type(datamodule).__name__}: {type(net).__name__} has {attr}={got} but the data "
                f"needs {attr}={value}; set model.init_args.net.init_args.{attr}: {value} in the config"
            )


class SplitDataModule(pl.LightningDataModule):
    """Base of the data modules with ``train_set``/``val_set``/``test_set`` datasets built in ``setup``.

    Provides the loaders: the training loader shuffles with a per-epoch permutation seeded by
    ``data_seed`` (see :class:`~flatminima.datamodules._loaders.EpochShuffleSampler`); the evaluation loaders
    keep the order. A data set held as :class:`~flatminima.datamodules._memory.InMemoryImages` gets an
    :class:`~flatminima.datamodules._memory.InMemoryLoader` (batches by indexing, resumable mid-epoch; training
    batches carry the sample indices when the ``with_indices`` hyperparameter is true); any other a
    ``DataLoader``. Subclasses save ``batch_size``, ``eval_batch_size``, ``num_workers`` and
    ``data_seed`` as hyperparameters.
    """

    train_set: Dataset | None = None
    val_set: Dataset | None = None
    test_set: Dataset | None = None
    train_eval_set: Dataset | None = None  # the training examples with the evaluation transforms (None: train_set)

    def _loader(self, dataset: Dataset | None, stage: str, batch_size: int, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.{stage}_dataloader() called before setup()")
        if isinstance(dataset, InMemoryImages):
            sampler = EpochShuffleSampler(dataset, self.hparams.data_seed) if shuffle else None
            with_indices = stage == "train" and bool(self.hparams.get("with_indices", False))
            return InMemoryLoader(dataset, batch_size, sampler=sampler, with_indices=with_indices)
        return make_loader(
            dataset, batch_size, shuffle=shuffle, seed=self.hparams.data_seed, num_workers=self.hparams.num_workers
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, "train", self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, "val", self.hparams.eval_batch_size, shuffle=False)

    def train_eval_dataloader(self) -> DataLoader:
        """The training examples (and labels) as the test set is read: evaluation transforms, fixed order.

        For evaluating the final weights on the training set (``flatminima.callbacks.FinalTrainEvaluation``).
        """
        dataset = self.train_eval_set if self.train_eval_set is not None else self.train_set
        return self._loader(dataset, "train_eval", self.hparams.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "test", self.hparams.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
