"""Norm, margin and count measures of Jiang et al. (2020) (torch only).

Jiang, Neyshabur, Mobahi, Krishnan & Bengio (2020), "Fantastic generalization measures and where to find
them" (ICLR; arXiv:1912.02178), appendix C, as the reference code ``nitarshan/robust-generalization-measures``
computes them: BatchNorm is folded into the layer before it first (:func:`flatminima.callbacks.batchnorm_folding.fold_batchnorm`),
then W_1..W_d are the weights of the d Linear/Conv layers (biases excluded), a convolution kernel read as the
matrix (out channels) × (in channels · kernel), ‖·‖_F its Frobenius and ‖·‖_2 its spectral norm (largest
singular value of that matrix, their code's approximation of the convolution's operator norm), and γ the
margin: the 10th percentile (the ⌊n/10⌋-th smallest, at least the first) of z_y − max_{j≠y} z_j over the n
examples, in absolute value (as their code takes it). Keys and equations (their numbering):

=============================  =========================================================================
``params``                     ω, the number of trainable parameters of the network (20)
``inverse_margin``             1/γ² (22)
``log_prod_spec``              Σ_d log ‖W_d‖₂² (32); ``_over_margin``: − 2 log γ (31)
``log_sum_spec``               log d + (1/d) Σ_d log ‖W_d‖₂² (35); ``_over_margin``: with − 2 log γ inside (34)
``log_prod_fro``               Σ_d log ‖W_d‖_F² (37); ``_over_margin`` (36)
``log_sum_fro``                log d + (1/d) Σ_d log ‖W_d‖_F² (39); ``_over_margin`` (38)
``fro_over_spec``              Σ_d ‖W_d‖_F²/‖W_d‖₂² (33)
``log_spec_orig_main``         log_prod_spec_over_margin + log fro_over_spec (30)
``param_norm``                 Σ_d ‖W_d‖_F² (42)
``path_norm``                  Σ_i f_{w²}(1)_i: the network with every (folded) parameter squared, on an
                               input of ones, outputs summed (44); ``_over_margin``: / γ² (43)
``fro_dist``                   Σ_d ‖W_d − W_d⁰‖_F² (40), with ``initial``
``dist_spec_init``             Σ_d ‖W_d − W_d⁰‖₂² (41), with ``initial``
``log_spec_init_main``         log_prod_spec_over_margin + log Σ_d ‖W_d − W_d⁰‖_F²/‖W_d‖₂² (29), with ``initial``
=============================  =========================================================================

For networks of Linear/Conv layers and ReLU (biases as edges from a constant unit) the path-norm equals
the sum over all input-output paths of the product of the squared weights on the path (Neyshabur et al.
2015); with pooling it is the reference code's value (max pooling takes the largest path sum). Values are
not adjusted for the data set size (the reference's adjustments are monotone and leave rankings unchanged).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._core import FlatModel, compute_dtype, evaluating, model_device, prepared, unwrap
from .accuracy import margins
from .batchnorm_folding import fold_batchnorm, weight_layers

__all__ = ["norm_measures", "margin_percentile", "path_norm", "layer_norms"]


def _matrices(model: nn.Module, dtype: torch.dtype) -> list[Tensor]:
    layers = weight_layers(model)
    if not layers:
        raise ValueError(
            f"Invalid model: {type(model).__name__} has no Linear/Conv layer with trainable weights "
            "(the norm-based measures read their weights)"
        )
    return [m.weight.detach().to(dtype).reshape(m.weight.shape[0], -1) for _, m in layers]


def layer_norms(matrices: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(‖W_d‖_F², ‖W_d‖₂²) for every layer matrix, as float64 vectors."""
    fro = torch.stack([w.to(torch.float64).square().sum() for w in matrices])
    spec = torch.stack([torch.linalg.matrix_norm(w.to(torch.float64), ord=2).square() for w in matrices])
    return fro, spec


def margin_percentile(model: nn.Module, batches: Iterable[Any], q: float = 0.1) -> float:
    """γ: |⌊q·n⌋-th smallest margin| (at least the first) of ``model`` on ``batches`` (eval mode)."""
    model = unwrap(model)
    values = []
    with evaluating(model), torch.no_grad():
        fm = FlatModel(model)
        for inputs, targets in prepared(batches, fm.device, fm.dtype):
            values.append(margins(fm(fm.w0, inputs), targets).to(torch.float64))
    if not values:
        raise ValueError("Invalid batches: no batch to measure the margin on (the iterable is empty)")
    all_margins = torch.cat(values)
    k = max(1, int(q * all_margins.numel()))
    return abs(float(all_margins.kthvalue(k).values))


def path_norm(model: nn.Module, input_shape: tuple[int, ...]) -> float:
    """Σ_i f_{w²}(1)_i of the BatchNorm-folded network (module docstring); ``input_shape`` excludes the batch."""
    folded = fold_batchnorm(model)
    dtype = compute_dtype(folded)
    squared = copy.deepcopy(folded).to(dtype)
    with evaluating(squared), torch.no_grad():
        for p in squared.parameters():
            p.square_()
        ones = torch.ones((1, *input_shape), dtype=dtype, device=model_device(squared))
        return float(squared(ones).to(torch.float64).sum())


def norm_measures(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    initial: Mapping[str, Tensor] | None = None,
) -> dict[str, float]:
    """Jiang et al. (2020)'s norm, margin and count measures of ``model`` (keys and formulas in the module docstring).

    Every process passes all the batches (one forward pass; no cross-process reduction).

    Args:
        model: A classifier of Linear/Conv layers (BatchNorm after a layer is folded).
        batches: Iterable of ``(inputs, targets)`` with integer class targets and tensor inputs.
        initial: The network's state dict at initialization (for ``fro_dist``, ``dist_spec_init`` and
            ``log_spec_init_main``; None: omitted).
    """
    model = unwrap(model)
    batches = list(batches)
    first = next(iter(prepared(batches, model_device(model), compute_dtype(model))), None)
    if first is None or not isinstance(first[0], Tensor):
        raise ValueError("Invalid batches: the norm measures need at least one batch with tensor inputs")
    gamma = margin_percentile(model, batches)
    folded = fold_batchnorm(model)
    fro, spec = layer_norms(_matrices(folded, torch.float64))
    d = fro.numel()
    log_gamma2 = 2.0 * math.log(gamma) if gamma > 0 else -math.inf
    log_prod_spec, log_prod_fro = float(spec.log().sum()), float(fro.log().sum())
    out = {
        "params": float(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        "inverse_margin": 1.0 / gamma**2 if gamma > 0 else math.inf,
        "log_prod_spec": log_prod_spec,
        "log_prod_spec_over_margin": log_prod_spec - log_gamma2,
        "log_sum_spec": math.log(d) + log_prod_spec / d,
        "log_sum_spec_over_margin": math.log(d) + (log_prod_spec - log_gamma2) / d,
        "log_prod_fro": log_prod_fro,
        "log_prod_fro_over_margin": log_prod_fro - log_gamma2,
        "log_sum_fro": math.log(d) + log_prod_fro / d,
        "log_sum_fro_over_margin": math.log(d) + (log_prod_fro - log_gamma2) / d,
        "fro_over_spec": float((fro / spec).sum()),
        "param_norm": float(fro.sum()),
    }
    out["log_spec_orig_main"] = out["log_prod_spec_over_margin"] + math.log(out["fro_over_spec"])
    out["path_norm"] = path_norm(model, tuple(first[0].shape[1:]))
    out["path_norm_over_margin"] = out["path_norm"] / gamma**2 if gamma > 0 else math.inf
    if initial is not None:
        start = copy.deepcopy(model)
        start.load_state_dict(dict(initial))
        dist_fro, dist_spec = layer_norms(
            [w - w0 for w, w0 in zip(_matrices(folded, torch.float64), _matrices(fold_batchnorm(start), torch.float64))]
        )
        out["fro_dist"] = float(dist_fro.sum())
        out["dist_spec_init"] = float(dist_spec.sum())
        out["log_spec_init_main"] = out["log_prod_spec_over_margin"] + math.log(float((dist_fro / spec).sum()))
    return out
