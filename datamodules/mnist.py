"""MNIST (LeCun et al., 1998) and FashionMNIST (Xiao et al., 2017), read from their idx files as distributed.

The four files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` are read as they are (plain, or the
``.gz`` archives without unpacking them), first from ``<data_dir>/<MNIST|FashionMNIST>/raw/`` (torchvision's
layout, where ``download: true`` puts them), then from the system folders of the class
(``system_dirs``: for FashionMNIST, ``/usr/share/datasets/fashion-mnist``, where the Debian package
``dataset-fashion-mnist`` installs the ``.gz`` files). The first folder holding all four is used; nothing
is ever written to it. Each file's *decompressed* bytes must have the MD5 of the published file (an
archive compressed anew, as Debian's are, has another MD5 but the same content), so a corrupt or
different file is refused before training, never silently used.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor
from torchvision.datasets import MNIST, FashionMNIST, VisionDataset

from . import _idx
from ._base import DataNotFoundError
from ._vision import VisionDataModule

_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _download_how(cls: type[MNIST], folder: str) -> str:
    return (
        f"download the four .gz files of {cls.__name__} from {cls.mirrors[0]} "
        f"({', '.join(name for name, _ in cls.resources)}) into data_dir/{folder}/ (as they are, or gunzipped)"
    )


class _IdxDataModule(VisionDataModule):
    """MNIST-format data: the idx files found, checked and parsed here (torchvision only downloads them)."""

    files = _IDX_FILES
    md5: ClassVar[dict[str, str]]  # of the decompressed files
    system_dirs: ClassVar[tuple[str, ...]] = ()
    num_classes = 10
    in_channels = 1
    image_size = 28

    def search_folders(self) -> list[Path]:
        """Where the files are looked for, in order: ``data_dir/<name>/raw``, then ``system_dirs``."""
        return [self.data_path, *(Path(d) for d in self.system_dirs)]

    def found_files(self) -> dict[str, Path] | None:
        """The four files of the first folder of :meth:`search_folders` that holds them all, or None."""
        return _idx.find_folder(self.search_folders(), self.files)

    def missing(self) -> list[Path]:
        """Nothing when a folder holds all four files; else the files missing from ``data_dir``'s folder."""
        if self.found_files() is not None:
            return []
        return [self.data_path / name for name in self.files if _idx.find_idx(self.data_path, name) is None]

    def _missing_error(self, reason: str = "") -> DataNotFoundError:
        error = super()._missing_error(reason)
        searched = ", ".join(str(f) for f in self.search_folders())
        return DataNotFoundError(f"{error} Searched (each file plain or .gz): {searched}.")

    def _read_file(self, name: str, path: Path) -> Tensor:
        data = _idx.read_bytes(path)
        found = _idx.check_md5(data, self.md5[name])
        where = f"{self.title} file {path}"
        if found is not None:
            packed = "decompressed " if path.suffix == ".gz" else ""
            raise DataNotFoundError(
                f"{where} is not the published {name}: the MD5 of its {packed}bytes is {found}, expected "
                f"{self.md5[name]}. It is probably incomplete or corrupted: delete it and get it again. "
                f"{self.how_to_get}"
            )
        try:
            array = _idx.parse_idx(data)
        except _idx.IdxFormatError as err:
            raise DataNotFoundError(f"{where} is not an idx file: {err}. {self.how_to_get}") from None
        return torch.from_numpy(array.copy())

    def read_arrays(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(train images, train labels, test images, test labels)``: uint8 ``(N, 1, 28, 28)`` and long ``(N,)``."""
        found = self.found_files()
        if found is None:
            raise self._missing_error()
        out: list[Tensor] = []
        for split in ("train", "t10k"):
            images = self._read_file(f"{split}-images-idx3-ubyte", found[f"{split}-images-idx3-ubyte"])
            labels = self._read_file(f"{split}-labels-idx1-ubyte", found[f"{split}-labels-idx1-ubyte"])
            self._check_arrays(split, images, labels, found)
            out += [images.unsqueeze(1), labels.long()]
        return tuple(out)  # type: ignore[return-value]

    def _check_arrays(self, split: str, images: Tensor, labels: Tensor, found: dict[str, Path]) -> None:
        size = self.image_size
        ok = (
            images.dtype == torch.uint8
            and images.ndim == 3
            and tuple(images.shape[1:]) == (size, size)
            and labels.dtype == torch.uint8
            and labels.ndim == 1
            and len(labels) == len(images)
            and (len(labels) == 0 or int(labels.max()) < self.num_classes)
        )
        if not ok:
            raise DataNotFoundError(
                f"{self.title} files {found[f'{split}-images-idx3-ubyte']} and {found[f'{split}-labels-idx1-ubyte']} "
                f"do not hold uint8 images (n, {size}, {size}) with n uint8 labels < {self.num_classes}: images "
                f"{images.dtype} {tuple(images.shape)}, labels {labels.dtype} {tuple(labels.shape)}"
            )

    def torchvision_sets(self) -> tuple[VisionDataset, VisionDataset]:
        """torchvision's dataset class over the files read here (its per-sample PIL ``__getitem__``)."""
        train_x, train_y, test_x, test_y = self.read_arrays()
        return (
            _torchvision_dataset(self.dataset_cls, self.data_dir, train_x[:, 0], train_y, train=True),
            _torchvision_dataset(self.dataset_cls, self.data_dir, test_x[:, 0], test_y, train=False),
        )


def _torchvision_dataset(cls: type[MNIST], root: Path, images: Tensor, labels: Tensor, train: bool) -> MNIST:
    """An instance of torchvision's ``cls`` holding ``images``/``labels`` without reading its own folder
    (``MNIST.__init__`` only finds uncompressed files under ``root``); ``__getitem__`` is torchvision's."""
    dataset = cls.__new__(cls)
    VisionDataset.__init__(dataset, str(root))
    dataset.train, dataset.data, dataset.targets = train, images, labels
    return dataset


class FashionMNISTDataModule(_IdxDataModule):
    """FashionMNIST: 60,000 training and 10,000 test 28×28 grey images of 10 clothing classes.

    Bejan, Sanchez Ndoye & Vuckovic (SimpleBatch/MiddleBatch/ComplexBatch, batch 128) and Hammoud,
    Liossatos & Nicollier (2023) (LeNet-5, batch 64). No augmentation; normalisation with mean 0.2860 and
    standard deviation 0.3530. Files: the four idx files, plain or ``.gz``, from
    ``<data_dir>/FashionMNIST/raw/`` or else from ``/usr/share/datasets/fashion-mnist/`` (Debian's
    ``apt-get install dataset-fashion-mnist``); their decompressed bytes are checked by MD5. Held in memory
    by default. See :class:`~flatminima.datamodules._vision.VisionDataModule` for the arguments.
    """

    dataset_cls = FashionMNIST
    title = "FashionMNIST"
    folder = "FashionMNIST/raw"
    system_dirs = ("/usr/share/datasets/fashion-mnist",)
    md5 = {  # the uncompressed files (Xiao et al.'s repository); Debian's .gz files decompress to these
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    }
    how_to_get = (
        "Get the files one of two ways: install the Debian package (apt-get install dataset-fashion-mnist: "
        "the four .gz files land in /usr/share/datasets/fashion-mnist, read from there), or "
        f"{_download_how(FashionMNIST, folder)}."
    )
    mean = (0.2860,)
    std = (0.3530,)


class MNISTDataModule(_IdxDataModule):
    """MNIST: 60,000 training and 10,000 test 28×28 grey images of handwritten digits.

    "Improving Sharpness-Aware Minimisation" (Oxford report, 2024): a CNN with 2 conv and 2 dense
    layers, 25 epochs, batch 32. No augmentation; normalisation with mean 0.1307 and standard
    deviation 0.3081. Files: the four idx files, plain or ``.gz``, from ``<data_dir>/MNIST/raw/``; their
    decompressed bytes are checked by MD5. Held in memory by default. See
    :class:`~flatminima.datamodules._vision.VisionDataModule` for the arguments.
    """

    dataset_cls = MNIST
    title = "MNIST"
    folder = "MNIST/raw"
    md5 = {  # the uncompressed files of LeCun et al.'s archives (torchvision's MNIST.resources list the .gz MD5s)
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    }
    how_to_get = f"Get the files: {_download_how(MNIST, folder)}."
    mean = (0.1307,)
    std = (0.3081,)
