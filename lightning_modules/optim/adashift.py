"""AdaShift: Adam with the second moment taken from a gradient n steps old (temporal decorrelation)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import Tensor

from ..validation import check_betas, check_choice, check_float, check_int
from ._base import StepCountedOptimizer


class AdaShift(StepCountedOptimizer):
    """AdaShift (Zhou, Zhang, Lu, Wang, Zhang & Yu, ICLR 2019), the paper's windowed algorithm.

    Paper: https://arxiv.org/abs/1810.00143 (Algorithm 3). With a window of the last n = ``keep_num``
    gradients, W = Σᵢ₌₀ⁿ⁻¹ β₁ⁱ and φ = max over the tensor (``reduce="max"``)::

        t ≤ n:  no update (the window fills)
        t > n:  m_t = Σᵢ₌₀ⁿ⁻¹ β₁ⁱ g_{t−i} / W
                v_t = β₂·v_{t−1} + (1 − β₂)·φ(g²_{t−n})          (the gradient leaving the window)
                w  ← w − lr · m_t / (√(v_t / (1 − β₂^{t−n})) + ε)

    m_t is kept by the exact recurrence m_t = β₁·(m_{t−1} − β₁ⁿ⁻¹ g_{t−n}/W) + g_t/W. The window
    is a ring buffer tensor in the optimizer state, so it survives a checkpoint (also with
    ``torch.load(weights_only=True)``).

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate.
        betas: (β₁, β₂) in [0, 1).
        keep_num: Window length n ≥ 1.
        eps: ε added to the denominator.
        reduce: φ: ``"max"`` (over the whole tensor, the paper's default) or ``"none"`` (elementwise).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        keep_num: int = 10,
        eps: float = 1e-10,
        reduce: Literal["max", "none"] = "max",
    ) -> None:
        defaults = dict(
            lr=check_float("lr", lr),
            betas=check_betas(betas),
            keep_num=check_int("keep_num", keep_num, 1),
            eps=check_float("eps", eps),
            reduce=check_choice("reduce", reduce, ("max", "none")),
        )
        super().__init__(params, defaults)

    def init_state(self, group: dict, p: Tensor, state: dict) -> None:
        state["window"] = torch.zeros((group["keep_num"], *p.shape), dtype=p.dtype, device=p.device)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        shape = () if group["reduce"] == "max" else p.shape
        state["exp_avg_sq"] = torch.zeros(shape, dtype=p.dtype, device=p.device)

    def update(self, group: dict, params: list[Tensor], t: int) -> None:
        n = group["keep_num"]
        beta1, beta2 = group["betas"]
        weight_sum = sum(beta1**i for i in range(n))
        first_w = beta1 ** (n - 1) / weight_sum
        last_w = 1.0 / weight_sum
        states = [self.state[p] for p in params]
        grads = [p.grad for p in params]
        exp_avg = [s["exp_avg"] for s in states]
        slot = [s["window"][(t - 1) % n] for s in states]  # holds g_{t−n} once the window is full
        if t > n:
            torch._foreach_add_(exp_avg, slot, alpha=-first_w)
        torch._foreach_mul_(exp_avg, beta1)
        torch._foreach_add_(exp_avg, grads, alpha=last_w)
        if t > n:
            sq = torch._foreach_mul(slot, slot)
            reduced = list(torch._foreach_max(sq)) if group["reduce"] == "max" else sq
            exp_avg_sq = [s["exp_avg_sq"] for s in states]
            torch._foreach_mul_(exp_avg_sq, beta2)
            torch._foreach_add_(exp_avg_sq, reduced, alpha=1 - beta2)
            denom = torch._foreach_div(exp_avg_sq, 1 - beta2 ** (t - n))
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, group["eps"])
            update = torch._foreach_div(exp_avg, denom)
            torch._foreach_add_(params, update, alpha=-group["lr"])
        torch._foreach_copy_(slot, grads)
