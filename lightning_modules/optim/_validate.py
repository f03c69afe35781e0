"""Argument checks shared by the optimizers (ValueError naming the argument, range and value)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def check_non_negative(name: str, value: float) -> None:
    """Refuse a negative or non-finite value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"Invalid {name}: {value!r}; expected a finite {name} >= 0")


def check_betas(betas: Sequence[float]) -> None:
    """Refuse betas that are not two numbers in [0, 1)."""
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"Invalid betas: {tuple(betas)!r}; expected two numbers in [0, 1)")
