"""LightningModules for sharpness-aware training, the SAM-family rules and the base optimizers.

``TwoPassModule`` holds the two-pass step once; ``Classifier``, ``BinaryClassifier``, ``Regressor``
and ``NodeClassifier`` are the tasks. The rules live in :mod:`lightning_modules.minimizers` (pure
torch), the extra base optimizers in :mod:`lightning_modules.optim`, the networks in
:mod:`lightning_modules.networks`.
"""

from .minimizers import ASAM, GSAM, SAM, USAM, AdaptiveGSAM, Minimizer
from .tasks import BinaryClassifier, Classifier, NodeClassifier, Regressor
from .two_pass import TwoPassModule

__all__ = [
    "TwoPassModule",
    "Classifier",
    "BinaryClassifier",
    "Regressor",
    "NodeClassifier",
    "Minimizer",
    "SAM",
    "USAM",
    "ASAM",
    "GSAM",
    "AdaptiveGSAM",
]
