"""A small CNN with two conv and two dense layers for MNIST.

The network of "Improving Sharpness-Aware Minimisation" (Oxford report, 2024).
"""

from __future__ import annotations

from torch import nn

from ..validation import check_fraction, check_int


class SmallCNN(nn.Sequential):
    """Two 3×3 convolutions and two dense layers: an MNIST classifier.

    "Improving Sharpness-Aware Minimisation" (Oxford report, 2024), section 6, trains "a simple CNN with 2
    convolutional layers and 2 dense layers" on MNIST with a Keras GSAM implementation. The layer
    sizes are those of the classic Keras MNIST CNN example::

        Conv3x3(C→32) → ReLU → Conv3x3(32→64) → ReLU → MaxPool2 → Dropout(conv_dropout) → Flatten
        → Linear(64·s·s, hidden) → ReLU → Dropout(dropout) → Linear(hidden, classes)

    with ``s = (image_size − 4) // 2`` (12 for MNIST: 1,199,882 parameters with 10 classes). A plain
    chain (``nn.Sequential``), so layer-wise measures can walk it.

    Args:
        in_channels: Input channels (1 for MNIST) (must match the data).
        num_classes: Number of output logits (must match the data).
        image_size: Input height (= width), at least 6 (must match the data).
        hidden: Width of the first dense layer.
        conv_dropout: Dropout probability after the pooling (0 = none).
        dropout: Dropout probability after the first dense layer (0 = none).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        hidden: int = 128,
        conv_dropout: float = 0.25,
        dropout: float = 0.5,
    ) -> None:
        in_channels = check_int("in_channels", in_channels)
        num_classes = check_int("num_classes", num_classes)
        image_size = check_int("image_size", image_size)
        if image_size < 6:
            raise ValueError(f"Invalid image_size: {image_size}; SmallCNN needs image_size >= 6")
        hidden = check_int("hidden", hidden)
        conv_dropout = check_fraction("conv_dropout", conv_dropout)
        dropout = check_fraction("dropout", dropout)
        side = (image_size - 4) // 2
        super().__init__(
            nn.Conv2d(in_channels, 32, 3),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Dropout(conv_dropout),
            nn.Flatten(),
            nn.Linear(64 * side * side, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        self.in_channels = in_channels
        self.image_size = image_size
        self.out_features = num_classes
