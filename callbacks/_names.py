"""Metric names and state keys of several instances of one sharpness measure in one Trainer.

Instances of one class sharing a ``name`` log under ``sharpness/<name>_<tokens>``, one token per
identity argument whose value differs among them (:func:`label`); a single instance keeps
``sharpness/<name>``. Their state keys list the identity arguments that differ from the
constructor's defaults (:func:`constructor_defaults`), so a default instance keeps ``Class{'name': ...}``.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Protocol


class Measure(Protocol):
    """What naming needs of a measure: its ``name`` and the values of its identity arguments."""

    name: str

    def identity(self) -> dict[str, Any]: ...


def label(field: str, value: Any) -> str:
    """A readable token for one argument value in a metric name: ``l2``/``linf`` for p, ``rho0.001``, ``pga``."""
    if field == "p":
        return "linf" if math.isinf(value) else f"l{value:g}"
    if isinstance(value, bool):
        return field if value else f"no{field}"
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return f"{field}{value:g}"
    return f"{field}{value}"


def metric_names(measures: list[Measure]) -> dict[int, str]:
    """The metric name of every measure (by ``id``), with same-named instances told apart.

    Instances of one class sharing a ``name`` get ``<name>_<token>_...`` from the arguments whose values
    differ among them (see :func:`label`); a name shared across classes, or two instances whose names
    stay equal, is a ``ValueError``.
    """
    groups: dict[str, list[Measure]] = {}
    for m in measures:
        groups.setdefault(m.name, []).append(m)
    names: dict[int, str] = {}
    for name, group in groups.items():
        kinds = sorted({type(m).__name__ for m in group})
        if len(kinds) > 1:
            raise ValueError(f"Invalid name: {name!r} is used by {', '.join(kinds)}; give each callback its own name")
        values = [m.identity() for m in group]
        differ = [f for f in values[0] if len({repr(v[f]) for v in values}) > 1]
        for m, v in zip(group, values):
            names[id(m)] = "_".join([name] + [label(f, v[f]) for f in differ])
    _refuse_twins(measures, names)
    return names


def _refuse_twins(measures: list[Measure], names: dict[int, str]) -> None:
    taken: dict[str, Measure] = {}
    for m in measures:
        other = taken.setdefault(names[id(m)], m)
        if other is not m:
            raise ValueError(
                f"Invalid name: two {type(m).__name__} callbacks named {m.name!r} measure the same thing (same "
                f"arguments, metric sharpness/{names[id(m)]}); remove one or pass distinct name=... values"
            )


@functools.cache
def constructor_defaults(cls: type) -> dict[str, Any]:
    """The default argument values of a class's constructor, the options it passes on in ``**kwargs`` included.

    The nearest class in the MRO that names an argument gives its default (a subclass's own default
    overrides the base's, as in the call).
    """
    defaults: dict[str, Any] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        for n, p in inspect.signature(klass.__init__).parameters.items():
            if p.default is not inspect.Parameter.empty:
                defaults.setdefault(n, p.default)
    return defaults
