"""Base optimizers that torch lacks: AdaBound and AdaShift.

Two of the adaptive methods compared by Bejan, Sanchez Ndoye & Vuckovic.
"""

from .adabound import AdaBound
from .adashift import AdaShift

__all__ = ["AdaBound", "AdaShift"]
