"""The SAM-family update rules and their cheaper variants, as pure torch (no Lightning import).

A two-pass rule answers the two questions of the two-pass step (docs/design.md, "The two-pass step"); the
mechanics (the two forward-backward passes, the exact restore of the weights, BatchNorm protection,
DDP, AMP, the one ``optimizer.step()``) live once in :class:`flatminima.lightning_modules.TwoPassModule`::

    pass 1: g   = ∇L_B(w)
            ε   = rule.perturbation(w, g)        where to climb
    pass 2: g_p = ∇L_B(w + ε)
            d   = rule.descent_(g, g_p)          how to combine the two gradients
            w  ← w (exact copy), then base_optimizer.step() with gradient d

``‖·‖`` is one global L2 norm over every parameter that has a gradient, and ``eps`` (1e-12) is added
outside the norm. A zero gradient gives ε = 0; so does a gradient whose norm is not finite, in every
entry that is itself finite (a NaN or inf entry cannot be zeroed without a host sync; the module
then skips or reports the step and restores the weights exactly, so no NaN reaches the weights).

Every operation on the parameter lists is a ``torch._foreach_*`` kernel: no per-parameter Python
arithmetic and no ``.item()`` host synchronisation.

The variants that take one pass on some or all steps (``LookSAM``, ``EveryK``, ``RandomSteps``,
``AdaptiveSteps``, ``MomentumSAM``, ``ESAM``, ``SAF``, ``MESA``) answer the further questions of
:class:`Minimizer` (run pass 2 or not, where to take the one gradient, how to form d, an extra loss); they
are defined in private modules beside this one and imported from here.

Use a rule directly (pure torch)::

    g = [p.grad for p in params]
    eps = SAM(rho=0.05).perturbation(params, g)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from ._rule import DEFAULT_EPS, Minimizer, RuleSetup, StepContext, foreach_dot, global_norm
from ._rule import safe_scale as _safe_scale
from .validation import check_choice, check_float, check_fraction, check_p, invalid

__all__ = [
    "Minimizer",
    "SAM",
    "USAM",
    "ASAM",
    "GSAM",
    "AdaptiveGSAM",
    "LookSAM",
    "EveryK",
    "RandomSteps",
    "AdaptiveSteps",
    "MomentumSAM",
    "ESAM",
    "SAF",
    "MESA",
    "StepContext",
    "RuleSetup",
    "global_norm",
    "foreach_dot",
]


class SAM(Minimizer):
    """Sharpness-Aware Minimization on the L2 or the L∞ ball (Foret et al., 2021).

    Paper: https://arxiv.org/abs/2010.01412. The first-order solution of max_{‖ε‖_p ≤ ρ} L(w + ε)::

        p = 2:  ε = ρ · g / (‖g‖₂ + eps)
        p = ∞:  ε = ρ · sign(g)                 (the L∞ ball studied by Wong, Yao & Huang)

    and d = g_p = ∇L(w + ε).

    Args:
        rho: Radius ρ ≥ 0 (0.05 in the paper).
        p: The ball's norm: 2 or ``inf`` (YAML ``.inf`` or ``inf``).
        eps: Added to ‖g‖₂ (p = 2).
    """

    def __init__(self, rho: float = 0.05, p: float = 2.0, eps: float = DEFAULT_EPS) -> None:
        super().__init__(rho, eps)
        self.p = check_p(p, allowed=(2.0, math.inf))

    def perturbation(self, params, grads, *, names=None, grad_norm=None, lr=None, lr_max=None):
        if self.p == math.inf:
            eps = list(torch._foreach_sign(grads))
            torch._foreach_mul_(eps, self.rho)
            return eps
        return list(torch._foreach_mul(grads, _safe_scale(self.rho, self._grad_norm(grads, grad_norm), self.eps)))

    def extra_repr(self) -> str:
        return f"rho={self.rho}, p={self.p}"


class USAM(Minimizer):
    """Unnormalized SAM: ε = ρ · g (Dai, Ahn & Sra, 2023; compared with SAM by Wong, Yao & Huang).

    Paper: https://arxiv.org/abs/2305.15287. Not scale-invariant: under fp16 loss scaling the module
    divides ε by the loss scale. A gradient whose norm is not finite gives ε = 0 (finite entries).

    Args:
        rho: Step ρ ≥ 0 of the ascent.
    """

    scale_invariant = False

    def __init__(self, rho: float = 0.05) -> None:
        super().__init__(rho)

    def perturbation(self, params, grads, *, names=None, grad_norm=None, lr=None, lr_max=None):
        norm = self._grad_norm(grads, grad_norm)
        rho = torch.where(torch.isfinite(norm), torch.full_like(norm, self.rho), torch.zeros_like(norm))
        return list(torch._foreach_mul(grads, rho))


class ASAM(Minimizer):
    """Adaptive SAM: the ball is measured in the normalised weights T⁻¹w (Kwon et al., 2021).

    Paper: https://arxiv.org/abs/2102.11600. With T = diag(|w| + η)::

        ε = ρ · T² g / (‖T g‖₂ + eps),   d = g_p

    ``scope="weight"`` (the official code, SamsungLabs/ASAM): T = |w| + η on parameters whose name
    contains ``"weight"``, T = 1 on the others (biases). ``scope="all"`` applies T to every
    parameter; with ``eta=0`` that is the davda54/sam ``adaptive=True`` convention.

    Args:
        rho: Radius ρ ≥ 0 (0.5 in the paper for CIFAR, 2.0 in Wong, Yao & Huang).
        eta: η ≥ 0 added to |w| (0.01 in the paper).
        scope: ``"weight"`` (official) or ``"all"`` (davda54).
        eps: Added to ‖T g‖₂.
    """

    uses_names = True

    def __init__(
        self, rho: float = 0.5, eta: float = 0.01, scope: Literal["weight", "all"] = "weight", eps: float = DEFAULT_EPS
    ) -> None:
        super().__init__(rho, eps)
        self.eta = check_float("eta", eta)
        self.scope = check_choice("scope", scope, ("weight", "all"))

    def perturbation(self, params, grads, *, names=None, grad_norm=None, lr=None, lr_max=None):
        if self.scope == "all":
            adapt = [True] * len(params)
        else:
            if names is None:
                raise ValueError("ASAM(scope='weight') needs the parameter names: pass names=[...]")
            adapt = ["weight" in n for n in names]
        idx_w = [i for i, a in enumerate(adapt) if a]
        idx_o = [i for i, a in enumerate(adapt) if not a]
        t = list(torch._foreach_abs([params[i] for i in idx_w])) if idx_w else []
        if t:
            torch._foreach_add_(t, self.eta)
        tg = list(torch._foreach_mul(t, [grads[i] for i in idx_w])) if t else []  # T g on adapted parameters
        g_o = [grads[i] for i in idx_o]  # T = 1 elsewhere
        scale = _safe_scale(self.rho, global_norm(tg + g_o), self.eps)
        if tg:
            torch._foreach_mul_(tg, t)  # T² g
            torch._foreach_mul_(tg, scale)
        eps_o = list(torch._foreach_mul(g_o, scale)) if g_o else []
        if not idx_o:
            return tg
        out: list[Tensor] = [None] * len(params)  # type: ignore[list-item]
        for i, e in zip(idx_w, tg):
            out[i] = e
        for i, e in zip(idx_o, eps_o):
            out[i] = e
        return out

    def extra_repr(self) -> str:
        return f"rho={self.rho}, eta={self.eta}, scope={self.scope!r}"


class GSAM(SAM):
    """Surrogate-Gap-guided SAM (Zhuang et al., 2022): SAM's ascent, and a descent that also lowers the gap.

    Paper: https://arxiv.org/abs/2203.08065. With the SAM (p = 2) ascent::

        g⊥ = g − (⟨g, g_p⟩ / ‖g_p‖²) · g_p        (the part of g orthogonal to g_p)
        d  = g_p − α · g⊥

    The radius may follow the learning rate (the paper's schedule, set ``rho_min``)::

        ρ_t = ρ_min + (ρ − ρ_min) · (clamp(lr_t, lr_min, lr_max) − lr_min) / (lr_max − lr_min)

    from the lr of the step being taken, so ρ_min ≤ ρ_t ≤ ρ under every schedule. ``lr_max`` is the
    peak of the schedule: given here, or else passed by the caller (:class:`~flatminima.lightning_modules.TwoPassModule`
    passes the first param group's peak: ``max_lr`` of OneCycleLR and CyclicLR, the initial lr for
    other schedulers). An lr outside [lr_min, lr_max] (a warmup that starts below ``lr_min``, a
    LambdaLR whose factor exceeds 1, ...) is clamped, with one warning per rule. With per-group
    learning rates the first param group drives ρ_t.

    Args:
        rho: Radius ρ (ρ_max when ``rho_min`` is set) ≥ 0.
        alpha: Weight α ∈ [0, 1] of the surrogate-gap direction.
        rho_min: ρ at ``lr_min``; None keeps ρ constant.
        lr_max: The lr at which the radius is ``rho`` (default: the schedule's peak, see above).
        lr_min: The lr at which the radius is ``rho_min``.
        eps: Added to ‖g‖₂.
    """

    uses_clean_grad = True

    def __init__(
        self,
        rho: float = 0.05,
        alpha: float = 0.1,
        rho_min: float | None = None,
        lr_max: float | None = None,
        lr_min: float = 0.0,
        eps: float = DEFAULT_EPS,
    ) -> None:
        super().__init__(rho=rho, p=2.0, eps=eps)
        alpha = check_fraction("alpha", alpha, closed=True)
        rho_min = check_float("rho_min", rho_min, optional=True)
        if rho_min is not None and rho_min > self.rho:
            raise invalid("rho_min", rho_min, f"0 <= rho_min <= rho = {self.rho}")
        lr_min = check_float("lr_min", lr_min)
        lr_max = check_float("lr_max", lr_max, optional=True)
        if lr_max is not None and lr_max <= lr_min:
            raise invalid("lr_max", lr_max, f"a finite lr_max > lr_min = {lr_min}")
        self.alpha = alpha
        self.rho_min = rho_min
        self.lr_max = lr_max
        self.lr_min = lr_min
        self._warned = False

    def current_rho(self, lr: float | None = None, lr_max: float | None = None) -> float:
        """ρ_t at learning rate ``lr`` (Python floats, no host sync), clamped to [rho_min, rho]."""
        if self.rho_min is None or lr is None:
            return self.rho
        top = self.lr_max if self.lr_max is not None else lr_max
        if top is None or top <= self.lr_min:
            self._warn_once(
                f"GSAM cannot follow the lr: lr_max={top!r} is not above lr_min={self.lr_min}; "
                f"using rho={self.rho} (set GSAM(lr_max=...))"
            )
            return self.rho
        lr = float(lr)
        if not self.lr_min <= lr <= top:
            self._warn_once(
                f"GSAM: lr {lr:.6g} is outside [lr_min, lr_max] = [{self.lr_min:.6g}, {top:.6g}]; "
                f"rho_t is clamped to [rho_min, rho] = [{self.rho_min}, {self.rho}] (set "
                "GSAM(lr_min=..., lr_max=...) to the schedule's range)"
            )
            lr = min(max(lr, self.lr_min), top)
        return self.rho_min + (self.rho - self.rho_min) * (lr - self.lr_min) / (top - self.lr_min)

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(message, UserWarning, stacklevel=3)

    def perturbation(self, params, grads, *, names=None, grad_norm=None, lr=None, lr_max=None):
        rho = self.current_rho(lr, lr_max)
        return list(torch._foreach_mul(grads, _safe_scale(rho, self._grad_norm(grads, grad_norm), self.eps)))

    def descent_(self, grads: Sequence[Tensor], perturbed_grads: list[Tensor]) -> list[Tensor]:
        """d = g_p − α·g⊥ = (1 + α·c)·g_p − α·g with c = ⟨g, g_p⟩/‖g_p‖² (c = 0 when g_p = 0), in place."""
        if self.alpha == 0.0 or len(grads) == 0:
            return perturbed_grads
        gp_sq = global_norm(perturbed_grads) ** 2
        dot = foreach_dot(grads, perturbed_grads)
        c = torch.where(gp_sq > 0, dot / torch.where(gp_sq > 0, gp_sq, torch.ones_like(gp_sq)), torch.zeros_like(dot))
        torch._foreach_mul_(perturbed_grads, 1.0 + self.alpha * c)
        torch._foreach_add_(perturbed_grads, grads, alpha=-self.alpha)
        return perturbed_grads

    def extra_repr(self) -> str:
        sched = "" if self.rho_min is None else f", rho_min={self.rho_min}, lr_max={self.lr_max}, lr_min={self.lr_min}"
        return f"rho={self.rho}, alpha={self.alpha}{sched}"


class AdaptiveGSAM(GSAM):
    """Adaptive-GSAM: GSAM with an ascent scaled elementwise by |w| + γ.

    "Improving Sharpness-Aware Minimisation" (Oxford report, 2024), section 5.1. The report's step 2
    of the GSAM algorithm becomes::

        ε = ρ_t · (|w| + γ) ⊙ g / (‖g‖₂ + eps)

    (normalised by ‖g‖₂, exactly as the report writes it) and the descent is GSAM's,
    d = g_p − α·g⊥. ρ_t follows the lr as in :class:`GSAM` when ``rho_min`` is set.

    Args:
        rho: Radius ρ ≥ 0.
        alpha: Weight α ∈ [0, 1] of the surrogate-gap direction.
        gamma: γ ≥ 0 keeping ε away from 0 where w = 0.
        rho_min: See :class:`GSAM`.
        lr_max: See :class:`GSAM`.
        lr_min: See :class:`GSAM`.
        eps: Added to ‖g‖₂.
    """

    def __init__(
        self,
        rho: float = 0.05,
        alpha: float = 0.1,
        gamma: float = 0.01,
        rho_min: float | None = None,
        lr_max: float | None = None,
        lr_min: float = 0.0,
        eps: float = DEFAULT_EPS,
    ) -> None:
        super().__init__(rho=rho, alpha=alpha, rho_min=rho_min, lr_max=lr_max, lr_min=lr_min, eps=eps)
        self.gamma = check_float("gamma", gamma)

    def perturbation(self, params, grads, *, names=None, grad_norm=None, lr=None, lr_max=None):
        rho = self.current_rho(lr, lr_max)
        scale = _safe_scale(rho, self._grad_norm(grads, grad_norm), self.eps)
        eps = list(torch._foreach_abs(params))
        torch._foreach_add_(eps, self.gamma)
        torch._foreach_mul_(eps, grads)
        torch._foreach_mul_(eps, scale)
        return eps

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gamma={self.gamma}"


# The variants that change the step itself, each in its own module, public here (and named so in configs).
from ._esam import ESAM  # noqa: E402
from ._looksam import LookSAM  # noqa: E402
from ._msam import MomentumSAM  # noqa: E402
from ._saf import MESA, SAF  # noqa: E402
from ._schedules import AdaptiveSteps, EveryK, RandomSteps  # noqa: E402
