"""Top Hessian eigenvalues and the Hessian trace as a Lightning callback."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch.nn.functional as F
from torch import nn

from flatminima.lightning_modules.validation import check_choice, check_float, check_int

from . import measures
from .base import SharpnessCallback, Values


class HessianSpectrum(SharpnessCallback):
    """Top Hessian eigenvalues (Lanczos) and the Hessian trace (Hutchinson or exact) at checkpoints.

    On exact Hessian-vector products (double backward on the unwrapped network), H the Hessian of the
    mean batch loss on the fixed subset (:func:`flatminima.callbacks.measures.hessian_eigenvalues`,
    :func:`flatminima.callbacks.measures.hutchinson_trace`, :func:`flatminima.callbacks.measures.hessian_trace`).

    Logs:
        ``sharpness/<name>_eig<i>`` for i = 1..k: the i-th largest eigenvalue.
        ``sharpness/<name>_trace``: Tr H (when ``trace`` is not ``"none"``).
        ``sharpness/<name>_trace_stderr``: Hutchinson's standard error (``trace="hutchinson"``).

    Args:
        k: Number of top eigenvalues (0: none).
        tol: Lanczos relative residual tolerance.
        max_iter: Maximum Hessian-vector products of Lanczos.
        trace: ``"hutchinson"``, ``"exact"`` (cross-entropy ReLU chains) or ``"none"``.
        n_probes: Rademacher probes of Hutchinson's estimator.
        cache_graphs: Keep the batches' gradient graphs between products (faster, more memory).
        name: Metric prefix (default ``"hessian"``).
        batch_size: Batch size of the subset's batches (default 256).
        **kwargs: The other :class:`~flatminima.callbacks.base.SharpnessCallback` options.
    """

    identity_args = ("k", "tol", "max_iter", "trace", "n_probes") + SharpnessCallback.identity_args

    def __init__(
        self,
        k: int = 1,
        tol: float = 1e-4,
        max_iter: int = 100,
        trace: Literal["hutchinson", "exact", "none"] = "hutchinson",
        n_probes: int = 100,
        cache_graphs: bool = True,
        name: str = "hessian",
        batch_size: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, batch_size=batch_size, sampling="subset", **kwargs)
        self.k = check_int("k", k, 0)
        self.tol = check_float("tol", tol, strict=True)
        self.max_iter = check_int("max_iter", max_iter, max(k, 1))
        self.trace = check_choice("trace", trace, ("hutchinson", "exact", "none"))
        self.n_probes = check_int("n_probes", n_probes, 1)
        self.cache_graphs = cache_graphs
        if k == 0 and trace == "none":
            raise ValueError("Invalid k: 0 with trace='none'; HessianSpectrum would measure nothing")
        if trace == "exact" and self.loss_fn is not F.cross_entropy:
            raise ValueError("Invalid trace: 'exact' applies to the cross-entropy loss only; use 'hutchinson'")

    def compute(
        self, network: nn.Module, batches: list[Any], reduce: measures.Reduce | None, trainer: pl.Trainer
    ) -> Values:
        out: Values = {}
        if self.k:
            values = measures.hessian_eigenvalues(
                network,
                batches,
                self.k,
                loss_fn=self.loss_fn,
                tol=self.tol,
                max_iter=self.max_iter,
                seed=self.seed,
                cache_graphs=self.cache_graphs,
                reduce=reduce,
            )
            out.update({f"sharpness/{self.metric_name}_eig{i + 1}": v for i, v in enumerate(values)})
        if self.trace == "hutchinson":
            estimate = measures.hutchinson_trace(
                network,
                batches,
                n_probes=self.n_probes,
                loss_fn=self.loss_fn,
                seed=self.seed,
                cache_graphs=self.cache_graphs,
                reduce=reduce,
            )
            out[f"sharpness/{self.metric_name}_trace"] = estimate.value
            out[f"sharpness/{self.metric_name}_trace_stderr"] = estimate.stderr
        elif self.trace == "exact":
            out[f"sharpness/{self.metric_name}_trace"] = measures.layer_traces(network, batches, reduce=reduce).total
        return out
