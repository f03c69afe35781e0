"""Weight initialisation schemes that the networks offer besides PyTorch's defaults, and the pre-activation head."""

from __future__ import annotations

from typing import Literal

from torch import nn

WeightInit = Literal["default", "xavier"]
WEIGHT_INITS = ("default", "xavier")


def init_weights(module: nn.Module, scheme: WeightInit) -> None:
    """Re-initialise the Linear and Conv layers of ``module`` in place.

    ``"default"`` keeps PyTorch's initialisation; ``"xavier"`` draws every Linear/Conv weight from
    Glorot & Bengio's (2010) uniform distribution U(−a, a), a = √(6 / (fan_in + fan_out)), and zeroes
    the biases (Hammoud, Liossatos & Nicollier (2023) train their pools "from Xavier-initialized weights").
    """
    if scheme == "default":
        return
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def preact_head(channels: int, num_classes: int) -> nn.Sequential:
    """The head of a pre-activation residual network: BN → ReLU → global average pooling → Linear."""
    return nn.Sequential(
        nn.BatchNorm2d(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)
    )


def kaiming_convs(module: nn.Module) -> None:
    """He et al.'s (2015) normal initialisation (fan-out, ReLU gain) of every Conv2d weight of ``module``."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
