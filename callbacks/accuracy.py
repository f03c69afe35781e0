"""Correct counts and classification margins of network outputs (torch only), for the accuracy-based measures.

Two output layouts are understood: ``(N, K)`` logits with K ≥ 2 (prediction = argmax) and one logit per
example, ``(N,)`` or ``(N, 1)`` (binary, prediction = logit > 0, the sigmoid convention). Targets must be
integer class labels.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._core import FlatModel, LossFn, Reduce, all_sum, evaluating, mean_of, prepared, unwrap

__all__ = ["correct_count", "margins", "accuracy_at", "loss_and_accuracy"]


def _check(outputs: Any, targets: Any) -> tuple[Tensor, Tensor]:
    if not isinstance(outputs, Tensor) or not isinstance(targets, Tensor):
        raise TypeError(
            "Invalid batch for an accuracy-based measure: the network must return a tensor of logits "
            "and the targets must be a tensor of class labels"
        )
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(
            f"Invalid targets: dtype {targets.dtype}; an accuracy-based measure needs integer class "
            "labels (a classification task)"
        )
    return outputs, targets.reshape(-1)


def _binary(outputs: Tensor) -> bool:
    return outputs.ndim == 1 or (outputs.ndim == 2 and outputs.shape[1] == 1)


def correct_count(outputs: Any, targets: Any) -> Tensor:
    """Number of correctly classified examples (a 0-dim float64 tensor, no host sync)."""
    outputs, targets = _check(outputs, targets)
    if _binary(outputs):
        predicted = (outputs.reshape(-1) > 0).long()
    else:
        predicted = outputs.argmax(dim=-1).reshape(-1)
    return (predicted == targets).sum().to(torch.float64)


def margins(outputs: Any, targets: Any) -> Tensor:
    """Per-example margins: z_y − max_{j≠y} z_j for (N, K) logits, (2y − 1)·z for one logit (positive = correct)."""
    outputs, targets = _check(outputs, targets)
    if _binary(outputs):
        return (2.0 * targets.to(outputs.dtype) - 1.0) * outputs.reshape(-1)
    logits = outputs.reshape(-1, outputs.shape[-1])
    rows = torch.arange(logits.shape[0], device=logits.device)
    true = logits[rows, targets]
    others = logits.clone()
    others[rows, targets] = -torch.inf
    return true - others.max(dim=1).values


def accuracy_at(
    fm: FlatModel, flat: Tensor, batches: Sequence[tuple[Any, Any]], reduce: Reduce | None, what: str
) -> float:
    """Training accuracy of the network at parameters ``flat`` over ``batches`` (and all processes' batches)."""
    correct = torch.zeros((), dtype=torch.float64, device=fm.device)
    count = 0
    with torch.no_grad():
        for inputs, targets in batches:
            correct = correct + correct_count(fm(flat, inputs), targets)
            count += targets.numel()
    return float(mean_of(correct, count, reduce, what))


def loss_and_accuracy(
    model: nn.Module, batches: Iterable[Any], loss_fn: LossFn, reduce: Reduce | None = None
) -> tuple[float, float | None]:
    """The mean loss over the examples and the accuracy of ``model`` in eval mode (None for non-integer targets).

    The mean loss weights each batch's (mean-reduced) loss by its number of examples, so it is the
    per-example mean whatever the batch sizes. Leaves no trace (:func:`flatminima.callbacks._core.evaluating`).
    """
    model = unwrap(model)
    with evaluating(model), torch.no_grad():
        fm = FlatModel(model)
        totals = torch.zeros(3, dtype=torch.float64, device=fm.device)  # loss sum, correct, examples
        classify = True
        for inputs, targets in prepared(batches, fm.device, fm.dtype):
            outputs = fm(fm.w0, inputs)
            n = targets.shape[0] if isinstance(targets, Tensor) and targets.ndim > 0 else 1
            loss = loss_fn(outputs, targets)
            if not isinstance(loss, Tensor) or loss.ndim != 0:
                raise ValueError("Invalid loss_fn: it must return a scalar (mean-reduced) loss tensor")
            totals[0] += loss.to(torch.float64) * n
            classify = classify and isinstance(targets, Tensor) and not targets.is_floating_point()
            if classify:
                totals[1] += correct_count(outputs, targets)
            totals[2] += n
        totals = all_sum(totals, reduce)
    if float(totals[2]) == 0:
        raise ValueError("Invalid batches: no batch to evaluate the loss on (the iterable is empty)")
    return float(totals[0] / totals[2]), (float(totals[1] / totals[2]) if classify else None)
