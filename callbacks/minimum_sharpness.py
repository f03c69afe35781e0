"""Minimum sharpness (Ibayashi et al. 2021) as a Lightning callback."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch.nn.functional as F
from torch import nn

from flatminima.lightning_modules.validation import check_choice, check_float, check_int

from . import measures
from .base import SharpnessCallback, Values


class MinimumSharpness(SharpnessCallback):
    """Minimum sharpness (Ibayashi et al. 2021) of the network at checkpoints.

    MS = min over α-scale transformations of Tr H of the mean cross-entropy on the fixed subset, from the
    exact per-layer traces (:func:`flatminima.callbacks.measures.minimum_sharpness`). The network must be a
    feed-forward ReLU chain (BatchNorm after a layer is folded); others raise ``ValueError``. The loss is
    the cross-entropy (no ``loss_fn``) and the subset is drawn without replacement (no ``sampling``).

    Logs:
        ``sharpness/<name>``: MS.
        ``sharpness/<name>_trace``: Tr H at the current scaling (Σ_d T_d + B_d, exact).

    Example::

        trainer = Trainer(callbacks=[LossThresholdCheckpoint(threshold=0.01, every_n_epochs=50),
                                     MinimumSharpness(num_samples=1024)])

    Args:
        solver: ``"exact"`` (Newton) or ``"sgd"`` (the original code; ``lr``, ``steps``, ``decay``,
            ``retries`` apply to it only; Bejan et al.: lr 0.1 FashionMNIST / 0.5 CIFAR-10,
            100 000 steps).
        lr: Learning rate of the ``"sgd"`` solver.
        steps: Steps of the ``"sgd"`` solver.
        decay: Learning-rate decay of the ``"sgd"`` solver.
        retries: Restarts of the ``"sgd"`` solver.
        name: Metric name (default ``"minimum"``).
        batch_size: Batch size of the subset's batches (default 256).
        **kwargs: The other :class:`~flatminima.callbacks.base.SharpnessCallback` options (schedule, subset, network).
    """

    identity_args = ("solver", "lr", "steps", "decay", "retries") + SharpnessCallback.identity_args

    def __init__(
        self,
        solver: Literal["exact", "sgd"] = "exact",
        lr: float = 0.1,
        steps: int = 10_000,
        decay: float = 1e-3,
        retries: int = 0,
        name: str = "minimum",
        batch_size: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, batch_size=batch_size, loss_fn=F.cross_entropy, sampling="subset", **kwargs)
        self.solver = check_choice("solver", solver, ("exact", "sgd"))
        self.lr = check_float("lr", lr, strict=True)
        self.steps = check_int("steps", steps, 1)
        self.decay = check_float("decay", decay)
        self.retries = check_int("retries", retries, 0)

    def check_batch(self, network: nn.Module, batch: Any) -> None:
        """The network must be a supported feed-forward chain, and run on the batch's inputs."""
        measures.feed_forward_layers(network)
        measures.check_batch(network, batch, None)

    def compute(
        self, network: nn.Module, batches: list[Any], reduce: measures.Reduce | None, trainer: pl.Trainer
    ) -> Values:
        traces = measures.layer_traces(network, batches, reduce=reduce)
        value = measures.minimize_scaled_trace(
            traces.weight,
            traces.bias,
            solver=self.solver,
            lr=self.lr,
            steps=self.steps,
            decay=self.decay,
            retries=self.retries,
        )
        return {f"sharpness/{self.metric_name}": value, f"sharpness/{self.metric_name}_trace": traces.total}
