"""LightningModules for sharpness-aware training, the SAM-family rules and the base optimizers.

``TwoPassModule`` holds the two-pass step once; ``Classifier``, ``BinaryClassifier``, ``Regressor``
and ``NodeClassifier`` are the tasks. The rules live in :mod:`flatminima.lightning_modules.minimizers` (pure
torch), the extra base optimizers in :mod:`flatminima.lightning_modules.optim`, the networks in
:mod:`flatminima.lightning_modules.networks`, the argument checks in :mod:`flatminima.lightning_modules.validation` and the
private Lightning/torch APIs in :mod:`flatminima.lightning_modules.compat`.

Plain imports, guarded: Python runs this file before any submodule, so the Lightning-dependent ones
(the module and the tasks) are imported only when Lightning is importable. The pure modules
(``minimizers``, ``validation``, ``compat``) thereby import without Lightning; with Lightning present
every name is imported eagerly and an error inside ``tasks``/``two_pass`` surfaces as it is.
"""

from .minimizers import ASAM, GSAM, SAM, USAM, AdaptiveGSAM, Minimizer

try:
    import lightning.pytorch  # noqa: F401  (only whether it is importable)
except ImportError as err:  # the pure modules stay usable without Lightning
    _LIGHTNING_ERROR: ImportError | None = err
else:
    _LIGHTNING_ERROR = None
    from .tasks import BinaryClassifier, Classifier, NodeClassifier, Regressor
    from .two_pass import TwoPassModule

_NEEDS_LIGHTNING = ("TwoPassModule", "Classifier", "BinaryClassifier", "Regressor", "NodeClassifier")

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


def __getattr__(name: str) -> object:
    """Only reached for names not imported above: say that a Lightning-dependent one needs Lightning."""
    if name in _NEEDS_LIGHTNING and _LIGHTNING_ERROR is not None:
        raise ImportError(
            f"lightning_modules.{name} needs Lightning (pip install lightning); without it only "
            "flatminima.lightning_modules.minimizers, .validation and .compat can be used"
        ) from _LIGHTNING_ERROR
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
