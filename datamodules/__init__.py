"""LightningDataModules, one per data set of the studies.

Each exposes what a network needs as attributes: ``num_classes`` (``cli.py`` links it into the task),
and ``num_features`` (vectors, graphs), ``in_channels``/``image_size`` (images) or ``dim`` (matrix
sensing), which ``setup`` checks against the model's net. A missing file raises
:class:`DataNotFoundError` naming the path and how to get the data.
"""

from ._base import DataNotFoundError
from .abalone import AbaloneDataModule
from .cifar10 import CIFAR10DataModule
from .digits import DigitsDataModule
from .matrix_sensing import MatrixSensingDataModule
from .mnist import FashionMNISTDataModule, MNISTDataModule
from .moons import MoonsDataModule
from .planetoid import CoraDataModule

__all__ = [
    "MoonsDataModule",
    "AbaloneDataModule",
    "CoraDataModule",
    "CIFAR10DataModule",
    "FashionMNISTDataModule",
    "MNISTDataModule",
    "DigitsDataModule",
    "MatrixSensingDataModule",
    "DataNotFoundError",
]
