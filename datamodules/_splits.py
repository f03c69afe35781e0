"""Train/validation/test splits drawn exactly as scikit-learn's ``train_test_split`` draws them."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

SplitMethod = Literal["permutation", "sklearn"]
SPLIT_METHODS = ("permutation", "sklearn")


def sklearn_split(
    n: int, test_size: float, val_count: int = 0, *, seed: int, stratify: np.ndarray | Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Row indices ``(train, val, test)`` from ``sklearn.model_selection.train_test_split``.

    ``train, test = train_test_split(arange(n), test_size=test_size, random_state=seed, stratify=stratify)``:
    the very rows (in the very order) that a script calling ``train_test_split(X, y, test_size=...,
    random_state=seed)`` on ``n`` rows gets, since the split depends on ``n`` only (``ceil(test_size · n)``
    test rows). With ``val_count > 0`` the validation rows are then split off the training rows by a
    second call, ``train_test_split(train, test_size=val_count, random_state=seed)`` (stratified
    likewise); ``val`` is empty otherwise.

    Args:
        n: Number of rows.
        test_size: Fraction of the rows in the test split, in (0, 1).
        val_count: Number of training rows held out for validation.
        seed: ``random_state`` of both calls.
        stratify: Class labels of the ``n`` rows to stratify by (None: a plain shuffle split).
    """
    from sklearn.model_selection import train_test_split

    rows = np.arange(n)
    labels = None if stratify is None else np.asarray(stratify)
    train, test = train_test_split(rows, test_size=test_size, random_state=seed, stratify=labels)
    val = np.empty(0, dtype=rows.dtype)
    if val_count:
        sub = None if labels is None else labels[train]
        train, val = train_test_split(train, test_size=val_count, random_state=seed, stratify=sub)
    return tuple(torch.as_tensor(i, dtype=torch.long) for i in (train, val, test))  # type: ignore[return-value]


def standardize(x: Tensor, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(x − mean) / std`` with the mean and population std of ``x[rows]`` per column (scikit-learn's
    ``StandardScaler``); columns with zero spread keep std 1. Returns ``(standardized x, mean, std)``."""
    mean = x[rows].mean(dim=0)
    std = x[rows].std(dim=0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (x - mean) / std, mean, std
