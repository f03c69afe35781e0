"""Argument checks shared by the whole project: a refused value raises one line naming it.

Every check raises ``ValueError("Invalid <name>: <value!r>; expected <accepted range>")`` before any
work starts, so a bad config fails in one line that says what to change. The same rules hold for every
argument, whichever module checks it:

* A number is any ``numbers.Real`` (``int``, ``float``, numpy scalars such as ``numpy.float32``) except
  ``bool``; an integer is any ``numbers.Integral`` except ``bool``. The checks return plain Python
  ``float``/``int`` values, so what a module stores does not depend on how the number was written.
* A value of the wrong type (a string, ``True``, ``None`` where a number is needed) raises
  :class:`ArgumentTypeError`, which is both a ``TypeError`` and a ``ValueError``, with the same message.
* NaN and ±inf are refused by :func:`check_float` (a "finite" number); ``inf`` is a valid norm
  exponent in :func:`check_p` (the max-norm), NaN is not.

Home: this module imports nothing but the standard library, so the pure-torch modules
(:mod:`flatminima.lightning_modules.minimizers`, :mod:`flatminima.callbacks.measures` and its helpers) use it without
Lightning. It lives in ``lightning_modules`` (no new top-level package); ``lightning_modules/__init__``
imports its Lightning-dependent modules only when Lightning is importable, so
``import flatminima.lightning_modules.validation`` works with Lightning absent (pinned by
``tests/test_validation.py``). See docs/design.md, "Validation and private APIs".
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

__all__ = [
    "ArgumentTypeError",
    "invalid",
    "is_real",
    "is_integer",
    "check_int",
    "check_ints",
    "check_float",
    "check_fraction",
    "check_choice",
    "check_p",
    "check_betas",
]

T = TypeVar("T")


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type: a ``TypeError`` (Python's convention) and a ``ValueError`` (the project's).

    ``except ValueError`` catches every refused argument, whatever the reason.
    """


def invalid(name: str, value: Any, expected: str, *, error: type[ValueError] = ValueError) -> ValueError:
    """The error for a refused argument: ``Invalid <name>: <value!r>; expected <expected>`` (to ``raise``)."""
    return error(f"Invalid {name}: {value!r}; expected {expected}")


def is_real(value: Any) -> bool:
    """Whether ``value`` is a real number: ``numbers.Real`` (numpy scalars included) but not ``bool``."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value: Any) -> bool:
    """Whether ``value`` is an integer: ``numbers.Integral`` (numpy integers included) but not ``bool``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int = 1, *, optional: bool = False) -> int | None:
    """Return ``int(value)`` if it is an integer ``>= minimum`` (or None when ``optional``), else raise."""
    if optional and value is None:
        return None
    expected = f"{'None or ' if optional else ''}an integer >= {minimum}"
    if not is_integer(value):
        raise invalid(name, value, expected, error=ArgumentTypeError)
    if value < minimum:
        raise invalid(name, value, expected)
    return int(value)


def check_ints(name: str, values: Iterable[Any], minimum: int = 1, *, allow_empty: bool = True) -> list[int]:
    """Return ``values`` as a list of ``int`` if every entry is an integer ``>= minimum``, else raise."""
    expected = f"{'a' if allow_empty else 'a non-empty'} list of integers >= {minimum}"
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise invalid(name, values, expected, error=ArgumentTypeError)
    values = list(values)
    if not all(is_integer(v) for v in values):
        raise invalid(name, values, expected, error=ArgumentTypeError)
    if (not values and not allow_empty) or any(v < minimum for v in values):
        raise invalid(name, values, expected)
    return [int(v) for v in values]


def check_float(
    name: str, value: Any, *, minimum: float = 0.0, strict: bool = False, optional: bool = False
) -> float | None:
    """Return ``float(value)`` if it is a finite number ``>= minimum`` (``> minimum`` when ``strict``), else raise.

    With ``optional``, None is accepted and returned.
    """
    if optional and value is None:
        return None
    expected = f"{'None or ' if optional else ''}a finite {name} {'>' if strict else '>='} {minimum:g}"
    if not is_real(value):
        raise invalid(name, value, expected, error=ArgumentTypeError)
    if not math.isfinite(value) or not (value > minimum if strict else value >= minimum):
        raise invalid(name, value, expected)
    return float(value)


def check_fraction(name: str, value: Any, *, closed: bool = False) -> float:
    """Return ``float(value)`` if it is a number in [0, 1) (in [0, 1] when ``closed``), else raise.

    A dropout rate, a label-noise or test fraction: ``closed=False``; a mixing weight: ``closed=True``.
    """
    expected = f"0 <= {name} {'<=' if closed else '<'} 1"
    if not is_real(value):
        raise invalid(name, value, expected, error=ArgumentTypeError)
    if not (0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0):  # NaN fails both comparisons
        raise invalid(name, value, expected)
    return float(value)


def check_choice(name: str, value: T, choices: Sequence[Any]) -> T:
    """Return ``value`` if it is one of ``choices``, else raise listing them."""
    if value not in choices:
        raise invalid(name, value, f"one of {', '.join(map(repr, choices))}")
    return value


def check_p(p: Any, allowed: Sequence[float] | None = None, *, name: str = "p") -> float:
    """Return a norm exponent as a float: ``p >= 1`` (``float('inf')`` is the max-norm), or one of ``allowed``.

    A refused number is reported as the float it was converted to (``3`` as ``3.0``).
    """
    if allowed is None:
        expected = f"{name} >= 1 (float('inf') for the max-norm)"
    else:
        expected = " or ".join(f"{name} = {a:g}" for a in allowed)
    if not is_real(p):
        raise invalid(name, p, expected, error=ArgumentTypeError)
    p = float(p)
    if math.isnan(p) or (p < 1 if allowed is None else p not in allowed):
        raise invalid(name, p, expected)
    return p


def check_betas(betas: Any, name: str = "betas") -> tuple[float, float]:
    """Return ``betas`` as a pair of floats if it is two numbers in [0, 1) (Adam-style decay rates), else raise."""
    expected = "two numbers in [0, 1)"
    try:
        items = tuple(betas)
    except TypeError:
        raise invalid(name, betas, expected, error=ArgumentTypeError) from None
    if len(items) != 2 or not all(is_real(b) and 0.0 <= b < 1.0 for b in items):
        raise invalid(name, items, expected)
    return float(items[0]), float(items[1])
