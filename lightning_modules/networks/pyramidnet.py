"""Deep pyramidal residual networks (Han, Kim & Kim, 2017): one of the architectures of Wong, Yao & Huang."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..validation import check_float, check_int, is_integer
from ._init import kaiming_convs, preact_head


class PyramidBlock(nn.Module):
    """Pyramidal residual unit: BN-first residual branch, average-pooled and zero-padded shortcut.

    Basic: ``BN → conv3×3 → BN → ReLU → conv3×3 → BN``; bottleneck: ``BN → conv1×1 → BN → ReLU →
    conv3×3 → BN → ReLU → conv1×1 (×4) → BN`` (Han et al., 2017, figure 6(d); no ReLU after the
    addition). The shortcut is a 2×2 average pooling when the stride is 2, with the missing channels
    filled by zeros (the paper's zero-padded identity shortcut).

    Args:
        in_channels: Input channels.
        channels: Width of the unit (the output has ``channels`` or ``4 · channels`` if bottleneck).
        stride: Stride of the 3×3 conv.
        bottleneck: Use the bottleneck unit.
    """

    def __init__(self, in_channels: int, channels: int, stride: int, bottleneck: bool) -> None:
        super().__init__()
        self.out_channels = channels * (4 if bottleneck else 1)
        if bottleneck:
            self.branch = nn.Sequential(
                nn.BatchNorm2d(in_channels),
                nn.Conv2d(in_channels, channels, 1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(),
                nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(),
                nn.Conv2d(channels, self.out_channels, 1, bias=False),
                nn.BatchNorm2d(self.out_channels),
            )
        else:
            self.branch = nn.Sequential(
                nn.BatchNorm2d(in_channels),
                nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(),
                nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels),
            )
        self.pool = nn.AvgPool2d(2, ceil_mode=True) if stride != 1 else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.branch(x)
        shortcut = x if self.pool is None else self.pool(x)
        missing = out.shape[1] - shortcut.shape[1]
        if missing > 0:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, missing))
        return out + shortcut


class PyramidNet(nn.Module):
    """PyramidNet for CIFAR (Han, Kim & Kim, 2017, "Deep pyramidal residual networks").

    The width grows linearly by ``alpha / N`` at each of the ``N`` units instead of doubling at the
    stages: unit ``k`` (1-based) has ``round(16 + alpha · k / N)`` channels. A 3×3 stem conv (16) → BN,
    three stages of ``n`` units (stride 2 at stages 2 and 3), ``N = 3n``, ``n = (depth − 2) / 6``
    (basic) or ``(depth − 2) / 9`` (bottleneck), then BN → ReLU → global average pooling → Linear.
    PyramidNet-110 (α = 48, basic; the default) has 1,772,706 parameters for 10 classes and
    PyramidNet-272 (α = 200, bottleneck) 26,210,842 (the paper's table 4: 1.7M and 26.0M).

    Args:
        in_channels: Input channels (3 for CIFAR-10) (must match the data).
        num_classes: Number of output logits (must match the data).
        depth: Total depth: ``6n + 2`` (basic) or ``9n + 2`` (bottleneck).
        alpha: Total widening α (the widths grow from 16 to 16 + α).
        bottleneck: Use bottleneck units (output width ×4).
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        depth: int = 110,
        alpha: float = 48.0,
        bottleneck: bool = False,
    ) -> None:
        super().__init__()
        in_channels = check_int("in_channels", in_channels)
        num_classes = check_int("num_classes", num_classes)
        alpha = check_float("alpha", alpha, strict=True)
        per_unit = 9 if bottleneck else 6
        if not is_integer(depth) or depth < per_unit + 2 or (depth - 2) % per_unit:
            raise ValueError(
                f"Invalid depth: {depth!r}; expected {per_unit}n + 2 with n >= 1 for "
                f"{'bottleneck' if bottleneck else 'basic'} units"
            )
        n = (depth - 2) // per_unit
        total = 3 * n
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        units: list[nn.Module] = []
        channels = 16
        for k in range(1, total + 1):
            stride = 2 if k in (n + 1, 2 * n + 1) else 1
            unit = PyramidBlock(channels, int(round(16 + alpha * k / total)), stride, bottleneck)
            units.append(unit)
            channels = unit.out_channels
        self.units = nn.Sequential(*units)
        self.head = preact_head(channels, num_classes)
        kaiming_convs(self)
        self.in_channels = in_channels
        self.out_features = num_classes

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.units(self.stem(x)))
