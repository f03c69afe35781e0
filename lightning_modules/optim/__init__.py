"""Base optimizers that torch lacks: AdaBound and AdaShift (seed 000's adaptive methods)."""

from .adabound import AdaBound
from .adashift import AdaShift

__all__ = ["AdaBound", "AdaShift"]
