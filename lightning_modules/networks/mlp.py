"""Fully connected networks: seed 003's moons MLP and seed 002's Abalone FCNN."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import nn

from ._checks import check_choice, check_int, check_ints, check_probability
from ._init import WEIGHT_INITS, WeightInit, init_weights

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
        weight_init: ``"default"`` (PyTorch's) or ``"xavier"`` (Glorot uniform weights, zero biases).
    """

    def __init__(
        self,
        in_features: int = 2,
        hidden: Sequence[int] = (32, 32, 32),
        out_features: int = 2,
        activation: Literal["relu", "tanh", "elu", "leaky_relu"] = "relu",
        dropout: float = 0.0,
        weight_init: WeightInit = "default",
    ) -> None:
        check_int("in_features", in_features)
        check_int("out_features", out_features)
        hidden = check_ints("hidden", hidden)
        check_choice("activation", activation, sorted(_ACTIVATIONS))
        check_probability("dropout", dropout)
        check_choice("weight_init", weight_init, WEIGHT_INITS)
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), _ACTIVATIONS[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, out_features))
        super().__init__(*layers)
        init_weights(self, weight_init)
        self.in_features = in_features
        self.out_features = out_features


class FCNN(MLP):
    """Seed 002's fully connected regression network for Abalone: 10 → 64 → 64 → 1 with ReLU.

    The :class:`MLP` with other default sizes (Hammoud et al., "Adaptive Sharpness and
    Generalization", seed 002, section III.A); train it with ``Regressor`` (mean squared error).

    Args:
        in_features: Input dimension (10 one-hot/standardised Abalone features).
        hidden: Widths of the hidden layers.
        out_features: Output dimension (1: the number of rings).
        activation: Nonlinearity after every hidden layer.
        dropout: Dropout probability after every hidden activation (0 = none).
        weight_init: ``"default"`` (PyTorch's) or ``"xavier"`` (seed 002's Glorot initialisation).
    """

    def __init__(
        self,
        in_features: int = 10,
        hidden: Sequence[int] = (64, 64),
        out_features: int = 1,
        activation: Literal["relu", "tanh", "elu", "leaky_relu"] = "relu",
        dropout: float = 0.0,
        weight_init: WeightInit = "default",
    ) -> None:
        super().__init__(in_features, hidden, out_features, activation, dropout, weight_init)
