"""What AdaBound and AdaShift share: argument checks and a step over parameters grouped by step count."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer


def check_non_negative(name: str, value: float) -> None:
    """Refuse a negative or non-finite value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"Invalid {name}: {value!r}; expected a finite {name} >= 0")


def check_betas(betas: Sequence[float]) -> None:
    """Refuse betas that are not two numbers in [0, 1)."""
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"Invalid betas: {tuple(betas)!r}; expected two numbers in [0, 1)")


class StepCountedOptimizer(Optimizer):
    """An optimizer whose per-parameter state holds a step count ``t``; updates are multi-tensor.

    ``step`` initialises the state of new parameters (:meth:`init_state`), counts the step, and calls
    :meth:`update` once per group and step count (all parameters share it unless some lacked a
    gradient earlier) with the list of parameters that have a gradient.
    """

    def init_state(self, group: dict, p: Tensor, state: dict) -> None:
        """Fill the empty state of parameter ``p`` (``state["step"]`` is set by the caller)."""
        raise NotImplementedError

    def update(self, group: dict, params: list[Tensor], step: int) -> None:
        """Apply step number ``step`` (1-based) to ``params`` of ``group``."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step (one multi-tensor update per group and step count)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_step: dict[int, list[Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    self.init_state(group, p, state)
                state["step"] += 1
                by_step.setdefault(state["step"], []).append(p)
            for step, params in by_step.items():
                self.update(group, params, step)
        return loss
