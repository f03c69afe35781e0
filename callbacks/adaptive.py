"""Worst-case (adaptive) m-sharpness by projected gradient ascent on the weights (torch only).

Andriushchenko, Croce, Müller, Hein & Flammarion (2023), "A modern look at the relationship between
sharpness and generalization": for a batch B and c = |w| (adaptive) or c = 1,

    S_B = max_{‖δ ⊙ c⁻¹‖_p ≤ ρ} L_B(w + δ) − L_B(w),

estimated per batch and averaged over batches (m-sharpness, m the batch size). All parameters are
perturbed; the network runs in eval mode. The ascent works on one flat vector δ (never on the
module), with sync-free tensor bookkeeping (no host round trip inside the iterations).

* ``method="apgd"`` — the authors' APGD estimator, as their code runs it (``eval_APGD_sharpness`` and
  ``weight_ascent_step_momentum`` in github.com/tml-epfl/sharpness-vs-generalization): step η₀ = 2ρ,
  z = Π(δ + η·dir(g)), δ ← 0.75·z + 0.25·δ_prev (δ_prev the iterate before δ), dir = sign(g) ⊙ c for
  p = ∞ and g/‖g‖₂ ⊙ c for p = 2, g the gradient at the current point; at the checkpoints of
  :func:`apgd_checkpoints` the step halves when fewer than 75 % of the steps since the last checkpoint
  raised the best loss, or when neither the step nor the best loss changed, and then the *next gradient
  only* is taken at the best point so far (their ``model.load_state_dict(worst_model_dict)``: δ and
  δ_prev stay where they were); the value is the best loss over all iterates (δ = 0 included), so it
  is never negative. Agrees with their code to ~1e-5 relative (tests/test_apgd_reference.py), the
  residue being their ellipsoid projection, which stops once ‖δ/c‖₂ is within 1e-5 of ρ.
* ``method="apgd_reset"`` — this project's earlier variant: at a halving the iterate itself (δ and
  δ_prev, with the gradient) restarts from the best point. Values differ from ``"apgd"`` by up to
  ~0.5 % on a small CNN (mostly higher); not comparable digit for digit with published tables.
* ``method="pga"`` — the protocol of Hammoud, Liossatos & Nicollier (2023): plain projected gradient
  ascent δ ← Π(δ + η·∇L) with η the training learning rate, ``n_iters`` (5) steps, the best loss over
  the iterates after the first step (so it can be negative when the ascent fails, as they report).

What each ascent returns (:class:`Ascents`, one entry per batch): A, the loss of the selected iterate
(the ascent loss), L, the loss at w (the clean loss), and how many of the ascent steps lowered the loss
below the previous iterate's (δ = 0 before the first step); the sharpness is A − L. A monotone ascent
has no such step.

Options of ``"pga"`` for the authors' notebooks (Hammoud et al. 2023, github.com/HadiHammoud44/CS439_Sharpness):

* ``score`` — a callable ``score(flat) -> loss`` (e.g. the loss over the whole training set): every
  iterate is scored by it instead of by the ascent batch's loss, and the value is the best score minus
  ``score(w0)`` (their FCNN and GAT notebooks score each PGA iterate by the training-set loss).
* ``box="signed"`` (p = ∞, adaptive) — the bounds ±ρ·w with torch.clamp's rule (``min(max(δ, −ρw), ρw)``,
  the upper bound winning when the bounds cross) instead of ±ρ·|w|: their FCNN notebook's projection
  ``clamp(w, w0 − ρ·w0, w0 + ρ·w0)``, which pins every negative weight at w0 − ρ·|w0|.
* ``select="best_pass_end"`` — the selection of their FCNN notebook: the ``n_iters`` steps form ``passes``
  passes of ``n_iters / passes`` consecutive steps, and the selected iterate is the one at the end of the
  pass whose summed loss (over its iterates) is the largest, the earliest on ties, instead of the best
  iterate (``select="best_iterate"``).

Projections: p = ∞ clamps δ to the box |δ| ≤ ρ·c; p = 2 without adaptivity rescales onto the ball;
adaptive p = 2 projects onto the ellipsoid ‖δ/c‖₂ ≤ ρ exactly, δ = v·c²/(c² + λ) with λ ≥ 0 found by
bisection. Coordinates with c = 0 (zero weights, adaptive) cannot move: δ = 0 there (the reference
code divides by zero and silently skips the L2 projection).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from ._core import FlatModel, LossFn, check_choice, check_int

Method = Literal["apgd", "apgd_reset", "pga"]
Box = Literal["abs", "signed"]
Score = Callable[[Tensor], Tensor]
Select = Literal["best_iterate", "best_pass_end"]
_BISECTION_STEPS = 60


class Ascents(NamedTuple):
    """The outcome of the worst-case ascents, one entry per batch (1-D tensors in the compute dtype)."""

    ascent: Tensor
    """A: the loss (or score) of the selected iterate."""
    clean: Tensor
    """L: the loss (or score) at w, δ = 0."""
    falls: Tensor
    """How many ascent steps ended below the previous iterate's loss (δ = 0 before the first step)."""

    @property
    def values(self) -> Tensor:
        """The per-batch sharpness A − L."""
        return self.ascent - self.clean


def apgd_checkpoints(n_iters: int) -> list[int]:
    """Iterations (0-based) at which APGD may halve its step, computed as in the authors' code.

    p₀ = 0, p₁ = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06); checkpoints ⌈p_j·n_iters⌉ for
    j ≥ 1 until they reach n_iters or repeat. For n_iters = 20: [5, 9, 12, 15, 16, 18, 19, 20].
    """
    p = [0.0, 0.22]
    w = [0, math.ceil(n_iters * 0.22)]
    while w[-1] < n_iters and w[-1] != w[-2]:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
        w.append(math.ceil(p[-1] * n_iters))
    return w[1:]


def project(delta: Tensor, rho: float, p: float, c: Tensor | None) -> Tensor:
    """Euclidean projection of δ onto {‖δ ⊙ c⁻¹‖_p ≤ ρ} for p ∈ {2, ∞} (c None: the plain ball)."""
    if math.isinf(p):
        if c is None:
            return delta.clamp(-rho, rho)
        bound = rho * c
        return torch.minimum(torch.maximum(delta, -bound), bound)
    if c is None:
        norm = torch.linalg.vector_norm(delta)
        return delta * torch.where(norm > rho, rho / norm.clamp_min(torch.finfo(delta.dtype).tiny), 1.0)
    return _project_ellipsoid(delta, rho, c)


def _project_ellipsoid(v: Tensor, rho: float, c: Tensor) -> Tensor:
    """argmin_δ ‖δ − v‖₂ s.t. ‖δ/c‖₂ ≤ ρ: δ = v·c²/(c² + λ), λ ≥ 0 by bisection (sync-free)."""
    movable = c > 0
    v = torch.where(movable, v, 0.0)
    c2 = c.square()
    rho2 = rho * rho

    def scaled_norm2(lam: Tensor) -> Tensor:  # ‖δ(λ)/c‖² = Σ v²c²/(c²+λ)²
        return torch.where(movable, v * c / (c2 + lam).clamp_min(torch.finfo(v.dtype).tiny), 0.0).square().sum()

    zero = v.new_zeros(())
    inside = scaled_norm2(zero) <= rho2
    lo = zero
    hi = torch.linalg.vector_norm(v * c) / rho  # ‖δ(hi)/c‖² ≤ Σ v²c²/hi² = ρ²
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        over = scaled_norm2(mid) > rho2
        lo = torch.where(over, mid, lo)
        hi = torch.where(over, hi, mid)
    return torch.where(inside, v, v * c2 / (c2 + hi))


def project_signed(delta: Tensor, rho: float, w0: Tensor) -> Tensor:
    """``min(max(δ, −ρ·w0), ρ·w0)``: torch.clamp's box with signed bounds (Hammoud et al.'s FCNN notebook).

    Equals the box |δ| ≤ ρ·|w0| where w0 ≥ 0; where w0 < 0 the bounds cross and δ = ρ·w0 = −ρ·|w0|.
    """
    bound = rho * w0
    return torch.minimum(torch.maximum(delta, -bound), bound)


def _direction(g: Tensor, p: float, c: Tensor | None) -> Tensor:
    d = g.sign() if math.isinf(p) else g / (torch.linalg.vector_norm(g) + 1e-12)
    return d if c is None else d * c


def _apgd(
    fm: FlatModel,
    batch: Any,
    loss_fn: LossFn,
    rho: float,
    p: float,
    c: Tensor | None,
    n_iters: int,
    step_size: float,
    reset: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """(best loss over all iterates, δ = 0 included; the batch loss at w0; the number of steps that lowered it)."""
    zero = torch.zeros_like(fm.w0)
    loss0, g = fm.loss_and_grad(fm.w0, batch, loss_fn)
    delta, delta_prev = zero, zero
    best, best_delta, best_grad = loss0, zero, g
    step = loss0.new_tensor(step_size)
    prev_step, prev_best = step, best
    improvements, falls, prev_loss = loss0.new_zeros(()), loss0.new_zeros(()), loss0
    prev_checkpoint = 0
    checkpoints = set(apgd_checkpoints(n_iters))
    for i in range(n_iters):
        z = project(delta + step * _direction(g, p, c), rho, p, c)
        delta, delta_prev = 0.75 * z + 0.25 * delta_prev, delta
        last = i == n_iters - 1
        if last:
            with torch.no_grad():
                loss = fm.loss(fm.w0 + delta, batch, loss_fn).detach()
        else:
            loss, g = fm.loss_and_grad(fm.w0 + delta, batch, loss_fn)
        falls, prev_loss = falls + (loss < prev_loss), loss
        improved = loss > best
        best = torch.where(improved, loss, best)
        improvements = improvements + improved
        if last:
            break
        if reset:
            best_delta = torch.where(improved, delta, best_delta)
        best_grad = torch.where(improved, g, best_grad)
        if i in checkpoints:
            few = improvements < 0.75 * (i - prev_checkpoint)
            stalled = (prev_step == step) & (prev_best == best)
            prev_step, prev_best, prev_checkpoint = step, best, i
            improvements = loss0.new_zeros(())
            halve = few | stalled
            step = torch.where(halve, 0.5 * step, step)
            g = torch.where(halve, best_grad, g)  # the authors: the next gradient is taken at the best point
            if reset:  # apgd_reset: the iterate itself restarts from the best point
                delta = torch.where(halve, best_delta, delta)
                delta_prev = torch.where(halve, best_delta, delta_prev)
    return best, loss0, falls


class _PassEnds:
    """The selection ``passes``: the iterate ending the pass with the largest summed loss (earliest on ties)."""

    def __init__(self, like: Tensor, pass_steps: int) -> None:
        self.pass_steps = pass_steps
        self.total = like.new_zeros(())
        self.best_total = like.new_tensor(-math.inf)
        self.selected = like.new_tensor(-math.inf)

    def add(self, i: int, loss: Tensor) -> None:
        """Take the loss of the iterate after step ``i`` (0-based)."""
        self.total = self.total + loss
        if (i + 1) % self.pass_steps == 0:  # the end of a pass
            larger = (self.total > self.best_total) | self.total.isnan()  # NaN propagates, as torch.maximum
            self.best_total = torch.where(larger, self.total, self.best_total)
            self.selected = torch.where(larger, loss, self.selected)
            self.total = torch.zeros_like(self.total)


def _pga(
    fm: FlatModel,
    batch: Any,
    loss_fn: LossFn,
    rho: float,
    p: float,
    c: Tensor | None,
    n_iters: int,
    step_size: float,
    score: Score | None = None,
    clean: Tensor | None = None,
    box: Box = "abs",
    passes: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(the selected iterate's loss, scored by ``score`` if given; the clean loss, ``clean`` when scored, else the
    batch loss at w0; the number of steps that lowered the loss). The selection: the best iterate after the first
    step, or with ``passes`` the end of the pass with the largest summed loss."""
    loss0, g = fm.loss_and_grad(fm.w0, batch, loss_fn)
    clean = loss0 if score is None else clean
    delta = torch.zeros_like(fm.w0)
    best = fm.w0.new_tensor(-math.inf)
    ends = None if passes is None else _PassEnds(best, n_iters // passes)
    falls, prev_loss = loss0.new_zeros(()), clean
    for i in range(n_iters):
        delta = delta + step_size * g
        delta = project_signed(delta, rho, fm.w0) if box == "signed" else project(delta, rho, p, c)
        if score is not None:
            with torch.no_grad():
                loss = score(fm.w0 + delta).detach()
            if i < n_iters - 1:
                g = fm.loss_and_grad(fm.w0 + delta, batch, loss_fn)[1]
        elif i == n_iters - 1:
            with torch.no_grad():
                loss = fm.loss(fm.w0 + delta, batch, loss_fn).detach()
        else:
            loss, g = fm.loss_and_grad(fm.w0 + delta, batch, loss_fn)
        falls, prev_loss = falls + (loss < prev_loss), loss
        if ends is None:
            best = torch.maximum(best, loss)
        else:
            ends.add(i, loss)
    return (best if ends is None else ends.selected), clean, falls


def check_selection(method: str, n_iters: int, select: str, passes: int) -> None:
    """Refuse a selection that does not apply (``ValueError`` naming ``select`` or ``passes``).

    ``select="best_pass_end"`` needs method pga and ``passes`` dividing ``n_iters``; ``passes`` > 1 needs it.
    """
    check_choice("select", select, ("best_iterate", "best_pass_end"))
    check_int("passes", passes, 1)
    if select == "best_pass_end" and method != "pga":
        raise ValueError(f"Invalid select: 'best_pass_end' with method={method!r}; it applies to method='pga'")
    if select == "best_iterate" and passes != 1:
        raise ValueError(
            f"Invalid passes: {passes} with select='best_iterate'; expected 1 (passes apply to select='best_pass_end')"
        )
    if n_iters % passes:
        raise ValueError(f"Invalid passes: {passes}; expected a divisor of n_iters={n_iters} (passes of equal length)")


def worst_case_ascents(
    fm: FlatModel,
    batches: Iterable[tuple[Any, Any]],
    rho: float,
    *,
    p: float,
    adaptive: bool,
    n_iters: int,
    method: Method,
    step_size: float,
    loss_fn: LossFn,
    score: Score | None = None,
    box: Box = "abs",
    select: Select = "best_iterate",
    passes: int = 1,
) -> Ascents:
    """The ascent loss A, clean loss L and falling steps of every batch's ascent (:class:`Ascents`, in order).

    ``fm`` is the :class:`FlatModel` of a network already in the no-trace context; ``batches`` are
    prepared ``(inputs, targets)`` pairs on its device. See the module docstring for the algorithms;
    ``score``, ``box`` and ``select`` apply to ``method="pga"`` only. With ρ = 0, A = L (no ascent runs).
    """
    c = fm.w0.abs() if adaptive else None
    if method != "pga" and (score is not None or box != "abs"):
        raise ValueError(f"Invalid method: {method!r} with a score set or box='signed'; these apply to method='pga'")
    check_selection(method, n_iters, select, passes)
    with torch.no_grad():
        base = None if score is None else score(fm.w0).detach()  # the clean score, once
    rows = []
    for batch in batches:
        if rho <= 0:
            if base is None:
                with torch.no_grad():
                    loss0 = fm.loss(fm.w0, batch, loss_fn).detach()
            rows.append((loss0 if base is None else base,) * 2 + (fm.w0.new_zeros(()),))
        elif method == "pga":
            rows.append(
                _pga(
                    fm,
                    batch,
                    loss_fn,
                    rho,
                    p,
                    c,
                    n_iters,
                    step_size,
                    score,
                    base,
                    box,
                    passes if select == "best_pass_end" else None,
                )
            )
        else:
            rows.append(_apgd(fm, batch, loss_fn, rho, p, c, n_iters, step_size, reset=method == "apgd_reset"))
    if not rows:
        return Ascents(*(fm.w0.new_zeros(0),) * 3)
    return Ascents(*(torch.stack(column) for column in zip(*rows)))


def worst_case_per_batch(fm: FlatModel, batches: Iterable[tuple[Any, Any]], rho: float, **kwargs: Any) -> Tensor:
    """Per-batch worst-case sharpness values A − L (a 1-D tensor, one entry per batch, in order).

    The arguments are those of :func:`worst_case_ascents`.
    """
    return worst_case_ascents(fm, batches, rho, **kwargs).values
