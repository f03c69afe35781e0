"""LightningDataModules, one per data set of the studies.

Each exposes what a network needs as attributes: ``num_classes`` (``cli.py`` links it into the task),
and ``num_features`` (vectors, graphs), ``in_channels``/``image_size`` (images) or ``dim`` (matrix
sensing), which ``setup`` checks against the model's net. A missing file raises
:class:`DataNotFoundError` naming the path and how to get the data.

The image data sets (MNIST, FashionMNIST, CIFAR-10, digits) are held in memory as normalised tensors
(``in_memory: true``, the default; ``false`` is torchvision's per-sample path): batches by indexing, the
training augmentation on whole batches with per-sample draws seeded by ``(data_seed, epoch, sample)``, and
a training loader that Lightning checkpoints and resumes mid-epoch. MNIST and FashionMNIST read their idx
files as distributed (``.gz`` or not; FashionMNIST also from Debian's ``dataset-fashion-mnist`` folder),
checked by the MD5 of their decompressed bytes.

``CoraDataModule`` is the former name of :class:`PlanetoidDataModule` (it serves Cora, CiteSeer and
PubMed); it still resolves, with a ``FutureWarning``, so the ``config.yaml`` files saved by earlier
runs (``class_path: flatminima.datamodules.CoraDataModule``) keep working.
"""

import warnings

from ._base import DataNotFoundError
from .abalone import AbaloneDataModule
from .cifar10 import CIFAR10DataModule
from .digits import DigitsDataModule
from .matrix_sensing import MatrixSensingDataModule
from .mnist import FashionMNISTDataModule, MNISTDataModule
from .moons import MoonsDataModule
from .planetoid import PlanetoidDataModule

__all__ = [
    "MoonsDataModule",
    "AbaloneDataModule",
    "PlanetoidDataModule",
    "CIFAR10DataModule",
    "FashionMNISTDataModule",
    "MNISTDataModule",
    "DigitsDataModule",
    "MatrixSensingDataModule",
    "DataNotFoundError",
]


def __getattr__(name: str) -> object:
    """The deprecated name ``CoraDataModule`` (a ``FutureWarning``); any other unknown name is an AttributeError."""
    if name == "CoraDataModule":
        warnings.warn(
            "flatminima.datamodules.CoraDataModule is now flatminima.datamodules.PlanetoidDataModule (same arguments; it also serves "
            "CiteSeer and PubMed through name=); set class_path: flatminima.datamodules.PlanetoidDataModule",
            FutureWarning,
            stacklevel=2,
        )
        return PlanetoidDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
