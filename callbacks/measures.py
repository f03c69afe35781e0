"""Sharpness measures as pure functions (torch only, no Lightning): usable on any ``nn.Module``.

Every function takes ``batches``, an iterable of ``(inputs, targets)`` (``inputs`` a tensor, or a
tuple of tensors passed as ``model(*inputs)``; ``targets`` anything ``loss_fn`` accepts), measures the
model in eval mode and fp32 without autocast, leaves its weights, buffers, ``training`` flags,
``.grad`` and the global RNG exactly as it found them (also on exceptions: the module is never
written to, parameters are perturbed through ``torch.func.functional_call``), and returns Python
floats. Batches are moved to the model's device.

Multi-process use: pass each process its share of the batches and ``reduce``, a callable returning
the elementwise sum of a tensor over processes (e.g. ``lambda t: strategy.reduce(t, reduce_op="sum")``
in Lightning); every process then returns the value one process would compute on all the batches.

Measures (formulas in each docstring):
    :func:`minimum_sharpness`, :func:`adaptive_sharpness`, :func:`gradient_norm_sharpness`,
    :func:`hessian_eigenvalues`, :func:`hessian_trace` (and :func:`hutchinson_trace` with its error).
Lower-level pieces: :func:`layer_traces` (per-layer exact CE-Hessian traces), :func:`minimize_scaled_trace`
(the α solve), :func:`gradient_norm` (from gradients already computed, e.g. by a training step),
:func:`adaptive_sharpness_per_batch`, :func:`adaptive_sharpness_parts` (A, L and falling steps),
:class:`HessianOperator` (H v with a reduce hook).

Generalization measures of Jiang et al. (2020) and beside them (each in its own module, gathered here):
:func:`pac_bayes` (PAC-Bayes flatness, magnitude-aware, and the bounds; :func:`pac_bayes_sigma`),
:func:`sharpness_alpha` (worst-case sharpness radius α′), :func:`bisect_radius` (the seeded bisection both
use), :func:`average_sharpness` (Andriushchenko et al. 2023), :func:`norm_measures` (norms, margins, path-norm,
counts; :func:`fold_batchnorm`), :func:`fisher_rao_norm` (Liang et al. 2019), :func:`loss_and_accuracy`.
The bisection measures reduce correct counts and gradients; :func:`norm_measures` takes every batch on every
process and no ``reduce``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._core import (
    FlatModel,
    LossFn,
    Reduce,
    check_choice,
    check_float,
    check_int,
    check_p,
    dual_exponent,
    evaluating,
    mean_of,
    prepared,
    unwrap,
)
from .accuracy import loss_and_accuracy
from .adaptive import Ascents, Box, Method, Select, apgd_checkpoints, check_selection, worst_case_ascents
from .alpha_scaling import Solver, minimize_scaled_trace, scaled_trace
from .average_case import MonteCarloEstimate, average_sharpness
from .batchnorm_folding import fold_batchnorm
from .fisher_rao import fisher_rao_norm
from .hessian import HessianOperator, TraceEstimate, hutchinson, lanczos_top
from .noise_search import RadiusSearch, bisect_radius
from .norms import norm_measures
from .pac_bayes_bounds import pac_bayes, pac_bayes_sigma
from .per_layer_traces import LayerTraces, UnsupportedNetworkError, feed_forward_layers, layer_traces
from .sharpness_radius import sharpness_alpha

__all__ = [
    "check_batch",
    "minimum_sharpness",
    "adaptive_sharpness",
    "adaptive_sharpness_per_batch",
    "adaptive_sharpness_parts",
    "AdaptiveParts",
    "gradient_norm_sharpness",
    "gradient_norm",
    "hessian_eigenvalues",
    "hessian_trace",
    "hutchinson_trace",
    "layer_traces",
    "LayerTraces",
    "feed_forward_layers",
    "UnsupportedNetworkError",
    "minimize_scaled_trace",
    "scaled_trace",
    "apgd_checkpoints",
    "HessianOperator",
    "TraceEstimate",
    "Reduce",
    "pac_bayes",
    "pac_bayes_sigma",
    "sharpness_alpha",
    "bisect_radius",
    "RadiusSearch",
    "average_sharpness",
    "MonteCarloEstimate",
    "norm_measures",
    "fold_batchnorm",
    "fisher_rao_norm",
    "loss_and_accuracy",
]


# ---------------------------------------------------------------------------------------- input check
def check_batch(model: nn.Module, batch: Any, loss_fn: LossFn | None = F.cross_entropy) -> None:
    """Run ``model`` (and ``loss_fn``) once on ``batch`` as the measures would, to refuse bad input early.

    ``batch`` must be an ``(inputs, targets)`` pair (or an input tensor); raises ``TypeError`` or
    ``ValueError`` (or what the network raises) saying why a measure could not use it. Leaves no trace.
    """
    model = unwrap(model)
    with evaluating(model), torch.no_grad():
        fm = FlatModel(model)
        inputs, targets = next(prepared([batch], fm.device, fm.dtype))
        if loss_fn is None:
            fm(fm.w0, inputs)
        else:
            fm.loss(fm.w0, (inputs, targets), loss_fn)


# ---------------------------------------------------------------------------------------- minimum sharpness
def minimum_sharpness(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    solver: Solver = "exact",
    lr: float = 0.1,
    steps: int = 10_000,
    decay: float = 1e-3,
    retries: int = 0,
    reduce: Reduce | None = None,
) -> float:
    """Minimum sharpness: the smallest Hessian trace over α-scale transformations of a ReLU network.

    Ibayashi, Hamaguchi & Imaizumi (2021), "Minimum sharpness: scale-invariant parameter-robustness of
    neural networks" (arXiv:2106.12612)::

        MS = min_{α > 0, ∏α_d = 1} Σ_d T_d/α_d² + Σ_d B_d/(∏_{k≤d} α_k)²

    where T_d, B_d are the exact traces of the Hessian of the mean cross-entropy over layer d's weights
    and bias (:func:`layer_traces`: closed-form CE Hessian in the logits, diag H = diag GGN for ReLU
    networks, labels not needed; eval-mode BatchNorm folded into the layer before it). The minimum is
    exact (Newton on log α, :func:`minimize_scaled_trace`); ``solver="sgd"`` reproduces the original
    code's SGD for replication (``lr``, ``steps``, ``decay``, ``retries`` apply to it only).

    Args:
        model: A feed-forward chain of Linear/Conv2d layers with ReLU/LeakyReLU/pooling (BatchNorm after
            a layer allowed) producing logits; others are refused with a ``ValueError`` saying why.
        batches: Iterable of ``(inputs, targets)`` (targets ignored) or input tensors.
        solver: ``"exact"`` or ``"sgd"``.
        lr: SGD learning rate (the original code's default 0.1).
        steps: SGD steps (the original default 10 000).
        decay: The step-t SGD learning rate is lr/(1 + decay·t).
        retries: On SGD divergence, halve lr and double steps this many times (Bejan et al.).
        reduce: Cross-process sum hook (None on one process).

    Returns:
        MS as a float (the mean over all examples of all processes' batches).
    """
    check_choice("solver", solver, ("exact", "sgd"))
    traces = layer_traces(model, batches, reduce=reduce)
    return minimize_scaled_trace(
        traces.weight, traces.bias, solver=solver, lr=lr, steps=steps, decay=decay, retries=retries
    )


# ---------------------------------------------------------------------------------------- adaptive sharpness
def _check_worst_case(
    rho: float,
    p: float,
    n_iters: int,
    method: str,
    step_size: float | None,
    box: str = "abs",
    adaptive: bool = True,
    scored: bool = False,
    select: str = "best_iterate",
    passes: int = 1,
) -> tuple[float, float]:
    rho = check_float("rho", rho)
    p = check_p(p, allowed=(2.0, math.inf))
    check_int("n_iters", n_iters, 1)
    check_choice("method", method, ("apgd", "apgd_reset", "pga"))
    check_pga_options(method, p, adaptive, box, scored)
    check_selection(method, n_iters, select, passes)
    if step_size is None:
        if method == "pga":
            raise ValueError(
                "Invalid step_size: None; method='pga' needs step_size (Hammoud et al. 2023: the training lr)"
            )
        return rho, p
    check_float("step_size", step_size, strict=True)
    return rho, p


def check_pga_options(
    method: str, p: float, adaptive: bool, box: str, scored: bool, what: str = "score_batches"
) -> None:
    """Refuse ``box="signed"`` outside pga with p = ∞ and c = |w|, and a score set outside pga (``ValueError``)."""
    check_choice("box", box, ("abs", "signed"))
    if box == "signed" and not (method == "pga" and math.isinf(p) and adaptive):
        raise ValueError(
            f"Invalid box: 'signed' with method={method!r}, p={p}, adaptive={adaptive}; it applies to "
            "method='pga' with p=inf and adaptive=True"
        )
    if scored and method != "pga":
        raise ValueError(
            f"Invalid {what}: a score set with method={method!r}; scoring by another set applies to method='pga'"
        )


@contextlib.contextmanager
def _mode(model: nn.Module, fm: FlatModel, train_mode: bool) -> Iterator[None]:
    """Inside :func:`evaluating`: with ``train_mode``, every module in training mode (dropout drawn, BatchNorm on
    batch statistics) and the floating buffers replaced by copies, so running statistics updated there vanish."""
    if train_mode:
        for m in model.modules():
            m.training = True
        fm.extra.update({n: b.detach().clone() for n, b in model.named_buffers()})
    yield


def _score(fm: FlatModel, batches: Iterable[Any] | None, loss_fn: LossFn) -> Callable[[Tensor], Tensor] | None:
    """``score(flat)``: the mean of the losses of the prepared ``batches`` at ``flat`` (None without batches)."""
    if batches is None:
        return None
    prepared_batches = list(prepared(batches, fm.device, fm.dtype))
    if not prepared_batches:
        raise ValueError("Invalid score_batches: empty; pass at least one (inputs, targets) batch or None")

    def score(flat: Tensor) -> Tensor:
        return torch.stack([fm.loss(flat, b, loss_fn) for b in prepared_batches]).mean()

    return score


def _worst_case(
    model: nn.Module,
    batches: Iterable[Any],
    rho: float,
    p: float,
    adaptive: bool,
    n_iters: int,
    method: Method,
    step_size: float | None,
    loss_fn: LossFn,
    score_batches: Iterable[Any] | None,
    box: Box,
    train_mode: bool,
    select: Select = "best_iterate",
    passes: int = 1,
) -> Ascents:
    """The ascents of this process's batches (per batch, in the model's compute dtype)."""
    rho, p = _check_worst_case(
        rho, p, n_iters, method, step_size, box, adaptive, score_batches is not None, select, passes
    )
    model = unwrap(model)
    with evaluating(model):
        fm = FlatModel(model)
        with _mode(model, fm, train_mode):
            return worst_case_ascents(
                fm,
                prepared(batches, fm.device, fm.dtype),
                rho,
                p=p,
                adaptive=adaptive,
                n_iters=n_iters,
                method=method,
                step_size=2.0 * rho if step_size is None else step_size,
                loss_fn=loss_fn,
                score=_score(fm, score_batches, loss_fn),
                box=box,
                select=select,
                passes=passes,
            )


def adaptive_sharpness_per_batch(
    model: nn.Module,
    batches: Iterable[Any],
    rho: float,
    *,
    p: float = math.inf,
    adaptive: bool = True,
    n_iters: int = 20,
    method: Method = "apgd",
    step_size: float | None = None,
    loss_fn: LossFn = F.cross_entropy,
    score_batches: Iterable[Any] | None = None,
    box: Box = "abs",
    train_mode: bool = False,
    select: Select = "best_iterate",
    passes: int = 1,
) -> list[float]:
    """Per-batch worst-case sharpness values of :func:`adaptive_sharpness` (this process's batches only)."""
    values = _worst_case(
        model,
        batches,
        rho,
        p,
        adaptive,
        n_iters,
        method,
        step_size,
        loss_fn,
        score_batches,
        box,
        train_mode,
        select,
        passes,
    ).values
    return [float(v) for v in values.cpu()]


def adaptive_sharpness(
    model: nn.Module,
    batches: Iterable[Any],
    rho: float,
    *,
    p: float = math.inf,
    adaptive: bool = True,
    n_iters: int = 20,
    method: Method = "apgd",
    step_size: float | None = None,
    loss_fn: LossFn = F.cross_entropy,
    reduce: Reduce | None = None,
    score_batches: Iterable[Any] | None = None,
    box: Box = "abs",
    train_mode: bool = False,
    select: Select = "best_iterate",
    passes: int = 1,
) -> float:
    """Adaptive worst-case m-sharpness, averaged over batches.

    Andriushchenko, Croce, Müller, Hein & Flammarion (2023), "A modern look at the relationship between
    sharpness and generalization" (ICML; arXiv:2302.07011)::

        S = mean_B [ max_{‖δ ⊙ c⁻¹‖_p ≤ ρ} L_B(w + δ) − L_B(w) ],   c = |w| if adaptive else 1,

    all parameters perturbed, the model in eval mode, m = the batch size. ``method="apgd"`` is the
    authors' APGD estimator as their code runs it (initial step 2ρ or ``step_size``, momentum 0.75/0.25,
    step halving at :func:`apgd_checkpoints` with the next gradient taken at the best point, value = best
    loss over all iterates, never negative); ``method="apgd_reset"`` restarts the iterate itself from the
    best point at a halving (this project's earlier variant, see :mod:`flatminima.callbacks.adaptive`); ``method="pga"`` is
    Hammoud et al. (2023)'s projected gradient ascent δ ← Π(δ + η·∇L) with η = ``step_size`` (the training
    learning rate; they use ``n_iters=5``, p = ∞, adaptive, 50 batches of m = 64), which can be negative.

    Options of ``"pga"`` that Hammoud et al.'s notebooks use (github.com/HadiHammoud44/CS439_Sharpness):
    ``score_batches`` scores every iterate by the mean loss over these batches (their notebooks: the whole
    training set) instead of the ascent batch's loss, S = mean_B max_k L_score(w + δ_k) − L_score(w), with
    L_score(w) computed once; ``box="signed"`` projects with the bounds ±ρ·w as their FCNN notebook's
    ``torch.clamp`` does (negative weights pinned at w − ρ|w|, see :func:`flatminima.callbacks.adaptive.project_signed`);
    ``train_mode=True`` runs the network in training mode (dropout drawn from the global RNG, which is
    restored afterwards; BatchNorm on batch statistics, its running statistics untouched), as their GAT
    and LeNet-5 notebooks do; ``select="best_pass_end"`` takes, instead of the best iterate, the iterate
    ending the pass (of ``n_iters / passes`` steps) with the largest summed loss, as their FCNN notebook does.

    Args:
        model: Any network; ``model(inputs)`` (or ``model(*inputs)``) feeds ``loss_fn``.
        batches: Iterable of ``(inputs, targets)``; one maximization per batch.
        rho: Radius ρ ≥ 0 of the (c-scaled) ball.
        p: 2 or ``float("inf")``.
        adaptive: c = |w| (scale-invariant) instead of c = 1.
        n_iters: Ascent steps per batch (≥ 1).
        method: ``"apgd"`` (the authors' code), ``"apgd_reset"`` or ``"pga"``.
        step_size: Initial (apgd, apgd_reset) or fixed (pga, required) step size.
        loss_fn: ``loss_fn(outputs, targets)``, a mean-reduced scalar.
        reduce: Cross-process sum hook (None on one process).
        score_batches: pga only: score the iterates by the mean loss over these batches (None: each
            ascent batch's own loss).
        box: pga with p = ∞ and adaptive only: ``"abs"`` (|δ| ≤ ρ|w|, the definition) or ``"signed"``.
        train_mode: Measure with the network in training mode (dropout on).
        select: pga only: ``"best_iterate"`` (the largest loss over the iterates) or ``"best_pass_end"``
            (the iterate ending the pass with the largest summed loss).
        passes: The number of passes of equal length ``select="best_pass_end"`` splits the ``n_iters`` steps
            into (a divisor of ``n_iters``; 1 otherwise).

    Returns:
        The mean over all batches of the per-batch sharpness.
    """
    values = _worst_case(
        model,
        batches,
        rho,
        p,
        adaptive,
        n_iters,
        method,
        step_size,
        loss_fn,
        score_batches,
        box,
        train_mode,
        select,
        passes,
    ).values
    return float(mean_of(values.sum(), values.numel(), reduce, "adaptive sharpness"))


class AdaptiveParts(NamedTuple):
    """:func:`adaptive_sharpness` with its two terms and the monotonicity of its ascents (means over batches)."""

    value: float
    """The sharpness A − L (equal to :func:`adaptive_sharpness`'s value)."""
    ascent_loss: float
    """A: the loss (or score) of the selected iterate."""
    clean_loss: float
    """L: the loss (or score) at w."""
    falls: float
    """The fraction of ascent steps that ended below the previous iterate's loss (0 for a monotone ascent)."""


def adaptive_sharpness_parts(
    model: nn.Module,
    batches: Iterable[Any],
    rho: float,
    *,
    n_iters: int = 20,
    reduce: Reduce | None = None,
    **kwargs: Any,
) -> AdaptiveParts:
    """:func:`adaptive_sharpness` (the same arguments) with A, L and the fraction of falling steps; one reduce.

    A − L is the sharpness: A the mean over batches of the selected iterate's loss, L the mean clean loss
    (with ``score_batches``, both are scores on that set). A step *falls* when its iterate's loss is below
    the previous iterate's (δ = 0 before the first step); ``falls`` is their number over ``n_iters`` steps
    and all batches (0 with ρ = 0, where no step is taken).
    """
    ascents = _worst_case_kw(model, batches, rho, n_iters=n_iters, **kwargs)
    rows = torch.stack([ascents.values.sum(), ascents.ascent.sum(), ascents.clean.sum(), ascents.falls.sum() / n_iters])
    value, ascent, clean, falls = mean_of(rows, ascents.values.numel(), reduce, "adaptive sharpness").tolist()
    return AdaptiveParts(value, ascent, clean, falls)


def _worst_case_kw(
    model: nn.Module,
    batches: Iterable[Any],
    rho: float,
    *,
    p: float = math.inf,
    adaptive: bool = True,
    n_iters: int = 20,
    method: Method = "apgd",
    step_size: float | None = None,
    loss_fn: LossFn = F.cross_entropy,
    score_batches: Iterable[Any] | None = None,
    box: Box = "abs",
    train_mode: bool = False,
    select: Select = "best_iterate",
    passes: int = 1,
) -> Ascents:
    return _worst_case(
        model,
        batches,
        rho,
        p,
        adaptive,
        n_iters,
        method,
        step_size,
        loss_fn,
        score_batches,
        box,
        train_mode,
        select,
        passes,
    )


# ---------------------------------------------------------------------------------------- gradient norm
def gradient_norm(
    grads: Sequence[Tensor],
    params: Sequence[Tensor] | None = None,
    *,
    rho: float = 1.0,
    p: float = 2.0,
    adaptive: bool = False,
) -> Tensor:
    """First-order sharpness ρ‖g ⊙ c‖_q of gradients already computed (a 0-dim tensor, no host sync).

    max_{‖δ ⊙ c⁻¹‖_p ≤ ρ} gᵀδ = ρ‖g ⊙ c‖_q with q the Hölder dual of p (1/p + 1/q = 1) and c = |w| if
    ``adaptive`` else 1 (Khalid, Ponraj & Mukherjee use p = 2, c = 1: ρ‖∇L_B(w)‖₂).

    Args:
        grads: Gradient tensors (e.g. ``p.grad`` of the parameters that have one).
        params: The matching parameters (needed when ``adaptive``).
        rho: ρ ≥ 0.
        p: Norm of the perturbation ball, p ≥ 1.
        adaptive: Scale by c = |w|.
    """
    check_float("rho", rho)
    q = dual_exponent(check_p(p))
    grads = [g.detach() for g in grads]
    if not grads:
        return torch.zeros(())
    if adaptive:
        if params is None or len(params) != len(grads):
            raise ValueError("Invalid params: adaptive=True needs the parameters matching grads (same length)")
        grads = torch._foreach_mul(grads, torch._foreach_abs([w.detach() for w in params]))
    norms = torch.stack(
        [
            n.to(torch.float32 if n.dtype in (torch.float16, torch.bfloat16) else n.dtype)
            for n in torch._foreach_norm(grads, q)
        ]
    )
    return rho * torch.linalg.vector_norm(norms, q)


def gradient_norm_sharpness(
    model: nn.Module,
    batches: Iterable[Any],
    rho: float,
    *,
    p: float = 2.0,
    adaptive: bool = False,
    loss_fn: LossFn = F.cross_entropy,
    reduce: Reduce | None = None,
) -> float:
    """Gradient-norm (first-order) sharpness ρ‖∇L_B(w) ⊙ c‖_q, averaged over batches.

    Khalid, Ponraj & Mukherjee, "Study on loss landscape geometry for improving generalization in
    adaptive optimization methods" (Proposition 1, Algorithm 1): the first-order solution of the SAM
    inner problem, max_{‖ε‖_p ≤ ρ} L_B(w + ε) − L_B(w) ≈ ρ‖∇L_B(w)‖_q (q the dual of p; c = |w| when ``adaptive``),
    one value per batch, averaged over batches. During training, :class:`flatminima.callbacks.GradientNormSharpness`
    reads the gradient the training step already computed instead.

    Args:
        model: Any network feeding ``loss_fn``.
        batches: Iterable of ``(inputs, targets)``.
        rho: ρ ≥ 0.
        p: Norm of the perturbation ball (p ≥ 1; 2 in Khalid et al.).
        adaptive: c = |w| instead of 1.
        loss_fn: Mean-reduced loss.
        reduce: Cross-process sum hook (None on one process).
    """
    rho = check_float("rho", rho)
    q = dual_exponent(check_p(p))
    model = unwrap(model)
    with evaluating(model):
        fm = FlatModel(model)
        c = fm.w0.abs() if adaptive else None
        values = []
        for batch in prepared(batches, fm.device, fm.dtype):
            _, g = fm.loss_and_grad(fm.w0, batch, loss_fn)
            values.append(rho * torch.linalg.vector_norm(g if c is None else g * c, q))
        total = torch.stack(values).sum() if values else fm.w0.new_zeros(())
        return float(mean_of(total, len(values), reduce, "gradient-norm sharpness"))


# ---------------------------------------------------------------------------------------- Hessian
def _operator(
    model: nn.Module, batches: Iterable[Any], loss_fn: LossFn, reduce: Reduce | None, cache_graphs: bool
) -> HessianOperator:
    fm = FlatModel(model)
    return HessianOperator(fm, list(prepared(batches, fm.device, fm.dtype)), loss_fn, reduce, cache_graphs)


def hessian_eigenvalues(
    model: nn.Module,
    batches: Iterable[Any],
    k: int = 1,
    *,
    loss_fn: LossFn = F.cross_entropy,
    tol: float = 1e-4,
    max_iter: int = 100,
    seed: int = 0,
    cache_graphs: bool = True,
    reduce: Reduce | None = None,
) -> list[float]:
    """The k largest eigenvalues of the loss Hessian (descending), by Lanczos on exact products.

    H = ∇²_w (mean_B L_B(w)) over all trainable parameters; H v by double backward. Lanczos with full
    reorthogonalization from a seeded Gaussian start; stops when every top-k Ritz pair has residual
    ‖H y − θ y‖ ≤ tol·max|θ| (the eigenvalue error is then at most that), or after ``max_iter``
    products. Memory: (max_iter + 1) vectors of the parameter size.

    Args:
        model: Any network feeding ``loss_fn``.
        batches: Iterable of ``(inputs, targets)``.
        k: Number of eigenvalues (1 ≤ k ≤ number of parameters).
        loss_fn: Mean-reduced loss.
        tol: Relative residual tolerance (> 0).
        max_iter: Maximum number of Hessian-vector products (≥ k).
        seed: Seed of the start vector (the same on every process).
        cache_graphs: Keep each batch's gradient graph between products (faster, more memory).
        reduce: Cross-process sum hook (None on one process).
    """
    check_int("k", k, 1)
    check_float("tol", tol, strict=True)
    check_int("max_iter", max_iter, k)
    model = unwrap(model)
    with evaluating(model):
        return lanczos_top(
            _operator(model, batches, loss_fn, reduce, cache_graphs), k, tol=tol, max_iter=max_iter, seed=seed
        )


def hutchinson_trace(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    n_probes: int = 100,
    loss_fn: LossFn = F.cross_entropy,
    seed: int = 0,
    cache_graphs: bool = True,
    reduce: Reduce | None = None,
) -> TraceEstimate:
    """Hutchinson's estimate of Tr H with its standard error: (1/n) Σ_i v_iᵀ H v_i, v_i Rademacher.

    Hutchinson (1989); Avron & Toledo (2011). Unbiased; variance 2 Σ_{i≠j} H_ij² / n; ``stderr`` is the
    sample standard deviation of the n quadratic forms over √n. Probes come from ``seed``.
    """
    check_int("n_probes", n_probes, 1)
    model = unwrap(model)
    with evaluating(model):
        return hutchinson(_operator(model, batches, loss_fn, reduce, cache_graphs), n_probes, seed=seed)


def hessian_trace(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    n_probes: int = 100,
    loss_fn: LossFn = F.cross_entropy,
    method: Literal["hutchinson", "exact"] = "hutchinson",
    seed: int = 0,
    cache_graphs: bool = True,
    reduce: Reduce | None = None,
) -> float:
    """Trace of the loss Hessian: Hutchinson's estimate, or exact for cross-entropy ReLU chains.

    ``method="hutchinson"``: (1/n) Σ_i v_iᵀ H v_i over ``n_probes`` Rademacher probes on exact
    products (:func:`hutchinson_trace` also returns the standard error). ``method="exact"``: Σ_d T_d + B_d
    of :func:`layer_traces`, the exact trace for the mean cross-entropy of a feed-forward ReLU chain
    (diag H = diag GGN; averaged over examples, equal to the batch-mean definition for equal batch sizes;
    BatchNorm folded); ``loss_fn`` must then be ``F.cross_entropy``.
    """
    check_choice("method", method, ("hutchinson", "exact"))
    if method == "exact":
        if loss_fn is not F.cross_entropy:
            raise ValueError(
                f"Invalid loss_fn: {getattr(loss_fn, '__name__', loss_fn)!r}; method='exact' applies to the mean "
                "cross-entropy (torch.nn.functional.cross_entropy) only; use method='hutchinson'"
            )
        return layer_traces(model, batches, reduce=reduce).total
    return hutchinson_trace(
        model, batches, n_probes=n_probes, loss_fn=loss_fn, seed=seed, cache_graphs=cache_graphs, reduce=reduce
    ).value
