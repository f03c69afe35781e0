"""The seeded bisection behind Jiang et al. (2020)'s flatness and sharpness measures (torch only).

Jiang, Neyshabur, Mobahi, Krishnan & Bengio (2020), "Fantastic generalization measures and where to find
them" (ICLR; arXiv:1912.02178), appendix C: the PAC-Bayes flatness searches the largest noise scale σ′, the
sharpness measures the largest box radius α′, whose perturbations of the weights drop the training accuracy
by at most a target (0.1). Both searches are this one bisection:

* the radius r is bisected on [``lower``, ``upper``] (their code: [0, 2]) for ``depth`` probes (their 15),
  at the midpoint (``scale="linear"``, theirs) or at the geometric mean (``scale="log"``, for radii that span
  orders of magnitude: relative precision (upper/lower)^(2^-depth) instead of absolute (upper − lower)/2^depth);
* at each probe r, ``samples`` perturbations are evaluated (their 10 Monte-Carlo draws for σ′; the random
  starts of the gradient ascent for α′), sample k being drawn from its own seed, the same at every probe
  (common random numbers: the probes differ only by r, so the estimated drop is a deterministic function of
  r, and a model whose drop grows with r gives a bisection that never contradicts itself);
* the drops of the samples are combined by their mean (σ′: the expected drop) or their maximum (α′: the
  worst start); a probe whose combined drop exceeds the target moves the upper end, otherwise the lower;
* with ``tol > 0`` the search stops at the first probe whose drop is within ``tol`` of the target (their
  ``displacement_tolerance`` 1e-2) and returns that probe; otherwise it returns the midpoint (geometric
  mean) of the last bracket: within (upper − lower)/2^(depth+1) (a factor (upper/lower)^(2^-(depth+1))) of
  the crossing.

The number of evaluated perturbations never exceeds ``depth × samples`` (``RadiusSearch.evaluations``; with
``combine="max"`` a probe stops at the first sample over the target).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ._core import check_choice, check_float, check_int

Combine = Literal["mean", "max"]
Scale = Literal["linear", "log"]
Distribution = Literal["gaussian", "uniform"]

__all__ = ["RadiusSearch", "bisect_radius", "sample_seeds", "standard_noise", "check_search"]


@dataclass(frozen=True)
class RadiusSearch:
    """The result of :func:`bisect_radius`.

    Attributes:
        radius: The estimate of the largest radius whose drop stays within the target.
        lower: Lower end of the last bracket (every probe at or below it stayed within the target).
        upper: Upper end of the last bracket.
        drop: The combined drop at the last probe.
        evaluations: Perturbations evaluated (≤ depth × samples).
        probes: Radii probed (≤ depth).
        saturated: ``"lower"`` when every probe exceeded the target (the crossing may lie below the first
            bracket: the radius is an upper bound), ``"upper"`` when none did (a lower bound), else None.
    """

    radius: float
    lower: float
    upper: float
    drop: float
    evaluations: int
    probes: int
    saturated: Literal["lower", "upper"] | None = None

    def warn_if_saturated(self, what: str, first: tuple[float, float]) -> None:
        """Warn (``UserWarning``) that ``what`` hit an end of the first bracket ``first``: a bound, not a value."""
        if self.saturated is None:
            return
        if self.saturated == "lower":
            why = f"every probe dropped the accuracy by more than the target, down to {self.radius:.3g}"
        else:
            why = f"no probe dropped the accuracy by more than the target, up to {self.radius:.3g}"
        warnings.warn(
            f"{what}: the search reached the {self.saturated} end of its bracket [{first[0]:g}, "
            f"{first[1]:g}] ({why}); the value is a bound, not a measurement: widen lower/upper",
            UserWarning,
            stacklevel=3,
        )


def sample_seeds(seed: int, samples: int) -> list[int]:
    """The seeds of the ``samples`` perturbations of a search: drawn once from ``seed``, the same at every probe."""
    generator = torch.Generator().manual_seed(check_int("seed", seed, 0))
    return torch.randint(0, 2**62, (check_int("samples", samples, 1),), generator=generator).tolist()


def standard_noise(
    seed: int, numel: int, distribution: Distribution, *, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """``numel`` i.i.d. draws from N(0, 1) (``"gaussian"``) or U[−1, 1] (``"uniform"``), from a CPU generator.

    Drawn on the CPU from ``seed`` (so every process and device gets the same numbers), then moved.
    """
    generator = torch.Generator().manual_seed(seed)
    if distribution == "gaussian":
        z = torch.randn(numel, generator=generator, dtype=dtype)
    else:
        z = torch.rand(numel, generator=generator, dtype=dtype).mul_(2.0).sub_(1.0)
    return z.to(device)


def check_search(
    target: float,
    depth: int,
    samples: int,
    lower: float,
    upper: float,
    tol: float,
    samples_name: str = "samples",
    scale: Scale = "linear",
) -> None:
    """Refuse search arguments out of range (``ValueError`` naming the argument)."""
    check_float("target", target, strict=True)
    check_int("depth", depth, 1)
    check_int(samples_name, samples, 1)
    check_choice("scale", scale, ("linear", "log"))
    check_float("lower", lower, strict=scale == "log")
    check_float("upper", upper, minimum=lower, strict=True)
    check_float("tol", tol)


def bisect_radius(
    drop: Callable[[float, int], float],
    target: float,
    *,
    samples: int,
    depth: int,
    lower: float = 0.0,
    upper: float = 2.0,
    tol: float = 0.0,
    combine: Combine = "mean",
    scale: Scale = "linear",
) -> RadiusSearch:
    """The largest radius whose combined drop stays within ``target``, by bisection (see the module docstring).

    Args:
        drop: ``drop(radius, k)``: the accuracy drop of perturbation ``k`` (0 ≤ k < samples) at ``radius``;
            it draws perturbation k from the k-th of :func:`sample_seeds`, so it is the same at every radius.
        target: The largest allowed drop (Jiang et al.: 0.1).
        samples: Perturbations per probe.
        depth: Probes.
        lower: Lower end of the first bracket.
        upper: Upper end of the first bracket.
        tol: Stop at a probe whose drop is within ``tol`` of the target (0: never).
        combine: ``"mean"`` (expected drop) or ``"max"`` (worst sample).
        scale: Probe at the midpoint (``"linear"``) or the geometric mean (``"log"``, needs lower > 0).
    """
    check_search(target, depth, samples, lower, upper, tol, scale=scale)
    check_choice("combine", combine, ("mean", "max"))

    def middle(a: float, b: float) -> float:
        return 0.5 * (a + b) if scale == "linear" else math.sqrt(a * b)

    lo, hi, evaluations, value = float(lower), float(upper), 0, float("nan")
    for probe in range(depth):
        mid = middle(lo, hi)
        values: list[float] = []
        for k in range(samples):
            values.append(float(drop(mid, k)))
            evaluations += 1
            if combine == "max" and values[-1] > target:
                break
        value = max(values) if combine == "max" else sum(values) / len(values)
        if tol > 0 and abs(value - target) <= tol:
            return RadiusSearch(mid, lo, hi, value, evaluations, probe + 1)
        if value > target:
            hi = mid
        else:
            lo = mid
    saturated = "lower" if lo == lower else "upper" if hi == upper else None
    return RadiusSearch(middle(lo, hi), lo, hi, value, evaluations, depth, saturated)
