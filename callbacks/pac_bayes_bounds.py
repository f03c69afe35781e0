"""PAC-Bayes flatness and the PAC-Bayes bounds of Jiang et al. (2020) (torch only).

Jiang, Neyshabur, Mobahi, Krishnan & Bengio (2020), "Fantastic generalization measures and where to find
them" (ICLR; arXiv:1912.02178), appendix C ("flatness-based" and "magnitude-aware perturbation" measures),
and the reference implementation ``nitarshan/robust-generalization-measures``
(``data/generation/measures.py``). σ′ is the largest noise scale whose Gaussian perturbations of all the
trainable parameters drop the training accuracy by at most a target (0.1) in expectation:

* plain: u ~ N(0, σ′² I);
* magnitude-aware: u_i ~ N(0, σ′² w_i² + ε²), ε = 1e-3.

The noise is drawn with these *standard deviations*, σ′ and √(σ′² w_i² + ε²). (The reference code passes
the variances σ′² and σ′² w_i² + ε² to ``torch.normal``, whose second argument is a standard deviation: its
σ′ is the square root of the one defined here. We follow the paper.) σ′ is found by the seeded bisection of
:mod:`flatminima.callbacks.noise_search` (their [0, 2], depth 15, 10 Monte-Carlo samples, tolerance 1e-2), the same
noise draws at every probe; the drop is the clean accuracy minus the mean perturbed accuracy on the batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ._core import FlatModel, Reduce, all_sum, check_choice, check_float, check_int, evaluating, prepared, unwrap
from .accuracy import accuracy_at
from .noise_search import (
    Distribution,
    RadiusSearch,
    Scale,
    bisect_radius,
    check_search,
    sample_seeds,
    standard_noise,
)

Variant = Literal["both", "plain", "magnitude"]
MAGNITUDE_EPS = 1e-3
"""ε of the magnitude-aware measures (Jiang et al. 2020)."""

__all__ = [
    "pac_bayes_sigma",
    "pac_bayes",
    "pac_bayes_bound",
    "pac_bayes_mag_bound",
    "size_adjusted",
    "flat_initial",
    "examples_measured",
    "MAGNITUDE_EPS",
]


def pac_bayes_sigma(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    target: float = 0.1,
    magnitude_eps: float | None = None,
    depth: int = 15,
    samples: int = 10,
    lower: float = 0.0,
    upper: float = 2.0,
    tol: float = 1e-2,
    seed: int = 0,
    distribution: Distribution = "gaussian",
    scale: Scale = "linear",
    reduce: Reduce | None = None,
) -> RadiusSearch:
    """σ′: the largest noise scale whose expected training-accuracy drop is at most ``target``.

    Jiang et al. (2020), appendix C, eq. (53) (and (61) with ``magnitude_eps``): noise u ~ N(0, σ² I), or
    u_i ~ N(0, σ² w_i² + ε²) with ε = ``magnitude_eps``, on every trainable parameter, the network in eval
    mode; drop(σ) = acc(w) − mean_k acc(w + u_k) over ``samples`` draws, the same draws (seeded by ``seed``)
    at every probe of the bisection (:func:`flatminima.callbacks.noise_search.bisect_radius`, combine = mean). At
    most ``depth × samples`` perturbed evaluations (plus one clean one).

    ``distribution="uniform"`` draws u uniformly in the box |u_i| ≤ σ (or σ|w_i| + ε with ``magnitude_eps``)
    from the same seeds as :func:`flatminima.callbacks.sharpness_radius.sharpness_alpha`'s random starts: the
    average-case radius of that box, never below the worst-case α′ of the same seeds.

    Args:
        model: A classifier: ``(N, K)`` logits or one logit per example (see :mod:`flatminima.callbacks.accuracy`).
        batches: Iterable of ``(inputs, targets)`` with integer class targets.
        target: The allowed accuracy drop (Jiang et al.: 0.1).
        magnitude_eps: ε of the magnitude-aware noise (None: the plain noise N(0, σ² I)).
        depth: Bisection probes (their 15).
        samples: Monte-Carlo draws per probe (their 10).
        lower: Lower end of the first bracket.
        upper: Upper end of the first bracket (their 2; σ′ ≤ upper).
        tol: Stop at a probe whose drop is within ``tol`` of the target (their 1e-2; 0: never).
        seed: Seed of the noise draws (the same on every process).
        distribution: ``"gaussian"`` (the PAC-Bayes noise) or ``"uniform"`` (in the box; see above).
        scale: Bisect at midpoints (``"linear"``, theirs) or geometric means (``"log"``, lower > 0).
        reduce: Cross-process sum hook (None on one process).
    """
    check_search(target, depth, samples, lower, upper, tol, scale=scale)
    check_choice("distribution", distribution, ("gaussian", "uniform"))
    if magnitude_eps is not None:
        check_float("magnitude_eps", magnitude_eps)
    seeds = sample_seeds(seed, samples)
    model = unwrap(model)
    with evaluating(model), torch.no_grad():
        fm = FlatModel(model)
        data = list(prepared(batches, fm.device, fm.dtype))
        clean = accuracy_at(fm, fm.w0, data, reduce, "PAC-Bayes flatness")
        w_abs = fm.w0.abs() if magnitude_eps is not None else None

        def drop(sigma: float, k: int) -> float:
            z = standard_noise(seeds[k], fm.numel, distribution, device=fm.device, dtype=fm.dtype)
            if w_abs is None:
                size = sigma
            elif distribution == "gaussian":
                size = torch.sqrt(w_abs.square() * sigma**2 + magnitude_eps**2)
            else:
                size = w_abs * sigma + magnitude_eps
            return clean - accuracy_at(fm, fm.w0 + size * z, data, reduce, "PAC-Bayes flatness")

        found = bisect_radius(
            drop, target, samples=samples, depth=depth, lower=lower, upper=upper, tol=tol, scale=scale
        )
    noise = "sigma" if magnitude_eps is None else f"sqrt(sigma^2 w^2 + {magnitude_eps:g}^2)"
    found.warn_if_saturated(f"PAC-Bayes sigma' (noise std {noise}, {distribution})", (lower, upper))
    return found


def pac_bayes_bound(distance_sq: float, sigma: float, m: int) -> float:
    """Jiang et al. (2020) eqs. (48)–(49): ‖w − w_ref‖²/(4σ′²) + log(m/σ′) + 10 (before the size adjustment).

    ``distance_sq`` is ‖w − w⁰‖² (pac-bayes-init) or ‖w‖² (pac-bayes-orig); ‖·‖²/(4σ′²) is half the KL
    divergence between N(w, σ′² I) and the prior N(w_ref, σ′² I).
    """
    return distance_sq / (4.0 * sigma**2) + math.log(m / sigma) + 10.0


def pac_bayes_mag_bound(w: Tensor, reference: Tensor, sigma: float, eps: float, m: int) -> float:
    """The magnitude-aware PAC-Bayes bound: KL(Q ‖ P*)/2 + log(m/σ′) + 10 (before the size adjustment).

    Q = N(w, diag(σ′² w_i² + ε²)) is the posterior whose σ′ was searched, P* = N(w_ref, σ_P² I) the prior with
    the KL-minimizing variance σ_P² = (ω ε² + σ′² ‖w‖² + ‖w − w_ref‖²)/ω (ω parameters), which gives::

        (1/4) Σ_i log[ (ε² + (σ′² ‖w‖² + ‖w − w_ref‖²)/ω) / (ε² + σ′² w_i²) ] + log(m/σ′) + 10

    with w_ref = w⁰ (pac-bayes-mag-init, eq. (56)) or 0 (pac-bayes-mag-orig, eq. (57); its numerator is the
    reference code's (σ′² + 1)‖w‖²/ω). The reference code writes the init bound's variances with w − w⁰ in
    place of w, and uses w − w⁰ in the denominator of the orig bound too, which does not match the noise
    whose σ′ was searched; we use the posterior of the search.
    """
    w64, ref64 = w.to(torch.float64), reference.to(torch.float64)
    omega = w64.numel()
    prior = eps**2 + (sigma**2 * float(w64.square().sum()) + float((w64 - ref64).square().sum())) / omega
    posterior = eps**2 + sigma**2 * w64.square()
    return 0.25 * float(torch.log(prior / posterior).sum()) + math.log(m / sigma) + 10.0


def size_adjusted(value: float, m: int) -> float:
    """√(μ/m): the bounds' adjustment for the data set size (Jiang et al. 2020; the reference's ``sqrt(value/m)``)."""
    return math.sqrt(value / m) if value >= 0 else math.nan


def flat_initial(fm: FlatModel, initial: Mapping[str, Tensor]) -> Tensor:
    """The initial values of ``fm``'s trainable parameters (a state dict of the network) as one flat vector."""
    missing = [n for n in fm.names if n not in initial]
    if missing:
        raise ValueError(
            f"Invalid initial: the initial state has no {missing[0]!r} (a state_dict of the measured "
            "network at initialization is expected)"
        )
    parts = []
    for name, shape in zip(fm.names, fm.shapes):
        t = initial[name]
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"Invalid initial: {name!r} has shape {tuple(t.shape)}, the network's has {tuple(shape)}")
        parts.append(t.detach().reshape(-1).to(device=fm.device, dtype=fm.dtype))
    return torch.cat(parts)


def examples_measured(batches: Sequence[tuple[Any, Any]], device: torch.device, reduce: Reduce | None) -> int:
    """The number of examples (targets) in ``batches`` of all processes."""
    count = torch.tensor([float(sum(int(t.numel()) for _, t in batches))], dtype=torch.float64, device=device)
    return int(all_sum(count, reduce)[0])


def pac_bayes(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    initial: Mapping[str, Tensor] | None = None,
    m: int | None = None,
    variant: Variant = "both",
    target: float = 0.1,
    magnitude_eps: float = MAGNITUDE_EPS,
    depth: int = 15,
    samples: int = 10,
    lower: float = 0.0,
    upper: float = 2.0,
    tol: float = 1e-2,
    seed: int = 0,
    scale: Scale = "linear",
    reduce: Reduce | None = None,
) -> dict[str, float]:
    """Jiang et al. (2020)'s PAC-Bayes flatness measures and bounds, keyed by their names.

    Plain (``variant`` "plain" or "both"), σ′ from :func:`pac_bayes_sigma`:

    * ``pac_bayes_flatness`` = 1/σ′² (eq. (53));
    * ``pac_bayes_orig`` = √(μ/m), μ = :func:`pac_bayes_bound` with ‖w‖² (eq. (49));
    * ``pac_bayes_init`` = the same with ‖w − w⁰‖² (eq. (48); needs ``initial``).

    Magnitude-aware (``variant`` "magnitude" or "both"), σ′ with noise variance σ′² w_i² + ε²:
    ``pac_bayes_mag_flatness`` = 1/σ′² (eq. (61)), ``pac_bayes_mag_orig`` and ``pac_bayes_mag_init`` from
    :func:`pac_bayes_mag_bound`, size-adjusted. w is the vector of all trainable parameters (the perturbed
    ones), m the training-set size. The √(μ/m) adjustment is the reference code's (its other measures get
    monotone adjustments that do not change a ranking and are not applied here).

    Args:
        model: A classifier (see :func:`pac_bayes_sigma`).
        batches: Iterable of ``(inputs, targets)``.
        initial: The network's state dict at initialization (for the ``_init`` bounds; None: omitted).
        m: The number of training examples of the bound (None: the examples measured, over all processes).
        variant: ``"both"``, ``"plain"`` or ``"magnitude"``.
        target, depth, samples, lower, upper, tol, seed, scale, reduce: As in :func:`pac_bayes_sigma`.
        magnitude_eps: ε of the magnitude-aware noise (Jiang et al.: 1e-3).
    """
    check_choice("variant", variant, ("both", "plain", "magnitude"))
    check_float("magnitude_eps", magnitude_eps)
    batches = list(batches)
    model = unwrap(model)
    fm = FlatModel(model)
    w = fm.w0
    w_init = flat_initial(fm, initial) if initial is not None else None
    if m is None:
        m = examples_measured(list(prepared(batches, fm.device, fm.dtype)), fm.device, reduce)
    m = check_int("m", m, 1)
    search = dict(
        target=target,
        depth=depth,
        samples=samples,
        lower=lower,
        upper=upper,
        tol=tol,
        seed=seed,
        scale=scale,
        reduce=reduce,
    )
    out: dict[str, float] = {}
    if variant in ("both", "plain"):
        sigma = pac_bayes_sigma(model, batches, **search).radius
        out["pac_bayes_flatness"] = 1.0 / sigma**2
        out["pac_bayes_orig"] = size_adjusted(pac_bayes_bound(float(w.square().sum()), sigma, m), m)
        if w_init is not None:
            out["pac_bayes_init"] = size_adjusted(pac_bayes_bound(float((w - w_init).square().sum()), sigma, m), m)
    if variant in ("both", "magnitude"):
        sigma = pac_bayes_sigma(model, batches, magnitude_eps=magnitude_eps, **search).radius
        out["pac_bayes_mag_flatness"] = 1.0 / sigma**2
        out["pac_bayes_mag_orig"] = size_adjusted(
            pac_bayes_mag_bound(w, torch.zeros_like(w), sigma, magnitude_eps, m), m
        )
        if w_init is not None:
            out["pac_bayes_mag_init"] = size_adjusted(pac_bayes_mag_bound(w, w_init, sigma, magnitude_eps, m), m)
    return out
