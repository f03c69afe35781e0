"""Plain conv–BN–ReLU chains: SimpleBatch/MiddleBatch/ComplexBatch and VGG-16 (with BN).

SimpleBatch, MiddleBatch and ComplexBatch are the networks of Bejan, Sanchez Ndoye & Vuckovic.

All of them are one configurable :class:`ConvNet`; the named networks are presets (thin subclasses
that fix ``layers`` and ``hidden``). Every one is an ``nn.Sequential`` of Conv2d, BatchNorm2d, ReLU,
MaxPool2d, Flatten, Linear (and Dropout) modules, so layer-wise sharpness measures can walk it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import nn

from ..validation import check_fraction, check_int, check_ints, is_integer

Layer = int | Literal["M"]

# Bejan, Sanchez Ndoye & Vuckovic name the nets by their number of conv layers (4, 6, 9); their appendix
# figures are not in the report, so the widths below are ours: widths double after each pooling.
SIMPLE_BATCH: tuple[Layer, ...] = (32, 32, "M", 64, 64, "M")
MIDDLE_BATCH: tuple[Layer, ...] = (32, 32, "M", 64, 64, "M", 128, 128, "M")
COMPLEX_BATCH: tuple[Layer, ...] = (32, 32, 32, "M", 64, 64, 64, "M", 128, 128, 128, "M")
# Simonyan & Zisserman (2015), configuration D, as adapted to 32x32 inputs (512 features after 5 poolings).
VGG16_LAYERS: tuple[Layer, ...] = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)


class ConvNet(nn.Sequential):
    """A chain of 3×3 conv → BatchNorm → ReLU blocks with 2×2 max pooling, then linear layers.

    ``layers`` lists the conv widths in order, ``"M"`` standing for a 2×2 max pooling (stride 2).
    The convs have padding 1 (size preserved) and no bias when followed by BatchNorm. After the
    last block the feature map (``C × s × s``, ``s = image_size // 2**pools``) is flattened and goes
    through ``Linear → ReLU [→ Dropout]`` for each width in ``hidden``, then a Linear layer to
    ``num_classes`` logits::

        x → [Conv3x3 → BN → ReLU | MaxPool2x2]* → Flatten → [Linear → ReLU → Dropout]* → Linear

    Args:
        in_channels: Input channels (1 for FashionMNIST/MNIST, 3 for CIFAR-10) (must match the data).
        num_classes: Number of output logits (must match the data).
        image_size: Height (= width) of the input images (must match the data).
        layers: Conv widths in order, ``"M"`` for a 2×2 max pooling.
        hidden: Widths of the hidden linear layers between the convs and the output layer.
        dropout: Dropout probability after each hidden linear layer (0 = none).
        batch_norm: BatchNorm after every conv (without it, the convs have a bias).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        layers: Sequence[Layer] = SIMPLE_BATCH,
        hidden: Sequence[int] = (256,),
        dropout: float = 0.0,
        batch_norm: bool = True,
    ) -> None:
        in_channels = check_int("in_channels", in_channels)
        num_classes = check_int("num_classes", num_classes)
        image_size = check_int("image_size", image_size)
        layers = list(layers)
        if not any(v != "M" for v in layers) or any(v != "M" and (not is_integer(v) or v < 1) for v in layers):
            raise ValueError(
                f"Invalid layers: {layers!r}; expected a list of conv widths (integers >= 1) and 'M' "
                "(max pooling) with at least one conv"
            )
        hidden = check_ints("hidden", hidden)
        dropout = check_fraction("dropout", dropout)
        pools = layers.count("M")
        if image_size < 2**pools:
            raise ValueError(
                f"Invalid image_size: {image_size}; the {pools} max poolings of layers need image_size >= {2**pools}"
            )
        modules: list[nn.Module] = []
        channels = in_channels
        for v in layers:
            if v == "M":
                modules.append(nn.MaxPool2d(2))
                continue
            modules.append(nn.Conv2d(channels, v, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                modules.append(nn.BatchNorm2d(v))
            modules.append(nn.ReLU())
            channels = v
        modules.append(nn.Flatten())
        width = channels * (image_size // 2**pools) ** 2
        for h in hidden:
            modules += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                modules.append(nn.Dropout(dropout))
            width = h
        modules.append(nn.Linear(width, num_classes))
        super().__init__(*modules)
        self.in_channels = in_channels
        self.image_size = image_size
        self.out_features = num_classes


class SimpleBatch(ConvNet):
    """SimpleBatch (Bejan et al.): 4 conv–BN–ReLU layers (32, 32, pool, 64, 64, pool), then 2 linear layers.

    Bejan et al., "Generalization properties of learning algorithms and SAM based on minimum
    sharpness", section III.A: "several convolutional layers, with ReLU activation
    functions, followed by 2 linear layers", with batch normalization (Jiang et al., 2019).

    Args:
        in_channels: Input channels (1 for FashionMNIST, 3 for CIFAR-10) (must match the data).
        num_classes: Number of output logits (must match the data).
        image_size: Input height (= width): 28 for FashionMNIST, 32 for CIFAR-10 (must match the data).
        hidden: Width of the hidden linear layer.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, hidden: int = 256) -> None:
        super().__init__(in_channels, num_classes, image_size, SIMPLE_BATCH, (check_int("hidden", hidden),))


class MiddleBatch(ConvNet):
    """MiddleBatch (Bejan et al.): 6 conv–BN–ReLU layers (32, 32, 64, 64, 128, 128; pooling after each pair).

    Then 2 linear layers. Bejan, Sanchez Ndoye & Vuckovic, section III.A.

    Args:
        in_channels: Input channels (1 for FashionMNIST, 3 for CIFAR-10) (must match the data).
        num_classes: Number of output logits (must match the data).
        image_size: Input height (= width): 28 for FashionMNIST, 32 for CIFAR-10 (must match the data).
        hidden: Width of the hidden linear layer.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, hidden: int = 256) -> None:
        super().__init__(in_channels, num_classes, image_size, MIDDLE_BATCH, (check_int("hidden", hidden),))


class ComplexBatch(ConvNet):
    """ComplexBatch (Bejan et al.): 9 conv–BN–ReLU layers (3 × 32, 3 × 64, 3 × 128; pooling after each triple).

    Then 2 linear layers. Bejan, Sanchez Ndoye & Vuckovic, section III.A.

    Args:
        in_channels: Input channels (1 for FashionMNIST, 3 for CIFAR-10) (must match the data).
        num_classes: Number of output logits (must match the data).
        image_size: Input height (= width): 28 for FashionMNIST, 32 for CIFAR-10 (must match the data).
        hidden: Width of the hidden linear layer.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, hidden: int = 256) -> None:
        super().__init__(in_channels, num_classes, image_size, COMPLEX_BATCH, (check_int("hidden", hidden),))


class VGG16(ConvNet):
    """VGG-16 with BatchNorm for 32×32 images (Simonyan & Zisserman, 2015, configuration D).

    13 conv–BN–ReLU layers (64, 64, M, 128, 128, M, 256 × 3, M, 512 × 3, M, 512 × 3, M) leave a
    512 × 1 × 1 map on CIFAR-10; the classifier is ``Linear(512, h) → ReLU → Dropout`` for each ``h`` in
    ``hidden``, then ``Linear(·, num_classes)``. The convs have no bias (BatchNorm follows). Parameters
    for 10 classes: ``hidden=[512]`` (default) 14,986,698 ≈ 15.0M; ``hidden=[]`` 14,724,042 (the
    pytorch-cifar variant, 14,728,266 there with its 4,224 redundant conv biases); ``hidden=[512, 512]``
    15,249,354 (the classifier of Fu's pytorch-vgg-cifar10 and of SWA). Khalid, Ponraj & Mukherjee (ResNet-18 and
    VGG-16 on CIFAR-10) and Wong, Yao & Huang (VGG) use it.

    Args:
        in_channels: Input channels (must match the data).
        num_classes: Number of output logits (must match the data).
        image_size: Input height (= width), at least 32 (five 2×2 poolings) (must match the data).
        hidden: Widths of the hidden linear layers of the classifier.
        dropout: Dropout probability after each hidden linear layer.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int = 32,
        hidden: Sequence[int] = (512,),
        dropout: float = 0.5,
    ) -> None:
        super().__init__(in_channels, num_classes, image_size, VGG16_LAYERS, hidden, dropout)
