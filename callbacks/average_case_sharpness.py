"""Average-case sharpness (Andriushchenko et al. 2023) as a Lightning callback."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from torch import nn

from flatminima.lightning_modules.validation import check_float, check_int, check_p

from . import measures
from .base import SharpnessCallback, Values


class AverageSharpness(SharpnessCallback):
    """Average-case (adaptive) sharpness E_δ L(w + δ) − L(w) (Andriushchenko et al. 2023) with its standard error.

    δ = ρ c ⊙ z with c = |w| (adaptive) or 1, z Gaussian (p = 2) or uniform in [−1, 1] (p = ∞), ``samples``
    seeded draws, each applied to every batch of the fixed subset
    (:func:`flatminima.callbacks.measures.average_sharpness`).

    Logs:
        ``sharpness/<name>``: the Monte-Carlo mean.
        ``sharpness/<name>_stderr``: its standard error over the draws.

    Args:
        rho: Noise scale ρ ≥ 0.
        p: 2 (Gaussian) or ``float("inf")`` (uniform in the box).
        adaptive: c = |w| instead of 1.
        samples: Noise draws (each one forward pass over the subset).
        name: Metric name (default ``"average"``).
        batch_size: Batch size of the subset's batches (default 256).
        **kwargs: The other :class:`~flatminima.callbacks.base.SharpnessCallback` options (schedule, subset, loss, network).
    """

    identity_args = ("rho", "p", "adaptive", "samples") + SharpnessCallback.identity_args

    def __init__(
        self,
        rho: float,
        p: float = 2.0,
        adaptive: bool = True,
        samples: int = 20,
        name: str = "average",
        batch_size: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, batch_size=batch_size, sampling="subset", **kwargs)
        self.rho = check_float("rho", rho)
        self.p = check_p(p, allowed=(2.0, math.inf))
        self.adaptive = bool(adaptive)
        self.samples = check_int("samples", samples)

    def compute(
        self, network: nn.Module, batches: list[Any], reduce: measures.Reduce | None, trainer: pl.Trainer
    ) -> Values:
        estimate = measures.average_sharpness(
            network,
            batches,
            self.rho,
            p=self.p,
            adaptive=self.adaptive,
            samples=self.samples,
            seed=self.seed,
            loss_fn=self.loss_fn,
            reduce=reduce,
        )
        key = f"sharpness/{self.metric_name}"
        return {key: estimate.value, f"{key}_stderr": estimate.stderr}
