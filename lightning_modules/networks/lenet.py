"""LeNet-5 with BatchNorm and dropout: the FashionMNIST network of Hammoud et al. 2023."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..validation import check_choice, check_fraction, check_int, check_ints
from ._init import WEIGHT_INITS, WeightInit, init_weights


class LeNet5(nn.Sequential):
    """LeNet-5 (LeCun et al., 1998) with BatchNorm after the convs and dropout after the hidden linear layers.

    Hammoud et al. 2023 (section III.B): two 5×5 convolutions, each followed by batch
    normalization, ReLU and 2×2 max pooling; then fully connected layers 120 → 84 → classes with
    dropout 0.5 after the first two. The first conv pads by 2, so a 28×28 FashionMNIST image takes
    the path of the original 32×32 input::

        Conv5x5(C→c1, pad) → BN → ReLU → MaxPool2 → Conv5x5(c1→c2) → BN → ReLU → MaxPool2 → Flatten
        → [Linear → ReLU → Dropout]* → Linear(·, classes)

    with ``s = ((image_size + 2·padding − 4) // 2 − 4) // 2`` (5 for 28×28 with padding 2). A plain
    chain (``nn.Sequential``), so layer-wise measures can walk it. 61,750 parameters for 28×28×1 and
    10 classes. The authors' notebook uses a wider variant: ``channels: [12, 32]``, ``hidden: [256, 128]``,
    ``padding: 0`` (its dropout before the ReLU is the same map), 175,546 parameters.

    Args:
        in_channels: Input channels (1 for FashionMNIST) (must match the data).
        num_classes: Number of output logits (must match the data).
        image_size: Input height (= width) (must match the data; at least 12 with padding 2).
        dropout: Dropout probability after each hidden linear layer.
        weight_init: ``"default"`` (PyTorch's) or ``"xavier"`` (Glorot uniform weights, zero biases).
        channels: Output channels of the two convolutions.
        hidden: Widths of the hidden linear layers.
        padding: Zero padding of the first convolution.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        dropout: float = 0.5,
        weight_init: WeightInit = "default",
        channels: Sequence[int] = (6, 16),
        hidden: Sequence[int] = (120, 84),
        padding: int = 2,
    ) -> None:
        in_channels = check_int("in_channels", in_channels)
        num_classes = check_int("num_classes", num_classes)
        image_size = check_int("image_size", image_size)
        dropout = check_fraction("dropout", dropout)
        weight_init = check_choice("weight_init", weight_init, WEIGHT_INITS)
        channels = check_ints("channels", channels, allow_empty=False)
        if len(channels) != 2:
            raise ValueError(f"Invalid channels: {channels!r}; expected two integers >= 1 (the two convolutions)")
        hidden = check_ints("hidden", hidden)
        padding = check_int("padding", padding, 0)
        side = ((image_size + 2 * padding - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(
                f"Invalid image_size: {image_size}; LeNet5 with padding {padding} needs image_size >= {16 - 2 * padding}"
            )
        c1, c2 = channels
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, c1, 5, padding=padding),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        ]
        width = c2 * side * side
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)
        init_weights(self, weight_init)
        self.in_channels = in_channels
        self.image_size = image_size
        self.out_features = num_classes
