"""Argument checks shared by the networks: a ``ValueError`` naming the argument, range and value."""

from __future__ import annotations

import math
from collections.abc import Sequence


def check_int(name: str, value: object, minimum: int = 1) -> int:
    """Return ``value`` if it is an integer ``>= minimum``, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Invalid {name}: {value!r}; expected an integer >= {minimum}")
    return value


def check_ints(name: str, values: Sequence[object], minimum: int = 1, allow_empty: bool = True) -> list[int]:
    """Return ``values`` as a list if every entry is an integer ``>= minimum``, else raise ``ValueError``."""
    values = list(values)
    if (not values and not allow_empty) or any(
        isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values
    ):
        what = "a non-empty list" if not allow_empty else "a list"
        raise ValueError(f"Invalid {name}: {values!r}; expected {what} of integers >= {minimum}")
    return values


def check_probability(name: str, value: object) -> float:
    """Return ``value`` if it is a number in [0, 1), else raise ``ValueError`` (a dropout rate)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid {name}: {value!r}; expected 0 <= {name} < 1")
    return float(value)


def check_positive(name: str, value: object) -> float:
    """Return ``value`` if it is a finite number > 0, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"Invalid {name}: {value!r}; expected a finite {name} > 0")
    return float(value)


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ``ValueError``."""
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r}; expected one of {', '.join(map(repr, choices))}")
    return value  # type: ignore[return-value]
