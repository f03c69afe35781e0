"""CIFAR-style residual networks (He et al., 2016).

ResNet-18 is the network of Khalid, Ponraj & Mukherjee and one of Wong, Yao & Huang's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..validation import check_int, check_ints


class BasicBlock(nn.Module):
    """Two 3×3 conv–BN layers with an identity (or 1×1 conv–BN projection) shortcut.

    ``out = ReLU(BN(conv(ReLU(BN(conv(x))))) + shortcut(x))`` (He et al., 2016, figure 2).

    Args:
        in_channels: Input channels.
        channels: Output channels.
        stride: Stride of the first conv (2 halves the map; the shortcut then projects).
    """

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet for small images (He et al., 2016, "Deep residual learning for image recognition").

    The ImageNet layout adapted to 32×32 inputs as is usual for CIFAR-10: a 3×3 stem conv (64
    channels, stride 1, no max pooling), four stages of :class:`BasicBlock` with 64, 128, 256, 512
    channels (stride 2 at the start of stages 2–4), global average pooling and a linear layer::

        Conv3x3(C→64) → BN → ReLU → stage(64) → stage(128, /2) → stage(256, /2) → stage(512, /2)
        → AdaptiveAvgPool(1) → Flatten → Linear(512, classes)

    Args:
        in_channels: Input channels (3 for CIFAR-10) (must match the data).
        num_classes: Number of output logits (must match the data).
        blocks: Number of blocks per stage (``[2, 2, 2, 2]`` is ResNet-18, ``[3, 4, 6, 3]`` ResNet-34).
        width: Channels of the stem and of the first stage (doubled at every later stage).
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        blocks: Sequence[int] = (2, 2, 2, 2),
        width: int = 64,
    ) -> None:
        super().__init__()
        in_channels = check_int("in_channels", in_channels)
        num_classes = check_int("num_classes", num_classes)
        blocks = check_ints("blocks", blocks, allow_empty=False)
        width = check_int("width", width)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        stages: list[nn.Module] = []
        channels = width
        for i, n in enumerate(blocks):
            out = width * 2**i
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(channels, out, stride)] + [BasicBlock(out, out) for _ in range(n - 1)]
            stages.append(nn.Sequential(*stage))
            channels = out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
        self.in_channels = in_channels
        self.out_features = num_classes

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(x)))


class ResNet18(ResNet):
    """ResNet-18 for CIFAR-10: :class:`ResNet` with two basic blocks per stage, 11,173,962 parameters.

    The CIFAR variant of He et al. (2016) used by Khalid, Ponraj & Mukherjee and by Wong, Yao & Huang: 3×3 stem,
    no max pooling, stages of 64–512 channels, global average pooling.

    Args:
        in_channels: Input channels (3 for CIFAR-10) (must match the data).
        num_classes: Number of output logits (must match the data).
        width: Channels of the first stage (64 is ResNet-18; other values give the width-k ResNet-18
            family of Nakkiran et al., 2020).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 64) -> None:
        super().__init__(in_channels, num_classes, (2, 2, 2, 2), width)
