"""What AdaBound and AdaShift share: a step over parameters grouped by step count."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim import Optimizer


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
