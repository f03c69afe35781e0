"""Network architectures: plain ``nn.Module``s injected into the LightningModules (``net=``)."""

from .mlp import MLP

__all__ = ["MLP"]
