"""AdaBound: Adam whose per-coordinate step is clipped into bounds that converge to SGD's."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from ..validation import check_betas, check_float
from ._base import StepCountedOptimizer


class AdaBound(StepCountedOptimizer):
    """AdaBound (Luo, Xiong, Liu & Sun, ICLR 2019), exactly as the reference code Luolc/AdaBound.

    Paper: https://arxiv.org/abs/1902.09843. At step t with lr α (possibly scheduled) and the lr α₀
    the group started with::

        g  ← g + λ·w                                  (coupled weight decay)
        m  ← β₁·m + (1 − β₁)·g,   v ← β₂·v + (1 − β₂)·g²      (v ← max(v_max, v) with amsbound)
        η̂  = α·√(1 − β₂ᵗ)/(1 − β₁ᵗ) / (√v + ε)
        α* = final_lr · α/α₀
        w  ← w − clip(η̂, α*·(1 − 1/(γt + 1)), α*·(1 + 1/(γt))) ⊙ m

    α₀ is stored in the param group (``base_lr``), so it survives a checkpoint.

    Args:
        params: Parameters or parameter groups.
        lr: Adam-phase learning rate α.
        betas: (β₁, β₂) in [0, 1).
        final_lr: The SGD learning rate the bounds converge to.
        gamma: Convergence speed γ > 0 of the bounds.
        eps: ε added to √v.
        weight_decay: Coupled L2 penalty λ ≥ 0.
        amsbound: Use the running maximum of v (AMSBound).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        final_lr: float = 0.1,
        gamma: float = 1e-3,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsbound: bool = False,
    ) -> None:
        defaults = dict(
            lr=check_float("lr", lr),
            betas=check_betas(betas),
            final_lr=check_float("final_lr", final_lr),
            gamma=check_float("gamma", gamma, strict=True),
            eps=check_float("eps", eps),
            weight_decay=check_float("weight_decay", weight_decay),
            amsbound=amsbound,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            group.setdefault("base_lr", group["lr"])

    def init_state(self, group: dict, p: Tensor, state: dict) -> None:
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["amsbound"]:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def update(self, group: dict, params: list[Tensor], step: int) -> None:
        beta1, beta2 = group["betas"]
        states = [self.state[p] for p in params]
        exp_avg = [s["exp_avg"] for s in states]
        exp_avg_sq = [s["exp_avg_sq"] for s in states]
        grads = [p.grad for p in params]
        if group["weight_decay"] != 0:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        torch._foreach_mul_(exp_avg, beta1)
        torch._foreach_add_(exp_avg, grads, alpha=1 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
        if group["amsbound"]:
            max_sq = [s["max_exp_avg_sq"] for s in states]
            torch._foreach_maximum_(max_sq, exp_avg_sq)
            denom = torch._foreach_sqrt(max_sq)
        else:
            denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_add_(denom, group["eps"])
        step_size = group["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        base_lr = group["base_lr"]
        final_lr = group["final_lr"] * group["lr"] / base_lr if base_lr > 0 else 0.0
        lower = final_lr * (1 - 1 / (group["gamma"] * step + 1))
        upper = final_lr * (1 + 1 / (group["gamma"] * step))
        torch._foreach_reciprocal_(denom)
        torch._foreach_mul_(denom, step_size)  # η̂ = step_size / (√v + ε)
        torch._foreach_clamp_min_(denom, lower)
        torch._foreach_clamp_max_(denom, upper)
        torch._foreach_mul_(denom, exp_avg)
        torch._foreach_sub_(params, denom)
