"""Weight initialisation schemes that the networks offer besides PyTorch's defaults."""

from __future__ import annotations

from typing import Literal

from torch import nn

WeightInit = Literal["default", "xavier"]
WEIGHT_INITS = ("default", "xavier")


def init_weights(module: nn.Module, scheme: WeightInit) -> None:
    """Re-initialise the Linear and Conv layers of ``module`` in place.

    ``"default"`` keeps PyTorch's initialisation; ``"xavier"`` draws every Linear/Conv weight from
    Glorot & Bengio's (2010) uniform distribution U(−a, a), a = √(6 / (fan_in + fan_out)), and zeroes
    the biases (seed 002 trains its pools "from Xavier-initialized weights").
    """
    if scheme == "default":
        return
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
