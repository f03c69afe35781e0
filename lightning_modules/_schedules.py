"""SAM on a subset of steps: schedules around any two-pass rule (every k-th step, at random, AE-SAM's policy).

A schedule decides, step by step, whether its rule takes the step (two passes, the rule's ε and d) or the
base optimizer alone does (one pass, d = g). It wraps any two-pass rule (SAM, ASAM, GSAM, ...): one
schedule per policy, not one class per pairing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._rule import PUBLIC_MODULE, Minimizer, RuleSetup, StepContext, step_uniforms
from .validation import check_float, check_fraction, check_int, invalid, is_integer

__all__ = ["EveryK", "RandomSteps", "AdaptiveSteps"]


class _Schedule(Minimizer):
    """A rule that takes ``rule``'s two-pass step on some steps and the base optimizer's step on the others."""

    plain_two_pass = False

    def __init__(self, rule: Minimizer) -> None:
        if not isinstance(rule, Minimizer):
            raise TypeError(
                f"Invalid rule: {type(rule).__name__}; expected a two-pass rule (SAM, USAM, ASAM, GSAM, AdaptiveGSAM)"
            )
        if not rule.plain_two_pass:
            raise ValueError(
                f"Invalid rule: {rule!r}; a schedule wraps a two-pass rule (SAM, USAM, ASAM, GSAM, "
                f"AdaptiveGSAM), not a rule that changes the step itself"
            )
        self.rule = rule
        self.rho, self.eps = rule.rho, rule.eps
        # the rule's needs, seen by the module through the schedule (instance attributes over the class defaults)
        self.scale_invariant = rule.scale_invariant  # type: ignore[misc]
        self.uses_clean_grad = rule.uses_clean_grad  # type: ignore[misc]
        self.uses_names = rule.uses_names  # type: ignore[misc]

    def current_rho(self, lr=None, lr_max=None):
        return self.rule.current_rho(lr, lr_max)

    def perturbation(self, params, grads, *, names=None, grad_norm=None, lr=None, lr_max=None):
        return self.rule.perturbation(params, grads, names=names, grad_norm=grad_norm, lr=lr, lr_max=lr_max)

    def descent_(self, grads: Sequence[Tensor], perturbed_grads: list[Tensor]) -> list[Tensor]:
        return self.rule.descent_(grads, perturbed_grads)

    def reset(self) -> None:
        self.rule.reset()

    def setup(self, info: RuleSetup) -> None:
        self.rule.setup(info)

    def state_dict(self) -> dict[str, Any]:
        return self.rule.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rule.load_state_dict(state)


class EveryK(_Schedule):
    """SAM on every k-th step: ``rule``'s two-pass step when t ≡ 0 (mod k), the base optimizer's otherwise.

    The "SAM-k" baseline of Liu et al. (2022, the LookSAM paper), which shows it loses much of SAM's gain
    that LookSAM keeps: with t the optimizer step (``global_step``, so a resumed run keeps the pattern)::

        t ≡ 0 (mod k):  d = rule's direction (two passes)      otherwise:  d = g = ∇L_B(w)  (one pass)

    k = 1 is ``rule`` on every step, bit for bit. Cost: 1 + 1/k passes per step. Default k = 5, the k of
    LookSAM's preset, so the two compare at the same cost.

    Args:
        rule: The two-pass rule taken on the chosen steps (SAM, ASAM, GSAM, ...).
        k: The period, ≥ 1.
    """

    __module__ = PUBLIC_MODULE

    def __init__(self, rule: Minimizer, k: int = 5) -> None:
        super().__init__(rule)
        self.k = check_int("k", k, 1)

    def plan(self, ctx: StepContext) -> str:
        return "two" if ctx.step % self.k == 0 else "one"

    def extra_repr(self) -> str:
        return f"rule={self.rule!r}, k={self.k}"


class RandomSteps(_Schedule):
    """SAM on a random subset of the steps: ``rule``'s step with probability p, the base optimizer's otherwise.

    SS-SAM (Zhao, Zhang & Hu, 2022, "SS-SAM: Stochastic Scheduled Sharpness-Aware Minimization for
    Efficiently Training Deep Neural Networks", https://arxiv.org/abs/2203.09962) with a constant
    probability. Step t takes two passes when u_t < p, with u_t drawn from (seed, t) alone
    (:func:`~flatminima.lightning_modules._rule.step_uniforms`): no running RNG, so every DDP rank draws the same u_t and
    a resumed run draws what the uninterrupted one did. Cost: 1 + p passes per step on average.

    Default p = 0.5 (half of SAM's extra cost; SS-SAM's constant schedules range over p ∈ [0.1, 0.9]).

    Args:
        rule: The two-pass rule taken on the chosen steps.
        p: The probability p ∈ [0, 1] of a two-pass step.
        seed: Seed of the draws (an integer).
    """

    __module__ = PUBLIC_MODULE

    def __init__(self, rule: Minimizer, p: float = 0.5, seed: int = 0) -> None:
        super().__init__(rule)
        self.p = check_fraction("p", p, closed=True)
        if not is_integer(seed):
            raise invalid("seed", seed, "an integer")
        self.seed = int(seed)

    def plan(self, ctx: StepContext) -> str:
        return "two" if step_uniforms(self.seed, ctx.step, 1)[0] < self.p else "one"

    def extra_repr(self) -> str:
        return f"rule={self.rule!r}, p={self.p}, seed={self.seed}"


class AdaptiveSteps(_Schedule):
    """AE-SAM's adaptive policy: ``rule``'s step where the squared gradient norm is large for this run.

    Jiang, Yang, Zhang & Kwok (2023), "An Adaptive Policy to Employ Sharpness-Aware Minimization" (ICLR),
    https://arxiv.org/abs/2304.14647. With x_t = ‖∇L_B(w_t)‖² from pass 1 (unscaled)::

        μ_t  = δ·μ_{t−1} + (1 − δ)·x_t,          σ²_t = δ·σ²_{t−1} + (1 − δ)·(x_t − μ_t)²   (μ₋₁ = σ²₋₁ = 0)
        c_t  = c_start + (c_end − c_start)·min(t/T, 1)                                (T: total steps)
        x_t ≥ μ_t + c_t·σ_t:  rule's step (pass 2)         otherwise:  d = g  (one pass)

    A SAM step where the gradient is unusually large for the run so far (a sharp region, the paper argues),
    with a threshold that falls from μ + σ to μ − σ: about 16 % of the steps early, 84 % late, half over
    the run when x_t is roughly normal. Defaults δ = 0.9, c from 1 to −1 (the paper's λ's, with its
    convention that c_t moves from λ₂ = 1 to λ₁ = −1); no public code was found to check them against.

    The decision needs x_t on the host: one host sync per step (besides the module's own). Under DDP
    with the per-replica ascent x_t is the mean over the replicas of their own ‖g‖² (one scalar
    all-reduce), with the global ascent ‖ḡ‖² of the averaged gradient; either way μ, σ² and the decision
    are the same on every rank, and (μ, σ²) are in the checkpoint. A non-finite x_t leaves them as they
    are and takes the one-pass step (which the module then refuses as non-finite).

    Args:
        rule: The two-pass rule taken on the chosen steps.
        delta: δ ∈ [0, 1) of the moving averages.
        c_start: c_t at the first step.
        c_end: c_t at the last step (T).
        total_steps: T; None takes the run's number of optimizer steps (``trainer.estimated_stepping_batches``).
    """

    __module__ = PUBLIC_MODULE

    def __init__(
        self,
        rule: Minimizer,
        delta: float = 0.9,
        c_start: float = 1.0,
        c_end: float = -1.0,
        total_steps: int | None = None,
    ) -> None:
        super().__init__(rule)
        self.delta = check_fraction("delta", delta)
        self.c_start = check_float("c_start", c_start, minimum=-math.inf)
        self.c_end = check_float("c_end", c_end, minimum=-math.inf)
        self.total_steps = check_int("total_steps", total_steps, 1, optional=True)
        self._steps: int | None = self.total_steps
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.mu = 0.0
        self.var = 0.0

    def setup(self, info: RuleSetup) -> None:
        super().setup(info)
        if self.total_steps is None:
            if info.total_steps is None:
                raise ValueError(
                    "Invalid total_steps: None, and the run's number of steps is not known (max_epochs=-1 "
                    "and max_steps=-1); set AdaptiveSteps(total_steps=...)"
                )
            self._steps = int(info.total_steps)

    def plan(self, ctx: StepContext) -> str:
        return "decide"

    def threshold_c(self, step: int) -> float:
        """c_t at optimizer step ``step``."""
        steps = self._steps if self._steps is not None else 1
        return self.c_start + (self.c_end - self.c_start) * min(step / steps, 1.0)

    def second_pass(self, grads: Sequence[Tensor], grad_sq_norm: Tensor, ctx: StepContext) -> bool:
        x = grad_sq_norm.detach().reshape(1).to(torch.float64).clone()
        ctx.reduce_mean([x])
        value = float(x)  # the policy's one host sync
        if not math.isfinite(value):
            return False
        d = self.delta
        self.mu = d * self.mu + (1.0 - d) * value
        self.var = d * self.var + (1.0 - d) * (value - self.mu) ** 2
        return value >= self.mu + self.threshold_c(ctx.step) * math.sqrt(self.var)

    def state_dict(self) -> dict[str, Any]:
        return {"mu": self.mu, "var": self.var, "rule": super().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state.get("rule", {}))
        self.mu, self.var = float(state["mu"]), float(state["var"])

    def extra_repr(self) -> str:
        return (
            f"rule={self.rule!r}, delta={self.delta}, c_start={self.c_start}, c_end={self.c_end}, "
            f"total_steps={self.total_steps}"
        )
