"""Worst-case sharpness 1/α′² of Jiang et al. (2020): the largest box that gradient ascent cannot exploit (torch only).

Jiang, Neyshabur, Mobahi, Krishnan & Bengio (2020), "Fantastic generalization measures and where to find
them" (ICLR; arXiv:1912.02178), appendix C, the "sharpness" family: α′ is the largest radius such that no
perturbation u of the trainable parameters in the box |u_i| ≤ r_i drops the training accuracy by more than
a target (0.1), with

* r_i = α (sharpness-flatness: 1/α′²), or
* r_i = α |w_i| + ε, ε = 1e-3 (magnitude-aware, sharpness-mag-flatness: 1/α′²).

Jiang et al. do not publish how they maximize over the box; we estimate the maximum (as other
re-implementations do, with random starts and projected gradient ascent) from ``restarts`` random starts
u⁰ ~ U[−r, r], each followed by a few steps of projected sign-gradient ascent on the training
cross-entropy of all the batches, u ← clip(u + η r ⊙ sign ∇L(w + u), −r, r), with
η = ``step_size`` (default 2.5/steps, Madry et al. 2018's heuristic); the drop of a start is the clean
accuracy minus the lowest accuracy seen along its path (the start included). α′ comes from the seeded
bisection of :mod:`flatminima.callbacks.noise_search` with the worst start (combine = max); the starts are the same at
every probe, and drawn from the same seeds as the uniform noise of an average-case search, so a worst-case
α′ never exceeds the average-case one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._core import FlatModel, LossFn, Reduce, all_sum, check_float, check_int, evaluating, prepared, unwrap
from .accuracy import accuracy_at, correct_count
from .noise_search import RadiusSearch, Scale, bisect_radius, check_search, sample_seeds, standard_noise

__all__ = ["sharpness_alpha", "ascent_step_totals"]


def ascent_step_totals(
    fm: FlatModel, flat: Tensor, batches: Sequence[tuple[Any, Any]], loss_fn: LossFn, reduce: Reduce | None
) -> tuple[Tensor, float]:
    """The gradient of Σ_B L_B at ``flat`` and the accuracy there, summed over all processes (one forward-backward)."""
    leaf = flat.detach().requires_grad_(True)
    grad = torch.zeros_like(flat)
    correct = torch.zeros((), dtype=torch.float64, device=fm.device)
    count = 0
    for inputs, targets in batches:
        outputs = fm(leaf, inputs)
        loss = loss_fn(outputs, targets)
        (g,) = torch.autograd.grad(loss, leaf)
        grad += g
        correct = correct + correct_count(outputs.detach(), targets)
        count += targets.numel()
    packed = all_sum(
        torch.cat([grad.to(torch.float64), torch.stack([correct, correct.new_tensor(float(count))])]), reduce
    )
    return packed[:-2].to(flat.dtype), float(packed[-2] / packed[-1])


def sharpness_alpha(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    target: float = 0.1,
    magnitude_eps: float | None = None,
    depth: int = 15,
    restarts: int = 3,
    steps: int = 5,
    step_size: float | None = None,
    lower: float = 1e-6,
    upper: float = 2.0,
    tol: float = 1e-2,
    seed: int = 0,
    scale: Scale = "log",
    loss_fn: LossFn = F.cross_entropy,
    reduce: Reduce | None = None,
) -> RadiusSearch:
    """α′: the largest box radius within which gradient ascent from random starts drops the accuracy ≤ ``target``.

    Jiang et al. (2020), appendix C, sharpness-flatness (see the module docstring for the box, the ascent and
    the bisection). Per probe at most ``restarts`` starts (a probe stops at the first start over the target),
    each ``steps`` forward-backward passes plus one forward pass over the batches: at most
    ``depth × restarts`` evaluated starts and ``depth × restarts × (steps + 1)`` passes, plus one clean pass.

    Args:
        model: A classifier (see :mod:`flatminima.callbacks.accuracy`).
        batches: Iterable of ``(inputs, targets)`` with integer class targets; the ascent climbs the sum of
            their losses.
        target: The allowed accuracy drop (Jiang et al.: 0.1).
        magnitude_eps: ε of the magnitude-aware box r_i = α|w_i| + ε (None: the box r_i = α).
        depth: Bisection probes.
        restarts: Random starts per probe (the samples of the search).
        steps: Ascent steps per start (0: the random starts only).
        step_size: η, the step as a fraction of the radius (default 2.5/steps).
        lower: Lower end of the first bracket (> 0 for ``scale="log"``).
        upper: Upper end of the first bracket.
        tol: Stop at a probe whose drop is within ``tol`` of the target (0: never).
        seed: Seed of the random starts (the same on every process).
        scale: Bisect at geometric means (``"log"``, the default: α′ of a plain box spans orders of magnitude
            across networks, 1e-5 to 1e-1) or midpoints (``"linear"``).
        loss_fn: The loss the ascent climbs (mean-reduced).
        reduce: Cross-process sum hook (None on one process).
    """
    check_search(target, depth, restarts, lower, upper, tol, samples_name="restarts", scale=scale)
    check_int("steps", steps, 0)
    eta = 2.5 / max(steps, 1) if step_size is None else check_float("step_size", step_size, strict=True)
    if magnitude_eps is not None:
        check_float("magnitude_eps", magnitude_eps)
    seeds = sample_seeds(seed, restarts)
    model = unwrap(model)
    with evaluating(model):
        fm = FlatModel(model)
        data = list(prepared(batches, fm.device, fm.dtype))
        clean = accuracy_at(fm, fm.w0, data, reduce, "worst-case sharpness")
        w_abs = fm.w0.abs() if magnitude_eps is not None else None

        def drop(alpha: float, k: int) -> float:
            radius = alpha if w_abs is None else w_abs * alpha + magnitude_eps
            u = standard_noise(seeds[k], fm.numel, "uniform", device=fm.device, dtype=fm.dtype) * radius
            worst = clean
            for _ in range(steps):
                grad, acc = ascent_step_totals(fm, fm.w0 + u, data, loss_fn, reduce)
                worst = min(worst, acc)
                if clean - worst > target:
                    return clean - worst
                u = torch.clamp(u + eta * radius * grad.sign(), -radius, radius)
            worst = min(worst, accuracy_at(fm, fm.w0 + u, data, reduce, "worst-case sharpness"))
            return clean - worst

        found = bisect_radius(
            drop, target, samples=restarts, depth=depth, lower=lower, upper=upper, tol=tol, combine="max", scale=scale
        )
    box = "alpha" if magnitude_eps is None else f"alpha |w| + {magnitude_eps:g}"
    found.warn_if_saturated(f"worst-case sharpness alpha' (box |u| <= {box})", (lower, upper))
    return found
