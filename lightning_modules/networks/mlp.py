"""Fully connected networks: the moons MLP of the Adaptive-GSAM study and Hammoud et al.'s Abalone FCNN."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import nn

from ..validation import check_choice, check_fraction, check_int, check_ints
from ._init import WEIGHT_INITS, WeightInit, init_weights

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "leaky_relu": nn.LeakyReLU}
Activation = Literal["relu", "tanh", "elu", "leaky_relu"]


class MLP(nn.Sequential):
    """Multi-layer perceptron: Linear → activation, repeated, then a Linear output layer [→ activation].

    The default is the moons network of the Adaptive-GSAM study (2 → 32 → 32 → 32 → 2, ReLU); its
    authors' Keras code has one sigmoid output instead (``out_features=1`` with ``BinaryClassifier``,
    which applies the sigmoid inside its loss). A feed-forward chain (an ``nn.Sequential`` of Linear
    and activation layers), so layer-wise measures can walk it::

        x → [Linear → activation → Dropout]* → Linear [→ output_activation]

    Args:
        in_features: Input dimension (2 for moons, 10 for Abalone).
        hidden: Widths of the hidden layers.
        out_features: Output dimension: the number of classes, or 1 for a scalar regression.
        activation: Nonlinearity after every hidden layer.
        dropout: Dropout probability after every hidden activation (0 = none).
        weight_init: ``"default"`` (PyTorch's) or ``"xavier"`` (Glorot uniform weights, zero biases).
        output_activation: Nonlinearity after the output layer too (None: linear outputs). Hammoud
            et al.'s notebook applies ELU after every layer of its Abalone FCNN, output included.
    """

    def __init__(
        self,
        in_features: int = 2,
        hidden: Sequence[int] = (32, 32, 32),
        out_features: int = 2,
        activation: Activation = "relu",
        dropout: float = 0.0,
        weight_init: WeightInit = "default",
        output_activation: Activation | None = None,
    ) -> None:
        in_features = check_int("in_features", in_features)
        out_features = check_int("out_features", out_features)
        hidden = check_ints("hidden", hidden)
        activation = check_choice("activation", activation, sorted(_ACTIVATIONS))
        if output_activation is not None:
            output_activation = check_choice("output_activation", output_activation, sorted(_ACTIVATIONS))
        dropout = check_fraction("dropout", dropout)
        weight_init = check_choice("weight_init", weight_init, WEIGHT_INITS)
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), _ACTIVATIONS[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, out_features))
        if output_activation is not None:
            layers.append(_ACTIVATIONS[output_activation]())
        super().__init__(*layers)
        init_weights(self, weight_init)
        self.in_features = in_features
        self.out_features = out_features


class FCNN(MLP):
    """Hammoud et al.'s fully connected regression network for Abalone: 10 → 64 → 64 → 1 with ReLU.

    The :class:`MLP` with other default sizes (Hammoud et al. 2023, "Adaptive Sharpness and
    Generalization", section III.A); train it with ``Regressor`` (mean squared error). Their notebook
    uses ELU after every layer, output included (``activation: elu, output_activation: elu``), and
    PyTorch's default initialisation; their text says ReLU and Xavier.

    Args:
        in_features: Input dimension (10 one-hot/standardised Abalone features).
        hidden: Widths of the hidden layers.
        out_features: Output dimension (1: the number of rings).
        activation: Nonlinearity after every hidden layer.
        dropout: Dropout probability after every hidden activation (0 = none).
        weight_init: ``"default"`` (PyTorch's) or ``"xavier"`` (Glorot uniform weights, zero biases).
        output_activation: Nonlinearity after the output layer (None: a linear output).
    """

    def __init__(
        self,
        in_features: int = 10,
        hidden: Sequence[int] = (64, 64),
        out_features: int = 1,
        activation: Activation = "relu",
        dropout: float = 0.0,
        weight_init: WeightInit = "default",
        output_activation: Activation | None = None,
    ) -> None:
        super().__init__(in_features, hidden, out_features, activation, dropout, weight_init, output_activation)
