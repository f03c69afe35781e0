"""Average-case (adaptive) sharpness of Andriushchenko et al. (2023), Monte-Carlo with its standard error (torch only).

Andriushchenko, Croce, Müller, Hein & Flammarion (2023), "A modern look at the relationship between
sharpness and generalization" (ICML; arXiv:2302.07011), section 3 (average-case sharpness)::

    S_avg = E_δ [ L(w + δ) ] − L(w),   δ = ρ c ⊙ z,   c = |w| (adaptive) or 1,

with z ~ N(0, I) for p = 2 (δ ~ N(0, ρ² diag(c²)), as in their ``eval_average_sharpness`` with
``norm='l2'``) or z ~ U[−1, 1] for p = ∞ (δ uniform in the box ‖δ ⊙ c⁻¹‖_∞ ≤ ρ, their ``norm='linf'``), all
trainable parameters perturbed, the network in eval mode, L the mean over the batches of the batch-mean loss.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._core import FlatModel, LossFn, Reduce, all_sum, check_float, check_int, check_p, evaluating, prepared, unwrap
from .noise_search import sample_seeds, standard_noise

__all__ = ["MonteCarloEstimate", "average_sharpness"]


@dataclass(frozen=True)
class MonteCarloEstimate:
    """A Monte-Carlo mean and its standard error s/√n over ``samples`` draws (stderr NaN for one draw)."""

    value: float
    stderr: float
    samples: int


def average_sharpness(
    model: nn.Module,
    batches: Iterable[Any],
    rho: float,
    *,
    p: float = 2.0,
    adaptive: bool = True,
    samples: int = 20,
    seed: int = 0,
    loss_fn: LossFn = F.cross_entropy,
    reduce: Reduce | None = None,
) -> MonteCarloEstimate:
    """Average-case sharpness E_δ L(w + δ) − L(w) over ``samples`` seeded noise draws, with its standard error.

    Andriushchenko et al. (2023) (see the module docstring for δ). Draw k perturbs every batch by the same
    δ_k (drawn on the CPU from the k-th seed of ``seed``, the same on every process); D_k is the mean over
    the batches of L_B(w + δ_k) − L_B(w), the value is the mean of the D_k and the standard error their
    sample standard deviation over √samples: the Monte-Carlo error of the noise, the batches held fixed.
    (Their code draws fresh noise per batch and reports no error: the same expectation.) Cost: ``samples``
    forward passes over the batches, plus one.

    Args:
        model: Any network; ``model(inputs)`` feeds ``loss_fn``.
        batches: Iterable of ``(inputs, targets)``.
        rho: Noise scale ρ ≥ 0 (the standard deviation for p = 2, the box half-width for p = ∞, times c).
        p: 2 (Gaussian) or ``float("inf")`` (uniform in the box).
        adaptive: c = |w| (the noise scales with each weight) instead of c = 1.
        samples: Noise draws (≥ 1; their default 100, their script's 20).
        seed: Seed of the draws.
        loss_fn: ``loss_fn(outputs, targets)``, a mean-reduced scalar.
        reduce: Cross-process sum hook (None on one process).
    """
    rho = check_float("rho", rho)
    p = check_p(p, allowed=(2.0, math.inf))
    check_int("samples", samples, 1)
    seeds = sample_seeds(seed, samples)
    distribution = "gaussian" if p == 2.0 else "uniform"
    model = unwrap(model)
    with evaluating(model), torch.no_grad():
        fm = FlatModel(model)
        data = list(prepared(batches, fm.device, fm.dtype))
        scale = rho * fm.w0.abs() if adaptive else rho
        totals = torch.zeros(samples + 2, dtype=torch.float64, device=fm.device)  # perturbed sums, clean sum, batches
        for inputs, targets in data:
            totals[samples] += fm.loss(fm.w0, (inputs, targets), loss_fn).to(torch.float64)
        for k in range(samples):
            flat = fm.w0 + scale * standard_noise(seeds[k], fm.numel, distribution, device=fm.device, dtype=fm.dtype)
            for batch in data:
                totals[k] += fm.loss(flat, batch, loss_fn).to(torch.float64)
        totals[samples + 1] = len(data)
        totals = all_sum(totals, reduce)
    if float(totals[-1]) == 0:
        raise ValueError("Invalid batches: no batch to measure average-case sharpness on (the iterable is empty)")
    d = (totals[:samples] - totals[samples]) / totals[-1]
    stderr = float(d.std(unbiased=True) / math.sqrt(samples)) if samples > 1 else math.nan
    return MonteCarloEstimate(float(d.mean()), stderr, samples)
