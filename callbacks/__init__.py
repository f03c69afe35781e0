"""Sharpness measures (pure functions in ``measures``) and the Lightning callbacks that run them.

Layout, one concept per module:

* pure torch (no Lightning): ``measures`` (the public functions, gathered from the math modules beside
  it) over ``_core`` (plumbing); ``inputs`` (``batch_to_inputs`` hooks and losses);
* the measures as callbacks: ``base`` (:class:`SharpnessCallback`: schedule, subset, storage, shared
  options) with its helpers ``_subset``, ``_distributed``, ``_names``, ``_epoch_end``, and one module per
  measure: ``minimum_sharpness``, ``adaptive_sharpness``, ``hessian_spectrum``, ``gradient_norm``,
  ``pac_bayes_flatness``, ``worst_case_sharpness``, ``average_case_sharpness``, ``complexity`` (norms, margins,
  Fisher–Rao; with ``_initial``: the initial weights some of them compare with), and ``final_train`` (the final
  weights re-evaluated on the training set);
* other callbacks: ``checkpoint`` (:class:`LossThresholdCheckpoint`, with ``_monitor``), ``stopping``,
  ``summary``, ``progress``.

Why plain imports behind one guard: Lightning is a hard dependency, so the callbacks are imported
plainly (``flatminima.callbacks.AdaptiveSharpness`` is an ordinary attribute for YAML class paths, IDEs and
``dir()``), while the house rule "pure math importable without Lightning" still holds because Python
runs this file before ``flatminima.callbacks.measures``: the one ``try`` below skips the callbacks when Lightning
itself cannot be imported, and only then (any other import error surfaces), so ``import
flatminima.callbacks.measures`` works in an environment without Lightning and ``from callbacks import
AdaptiveSharpness`` there fails with an ``ImportError``, as it should.
"""

from __future__ import annotations

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

__all__ = [
    "minimum_sharpness",
    "adaptive_sharpness",
    "gradient_norm_sharpness",
    "hessian_eigenvalues",
    "hessian_trace",
    "hutchinson_trace",
    "layer_traces",
    "minimize_scaled_trace",
]

try:
    import lightning.pytorch  # noqa: F401
except ModuleNotFoundError as _missing:  # only Lightning's own absence is tolerated
    if _missing.name not in ("lightning", "lightning.pytorch"):
        raise
else:
    from .adaptive_sharpness import AdaptiveSharpness
    from .average_case_sharpness import AverageSharpness
    from .base import SharpnessCallback
    from .checkpoint import LossThresholdCheckpoint
    from .complexity import ComplexityMeasures, FisherRaoNorm
    from .final_train import FinalTrainEvaluation
    from .gradient_norm import GradientNormSharpness
    from .hessian_spectrum import HessianSpectrum
    from .minimum_sharpness import MinimumSharpness
    from .pac_bayes_flatness import PacBayesFlatness
    from .progress import EpochLines
    from .stopping import RelativeLossStopping
    from .summary import RunSummary
    from .worst_case_sharpness import WorstCaseSharpness

    __all__ += [
        "SharpnessCallback",
        "MinimumSharpness",
        "AdaptiveSharpness",
        "GradientNormSharpness",
        "HessianSpectrum",
        "PacBayesFlatness",
        "WorstCaseSharpness",
        "AverageSharpness",
        "ComplexityMeasures",
        "FisherRaoNorm",
        "FinalTrainEvaluation",
        "LossThresholdCheckpoint",
        "RelativeLossStopping",
        "RunSummary",
        "EpochLines",
    ]
