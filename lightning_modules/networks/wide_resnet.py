"""Wide residual networks (Zagoruyko & Komodakis, 2016): the WRN-16-8 of Wong, Yao & Huang."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..validation import check_fraction, check_int, is_integer
from ._init import kaiming_convs, preact_head


class WideBlock(nn.Module):
    """Pre-activation wide basic block: BN → ReLU → conv3×3 → BN → ReLU → dropout → conv3×3, plus shortcut.

    The shortcut is the identity, or a 1×1 conv of the activated input when the width or the
    stride changes (Zagoruyko & Komodakis, 2016, "B(3,3)" block with dropout between the convs).

    Args:
        in_channels: Input channels.
        channels: Output channels.
        stride: Stride of the first conv.
        dropout: Dropout probability between the two convs.
    """

    def __init__(self, in_channels: int, channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = torch.relu(self.bn1(x))
        out = self.conv1(act)
        out = self.conv2(self.dropout(torch.relu(self.bn2(out))))
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(nn.Module):
    """Wide ResNet WRN-depth-width (Zagoruyko & Komodakis, 2016, "Wide residual networks").

    A 3×3 stem conv (16 channels), three groups of ``n = (depth − 4) / 6`` :class:`WideBlock` with
    16·k, 32·k, 64·k channels (``k = width``; stride 2 at groups 2 and 3), then BN → ReLU →
    global average pooling → Linear. WRN-16-8 (the default, the network of Wong, Yao & Huang, from davda54/sam)
    has 10,961,370 parameters for 10 classes (the paper's table: 11.0M).

    Args:
        in_channels: Input channels (3 for CIFAR-10) (must match the data).
        num_classes: Number of output logits (must match the data).
        depth: Total depth, ``6n + 4`` (16, 22, 28, 40, ...).
        width: Widening factor k.
        dropout: Dropout probability between the two convs of each block.
    """

    def __init__(
        self, in_channels: int = 3, num_classes: int = 10, depth: int = 16, width: int = 8, dropout: float = 0.0
    ) -> None:
        super().__init__()
        in_channels = check_int("in_channels", in_channels)
        num_classes = check_int("num_classes", num_classes)
        width = check_int("width", width)
        dropout = check_fraction("dropout", dropout)
        if not is_integer(depth) or depth < 10 or (depth - 4) % 6:
            raise ValueError(f"Invalid depth: {depth!r}; expected 6n + 4 with n >= 1 (10, 16, 22, 28, ...)")
        n = (depth - 4) // 6
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        groups: list[nn.Module] = []
        channels = 16
        for i, out in enumerate((16 * width, 32 * width, 64 * width)):
            stride = 1 if i == 0 else 2
            blocks = [WideBlock(channels, out, stride, dropout)]
            blocks += [WideBlock(out, out, 1, dropout) for _ in range(n - 1)]
            groups.append(nn.Sequential(*blocks))
            channels = out
        self.groups = nn.Sequential(*groups)
        self.head = preact_head(channels, num_classes)
        kaiming_convs(self)
        self.in_channels = in_channels
        self.out_features = num_classes

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.groups(self.stem(x)))
