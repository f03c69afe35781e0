"""LookSAM (Liu et al., 2022): a SAM step every k-th step, its orthogonal component reused in between."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._rule import DEFAULT_EPS, PUBLIC_MODULE, Minimizer, RuleSetup, StepContext, foreach_dot, global_norm, safe_scale
from .validation import check_float, check_int

__all__ = ["LookSAM"]


class LookSAM(Minimizer):
    """LookSAM: a SAM step on every k-th step; the other steps take one pass and reuse SAM's extra direction.

    Liu, Mai, Chen, Hsieh & You (2022), "Towards Efficient and Scalable Sharpness-Aware Minimization"
    (CVPR), https://arxiv.org/abs/2203.02714. With g = ∇L_B(w) the step's clean gradient::

        t ≡ 0 (mod k):  ε = ρ·g/(‖g‖₂ + eps),  g_s = ∇L_B(w + ε),  d = g_s             (two passes)
                        g_v = g_s − (⟨g, g_s⟩/‖g‖²)·g
                            = g_s − ‖g_s‖·cos(g, g_s)·g/‖g‖    (the part of g_s orthogonal to g, kept)
        otherwise:      d = g + α·(‖g‖₂/‖g_v‖₂)·g_v                                      (one pass)

    so a step costs 1 + 1/k passes on average. t is the optimizer step (Lightning's ``global_step``), so the
    first step is a SAM step and a resumed run takes its SAM steps where the uninterrupted one did; g_v is
    kept in the checkpoint. Before any SAM step (the rule swapped in mid-run) d = g. Under DDP with the
    per-replica ascent g_v is formed on each replica from its own g and g_s and then averaged, so every
    replica holds the same g_v; the one-pass steps use the all-reduced g.

    The norms and the inner product run over every parameter with a gradient (one global vector), as in
    the paper's Algorithm 1; the implementation in Becker et al.'s MSAM repository does the same.

    Defaults: k = 5 and α = 0.7, the values of the paper's CIFAR experiments ("LookSAM-5"); ρ = 0.05,
    SAM's CIFAR radius (the SAM steps are SAM's, so a comparison with SAM isolates the reuse).
    (Becker et al.'s repository sets k = 10, α = 0.7; ``pytorch_optimizer.LookSAM`` k = 10, α = 0.7, ρ = 0.1,
    and evaluates both passes on every step.)

    Args:
        rho: Radius ρ ≥ 0 of the SAM steps.
        k: A SAM step every k steps (k = 1: SAM on every step, exactly).
        alpha: Weight α ≥ 0 of the reused component.
        eps: Added to ‖g‖₂ in the ascent.
    """

    __module__ = PUBLIC_MODULE
    uses_clean_grad = True  # the SAM steps need g beside g_s
    plain_two_pass = False

    def __init__(self, rho: float = 0.05, k: int = 5, alpha: float = 0.7, eps: float = DEFAULT_EPS) -> None:
        super().__init__(rho, eps)
        self.k = check_int("k", k, 1)
        self.alpha = check_float("alpha", alpha)
        self.reset()

    def reset(self) -> None:
        self._g_v: list[Tensor] | None = None  # one tensor per optimizer parameter (zero where no gradient)
        self._g_v_norm: Tensor | None = None
        self._positions: tuple[tuple[int, ...], list[int]] = ((), [])

    def plan(self, ctx: StepContext) -> str:
        return "two" if ctx.step % self.k == 0 else "one"

    def perturbation(self, params, grads, *, names=None, grad_norm=None, lr=None, lr_max=None):
        return list(torch._foreach_mul(grads, safe_scale(self.rho, self._grad_norm(grads, grad_norm), self.eps)))

    def after_second_pass(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], perturbed_grads: Sequence[Tensor], ctx: StepContext
    ) -> None:
        """Keep g_v = g_s − (⟨g, g_s⟩/‖g‖²)·g (averaged over the replicas under DDP)."""
        with torch.no_grad():
            g_sq = global_norm(grads) ** 2
            dot = foreach_dot(grads, perturbed_grads)
            c = torch.where(g_sq > 0, dot / torch.where(g_sq > 0, g_sq, torch.ones_like(g_sq)), torch.zeros_like(dot))
            g_v = list(torch._foreach_mul(grads, -c))
            torch._foreach_add_(g_v, perturbed_grads)
            ctx.reduce_mean(g_v)
            full = self._full(ctx.params)
            torch._foreach_zero_(full)
            torch._foreach_copy_([full[i] for i in self._index(params, ctx.params)], g_v)
            self._g_v_norm = global_norm(g_v)

    def one_pass_descent_(self, params: Sequence[Tensor], grads: list[Tensor], ctx: StepContext) -> list[Tensor]:
        """d = g + α·(‖g‖/‖g_v‖)·g_v, in place over g (d = g before the first SAM step)."""
        if self._g_v is None or self._g_v_norm is None:
            return grads
        g_v = [self._g_v[i] for i in self._index(params, ctx.params)]
        scale = safe_scale(self.alpha * global_norm(grads), self._g_v_norm, 0.0)
        scale = torch.where(self._g_v_norm > 0, scale, torch.zeros_like(scale))
        torch._foreach_add_(grads, torch._foreach_mul(g_v, scale))
        return grads

    def _full(self, params: Sequence[Tensor]) -> list[Tensor]:
        if self._g_v is None or len(self._g_v) != len(params):
            self._g_v = [torch.zeros_like(p) for p in params]
        return self._g_v

    def _index(self, subset: Sequence[Tensor], params: Sequence[Tensor]) -> list[int]:
        """Positions of ``subset`` in ``params`` (cached while the subset is the same list of tensors)."""
        key = tuple(map(id, subset))
        if self._positions[0] != key:
            where = {id(p): i for i, p in enumerate(params)}
            self._positions = (key, [where[id(p)] for p in subset])
        return self._positions[1]

    def setup(self, info: RuleSetup) -> None:
        if self._g_v is not None and info.params:
            if len(self._g_v) != len(info.params):
                raise ValueError(
                    f"Invalid LookSAM state: g_v of {len(self._g_v)} tensors for {len(info.params)} "
                    "parameters (a checkpoint of another network)"
                )
            self._g_v = [g.to(p.device, p.dtype) for g, p in zip(self._g_v, info.params)]
            self._g_v_norm = global_norm(self._g_v)

    def state_dict(self) -> dict[str, Any]:
        return {} if self._g_v is None else {"g_v": [g.detach().clone() for g in self._g_v]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        if "g_v" in state:
            self._g_v = [g.clone() for g in state["g_v"]]
            self._g_v_norm = global_norm(self._g_v)

    def extra_repr(self) -> str:
        return f"rho={self.rho}, k={self.k}, alpha={self.alpha}"
