"""Sharpness measures (pure functions in ``measures``) and the Lightning callbacks that run them.

``callbacks.measures`` (and ``ggn``, ``alpha``, ``adaptive``, ``hessian``) import torch only; the
Lightning callbacks (``MinimumSharpness``, ``AdaptiveSharpness``, ``GradientNormSharpness``,
``HessianSpectrum``, ``LossThresholdCheckpoint``, ``RunSummary``) are imported on first access, so the
pure math stays usable without Lightning installed.
"""

from __future__ import annotations

from typing import Any

from .measures import (
    adaptive_sharpness,
    gradient_norm_sharpness,
    hessian_eigenvalues,
    hessian_trace,
    hutchinson_trace,
    layer_traces,
    minimize_scaled_trace,
    minimum_sharpness,
)

_LIGHTNING = {
    "SharpnessCallback": "sharpness",
    "MinimumSharpness": "sharpness",
    "AdaptiveSharpness": "sharpness",
    "GradientNormSharpness": "sharpness",
    "HessianSpectrum": "sharpness",
    "LossThresholdCheckpoint": "checkpoint",
    "RelativeLossStopping": "stopping",
    "RunSummary": "summary",
    "EpochLines": "progress",
}

__all__ = [
    "minimum_sharpness",
    "adaptive_sharpness",
    "gradient_norm_sharpness",
    "hessian_eigenvalues",
    "hessian_trace",
    "hutchinson_trace",
    "layer_traces",
    "minimize_scaled_trace",
    *_LIGHTNING,
]


def __getattr__(name: str) -> Any:
    if name in _LIGHTNING:
        import importlib

        module = importlib.import_module(f".{_LIGHTNING[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LIGHTNING))
