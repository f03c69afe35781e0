"""Epoch means of the step's values (``train/loss``, ``val/loss``, ...), weighted by batch size: torchmetrics.

Each value has one :class:`EpochMean`, a torchmetrics ``MeanMetric`` whose states are float64 sums on the
module's device (no host sync per step) and whose ``compute()`` sums them over the DDP ranks::

    mean = Σ_ranks Σ_batches nᵦ·vᵦ  /  Σ_ranks Σ_batches nᵦ          (nᵦ: the batch size)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torchmetrics.aggregation import MeanMetric

__all__ = ["EpochMean", "EpochMeans"]


class EpochMean(MeanMetric):
    """``MeanMetric`` in float64, weighted by the batch size, with no host sync in ``update``.

    Two departures from torchmetrics 1.9's ``MeanMetric``, both to keep the mean exact and free:

    * ``update`` adds ``weight·value`` and ``weight`` and checks nothing. The stock update checks for NaN
      with a host sync (``nan_strategy`` ``"error"``, ``"warn"``, ``"ignore"``, a float), and with
      ``nan_strategy="disable"`` it replaces the weights by ones (Lightning-AI/torchmetrics#3434). A NaN
      value makes the mean NaN, as a plain mean would; ``TwoPassModule(on_nonfinite=...)`` decides about NaN.
    * The states stay float64 when the module is cast (``.to(torch.bfloat16)``, as Lightning's
      ``"bf16-true"`` precision does): the sums of a large loss stay finite, and float64 runs log
      float64 means (a float32 cast of the mean is the caller's choice).
    """

    def __init__(self) -> None:
        super().__init__(nan_strategy="disable")
        self.set_dtype(torch.float64)

    def update(self, value: Tensor, weight: float = 1.0) -> None:  # type: ignore[override]
        """Add ``weight·value`` (``value`` a 0-dim tensor, detached) and ``weight`` to the sums, on the device."""
        self.mean_value.add_(value.detach().to(torch.float64) * weight)  # add_, not +=: no Metric.__setattr__
        self.weight.add_(weight)

    def _apply(self, fn: Callable, exclude_state: Sequence[str] = ()) -> nn.Module:
        """Move the states with the module, and keep them float64 when the module is cast."""
        this = super()._apply(fn, exclude_state)
        if this.mean_value.dtype != torch.float64:
            this.set_dtype(torch.float64)
        return this


class EpochMeans(nn.Module):
    """The epoch means of one stage's step values, one :class:`EpochMean` per name.

    Args:
        names: The values' names (``"loss"``, ``"grad_norm"``, ...), in logging order.
    """

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__()
        self.means = nn.ModuleDict({name: EpochMean() for name in names})

    @property
    def device(self) -> torch.device:
        """Where the sums are."""
        return next(iter(self.means.values())).device

    def update(self, values: dict[str, Tensor], batch_size: int) -> None:
        """Add one batch's values, each weighted by ``batch_size`` (on the device, no host sync)."""
        for name, value in values.items():
            self.means[name].update(value, batch_size)

    def compute(self) -> dict[str, Tensor]:
        """The float64 means of the values updated since the last reset, summed over the DDP ranks."""
        return {name: mean.compute() for name, mean in self.means.items() if mean.update_called}

    def reset(self) -> None:
        """Start a new epoch."""
        for mean in self.means.values():
            mean.reset()
