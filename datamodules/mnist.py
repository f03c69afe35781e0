"""MNIST (LeCun et al., 1998) and FashionMNIST (Xiao et al., 2017) through torchvision."""

from __future__ import annotations

from torchvision.datasets import MNIST, FashionMNIST

from ._vision import VisionDataModule

_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _how_to_get(cls: type[MNIST], folder: str) -> str:
    return (
        f"Download the four .gz files of {cls.__name__} from {cls.mirrors[0]} "
        f"({', '.join(name for name, _ in cls.resources)}) and gunzip them into data_dir/{folder}/."
    )


class FashionMNISTDataModule(VisionDataModule):
    """FashionMNIST: 60,000 training and 10,000 test 28×28 grey images of 10 clothing classes.

    Bejan, Sanchez Ndoye & Vuckovic (SimpleBatch/MiddleBatch/ComplexBatch, batch 128) and Hammoud,
    Liossatos & Nicollier (2023) (LeNet-5, batch 64). No augmentation; per-channel normalisation.
    Files: torchvision's ``<data_dir>/FashionMNIST/raw/`` idx-ubyte files (uncompressed). See
    :class:`~datamodules._vision.VisionDataModule` for the arguments.
    """

    dataset_cls = FashionMNIST
    title = "FashionMNIST"
    folder = "FashionMNIST/raw"
    files = _IDX_FILES
    how_to_get = _how_to_get(FashionMNIST, folder)
    num_classes = 10
    in_channels = 1
    image_size = 28
    mean = (0.2860,)
    std = (0.3530,)


class MNISTDataModule(VisionDataModule):
    """MNIST: 60,000 training and 10,000 test 28×28 grey images of handwritten digits.

    "Improving Sharpness-Aware Minimisation" (Oxford report, 2024): a CNN with 2 conv and 2 dense
    layers, 25 epochs, batch 32. No augmentation; normalisation with mean 0.1307 and standard
    deviation 0.3081. Files: torchvision's ``<data_dir>/MNIST/raw/`` idx-ubyte files (uncompressed). See
    :class:`~datamodules._vision.VisionDataModule` for the arguments.
    """

    dataset_cls = MNIST
    title = "MNIST"
    folder = "MNIST/raw"
    files = _IDX_FILES
    how_to_get = _how_to_get(MNIST, folder)
    num_classes = 10
    in_channels = 1
    image_size = 28
    mean = (0.1307,)
    std = (0.3081,)
