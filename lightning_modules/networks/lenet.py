"""LeNet-5 with BatchNorm and dropout: seed 002's FashionMNIST network."""

from __future__ import annotations

from torch import nn

from ._checks import check_choice, check_int, check_probability
from ._init import WEIGHT_INITS, WeightInit, init_weights


class LeNet5(nn.Sequential):
    """LeNet-5 (LeCun et al., 1998) with BatchNorm after the convs and dropout after two linear layers.

    Seed 002 (Hammoud et al., section III.B): two 5×5 convolutions, each followed by batch
    normalization, ReLU and 2×2 max pooling; then fully connected layers 120 → 84 → classes with
    dropout 0.5 after the first two. The first conv pads by 2, so a 28×28 FashionMNIST image takes
    the path of the original 32×32 input::

        Conv5x5(C→6, pad 2) → BN → ReLU → MaxPool2 → Conv5x5(6→16) → BN → ReLU → MaxPool2 → Flatten
        → Linear(16·s·s, 120) → ReLU → Dropout → Linear(120, 84) → ReLU → Dropout → Linear(84, classes)

    with ``s = (image_size // 2 - 4) // 2`` (5 for 28×28 and 6 for 32×32 inputs). A plain chain
    (``nn.Sequential``), so layer-wise measures can walk it. 61,750 parameters for 28×28×1 and 10 classes.

    Args:
        in_channels: Input channels (1 for FashionMNIST) (must match the data).
        num_classes: Number of output logits (must match the data).
        image_size: Input height (= width), at least 12 (must match the data).
        dropout: Dropout probability after the first two linear layers.
        weight_init: ``"default"`` (PyTorch's) or ``"xavier"`` (seed 002's Glorot initialisation).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        dropout: float = 0.5,
        weight_init: WeightInit = "default",
    ) -> None:
        check_int("in_channels", in_channels)
        check_int("num_classes", num_classes)
        check_int("image_size", image_size)
        if image_size < 12:
            raise ValueError(f"Invalid image_size: {image_size}; LeNet5 needs image_size >= 12")
        check_probability("dropout", dropout)
        check_choice("weight_init", weight_init, WEIGHT_INITS)
        side = (image_size // 2 - 4) // 2
        super().__init__(
            nn.Conv2d(in_channels, 6, 5, padding=2),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * side * side, 120),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(84, num_classes),
        )
        init_weights(self, weight_init)
        self.in_channels = in_channels
        self.image_size = image_size
        self.out_features = num_classes
