"""The callbacks that log ``complexity/<name>``: norms, margins and counts (Jiang et al. 2020), the Fisher–Rao norm."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch.nn.functional as F
from torch import nn

from . import measures
from ._initial import InitialWeights
from .base import SharpnessCallback, Values


class ComplexityMeasures(InitialWeights, SharpnessCallback):
    """Jiang et al. (2020)'s norm, margin and count measures of the BatchNorm-folded network on the fixed subset.

    Parameter count, inverse margin (10th percentile), log product and log sum of the layers' spectral and
    Frobenius norms (also over the margin), Frobenius over spectral, parameter norm, path-norm (also over
    the margin) and, against the initial weights the callback keeps from the start of fit (in its checkpoint
    state), the Frobenius and spectral distances to initialization (formulas:
    :mod:`flatminima.callbacks.norms`). One forward pass over the subset: every rank computes it on the whole
    subset, so no collective is needed. BatchNorm that cannot be folded, inputs that are not tensors and
    targets that are not class labels are refused before training.

    Logs ``complexity/<key>`` for every key of :func:`flatminima.callbacks.measures.norm_measures` (``params``,
    ``inverse_margin``, ``log_prod_spec``, ``log_prod_spec_over_margin``, ``log_sum_spec``,
    ``log_sum_spec_over_margin``, ``log_prod_fro``, ``log_prod_fro_over_margin``, ``log_sum_fro``,
    ``log_sum_fro_over_margin``, ``fro_over_spec``, ``log_spec_orig_main``, ``param_norm``, ``path_norm``,
    ``path_norm_over_margin``, ``fro_dist``, ``dist_spec_init``, ``log_spec_init_main``); an instance told
    apart from others of its class appends its suffix (``complexity/param_norm_num_samples512``).

    Args:
        name: Instance name (default ``"complexity"``; the keys do not contain it).
        batch_size: Batch size of the subset's batches (default 256).
        **kwargs: The other :class:`~flatminima.callbacks.base.SharpnessCallback` options (schedule, subset, network).
    """

    def __init__(self, name: str = "complexity", batch_size: int = 256, **kwargs: Any) -> None:
        super().__init__(name, batch_size=batch_size, loss_fn=F.cross_entropy, sampling="subset", **kwargs)

    def check_batch(self, network: nn.Module, batch: Any) -> None:
        """The network's BatchNorm must fold, its inputs be tensors and its targets class labels."""
        measures.norm_measures(network, [batch])

    def compute(
        self, network: nn.Module, batches: list[Any], reduce: measures.Reduce | None, trainer: pl.Trainer
    ) -> Values:
        suffix = self.metric_name[len(self.name) :]
        values = measures.norm_measures(
            network, self.all_batches(trainer, trainer.lightning_module), initial=self.initial
        )
        return {f"complexity/{key}{suffix}": value for key, value in values.items()}


class FisherRaoNorm(SharpnessCallback):
    """The squared Fisher–Rao norm (1/n) Σ_i ⟨w, ∇_w ℓ_i⟩² (Liang et al. 2019) on the fixed subset.

    Over all trainable parameters, from one forward-mode pass per batch
    (:func:`flatminima.callbacks.measures.fisher_rao_norm`); ``loss_fn`` must be a mean over the examples.

    Logs:
        ``complexity/<name>``: the squared norm.

    Args:
        name: Metric name (default ``"fisher_rao"``).
        batch_size: Batch size of the subset's batches (default 256).
        **kwargs: The other :class:`~flatminima.callbacks.base.SharpnessCallback` options (schedule, subset, loss, network).
    """

    def __init__(self, name: str = "fisher_rao", batch_size: int = 256, **kwargs: Any) -> None:
        super().__init__(name, batch_size=batch_size, sampling="subset", **kwargs)

    def compute(
        self, network: nn.Module, batches: list[Any], reduce: measures.Reduce | None, trainer: pl.Trainer
    ) -> Values:
        return {
            f"complexity/{self.metric_name}": measures.fisher_rao_norm(
                network, batches, loss_fn=self.loss_fn, reduce=reduce
            )
        }
