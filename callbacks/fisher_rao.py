"""The Fisher–Rao norm of Liang, Poggio, Rakhlin & Stokes (2019) (torch only).

Liang, Poggio, Rakhlin & Stokes (2019), "Fisher-Rao metric, geometry, and complexity of neural networks"
(AISTATS; arXiv:1711.01530), definition 1 with the empirical distribution of the training examples::

    ‖w‖²_fr = (1/n) Σ_i ⟨w, ∇_w ℓ(f_w(x_i), y_i)⟩²

over all trainable parameters w. Their Lemma 2.1: for a ReLU network without biases, of L + 1 layers,
⟨w, ∇_w ℓ⟩ = (L + 1)⟨∂ℓ/∂f, f⟩ (Jiang et al. 2020 list the norm in that form). We compute the
definition directly: ⟨w, ∇_w ℓ_i⟩ = ⟨∂ℓ_i/∂f_i, J_i w⟩, with J_i w, the derivative of the outputs along w,
from one forward-mode pass (``torch.func.jvp``) per batch, so no per-example gradient is formed.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jvp

from ._core import FlatModel, LossFn, Reduce, evaluating, mean_of, prepared, unwrap

__all__ = ["fisher_rao_norm"]


def fisher_rao_norm(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    loss_fn: LossFn = F.cross_entropy,
    reduce: Reduce | None = None,
) -> float:
    """The squared empirical Fisher–Rao norm (1/n) Σ_i ⟨w, ∇_w ℓ_i⟩² (Liang et al. 2019; see the module docstring).

    ``loss_fn`` must be the mean over the examples of a per-example loss that depends on that example's
    output row only (cross-entropy, MSE): n·∂loss/∂f_i is then ∂ℓ_i/∂f_i. The network runs in eval mode.

    Args:
        model: Any network whose outputs are ``(N, ...)``, one row per example.
        batches: Iterable of ``(inputs, targets)``.
        loss_fn: ``loss_fn(outputs, targets)``, mean-reduced over the examples.
        reduce: Cross-process sum hook (None on one process).
    """
    model = unwrap(model)
    with evaluating(model):
        fm = FlatModel(model)
        total = torch.zeros((), dtype=torch.float64, device=fm.device)
        count = 0
        for inputs, targets in prepared(batches, fm.device, fm.dtype):
            with warnings.catch_warnings():  # torch's first forward-mode call loads decompositions via torch.jit
                warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning)
                outputs, along = jvp(lambda flat, inputs=inputs: fm(flat, inputs), (fm.w0,), (fm.w0,))
            leaf = outputs.detach().requires_grad_(True)
            loss = loss_fn(leaf, targets)
            if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
                raise ValueError("Invalid loss_fn: it must return a scalar (mean-reduced) loss tensor")
            (grad,) = torch.autograd.grad(loss, leaf)
            n = leaf.shape[0]
            inner = (grad * along.detach()).reshape(n, -1).sum(1) * n
            total = total + inner.to(torch.float64).square().sum()
            count += n
        return float(mean_of(total, count, reduce, "the Fisher-Rao norm"))
