"""Fully connected networks: seed 003's moons MLP and seed 002's Abalone FCNN."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import nn

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "leaky_relu": nn.LeakyReLU}


class MLP(nn.Sequential):
    """Multi-layer perceptron: Linear → activation, repeated, then a Linear output layer.

    The default is seed 003's moons network (2 → 32 → 32 → 32 → 2, ReLU). A feed-forward chain
    (an ``nn.Sequential`` of Linear and activation layers), so layer-wise measures can walk it.

    Args:
        in_features: Input dimension (2 for moons, 10 for Abalone).
        hidden: Widths of the hidden layers.
        out_features: Output dimension: the number of classes, or 1 for a scalar regression.
        activation: Nonlinearity after every hidden layer.
        dropout: Dropout probability after every hidden activation (0 = none).
    """

    def __init__(
        self,
        in_features: int = 2,
        hidden: Sequence[int] = (32, 32, 32),
        out_features: int = 2,
        activation: Literal["relu", "tanh", "elu", "leaky_relu"] = "relu",
        dropout: float = 0.0,
    ) -> None:
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name}: {value!r}; expected an integer >= 1")
        hidden = list(hidden)
        if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(f"Invalid hidden: {hidden!r}; expected a list of integers >= 1")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"Invalid activation: {activation!r}; expected one of {sorted(_ACTIVATIONS)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Invalid dropout: {dropout!r}; expected 0 <= dropout < 1")
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), _ACTIVATIONS[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, out_features))
        super().__init__(*layers)
        self.in_features = in_features
        self.out_features = out_features
