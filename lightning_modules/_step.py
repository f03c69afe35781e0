"""The pure-torch mechanics of the two-pass step (no Lightning): the perturbed weights of pass 2 and their exact
restore, the gradients that pass 2 leaves, the DDP average of a direction, the dropout RNG state.

See docs/design.md, "The two-pass step".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["PerturbedWeights", "FrozenParameters", "grads_or_zeros", "all_reduce_mean", "rng_state", "set_rng_state"]


class PerturbedWeights:
    """Context manager for pass 2: the weights are w + ε inside, and exactly w again after, whatever happens.

    On entry: w is copied into ``backup`` (and the BatchNorm running statistics into ``buffers_backup``),
    then w ← w + ε, and ε is dropped (no reference to it is kept through pass 2). On exit, also when the
    body raises (out of memory, an interrupt, ...): the statistics and then w are copied back, so the
    weights are the exact w (not w + ε − ε) and the statistics those of pass 1 alone::

        with PerturbedWeights(params, eps, backup, bn_buffers, bn_backup):
            loss_p = forward_backward(batch)          # g_p = ∇L(w + ε) lands in .grad

    ``backup`` and ``buffers_backup`` are preallocated tensors shaped like ``params`` and ``buffers``
    (reused from step to step). Every copy is one ``torch._foreach_*`` kernel, no host sync.

    Args:
        params: The parameters w.
        eps: The ascent ε, one tensor per parameter.
        backup: Where w is kept during the body.
        buffers: Running statistics that the body's forward passes update (BatchNorm); may be empty.
        buffers_backup: Where they are kept.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        eps: Sequence[Tensor],
        backup: Sequence[Tensor],
        buffers: Sequence[Tensor] = (),
        buffers_backup: Sequence[Tensor] = (),
    ) -> None:
        self.params = list(params)
        self.backup = list(backup)
        self.buffers = list(buffers)
        self.buffers_backup = list(buffers_backup)
        self._eps: Sequence[Tensor] | None = eps

    def __enter__(self) -> PerturbedWeights:
        if self._eps is None:
            raise RuntimeError("PerturbedWeights is entered once: its ε was applied already")
        with torch.no_grad():
            torch._foreach_copy_(self.backup, self.params)
            torch._foreach_add_(self.params, self._eps)
            self._eps = None
            if self.buffers:
                torch._foreach_copy_(self.buffers_backup, self.buffers)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        with torch.no_grad():
            if self.buffers:
                torch._foreach_copy_(self.buffers, self.buffers_backup)
            torch._foreach_copy_(self.params, self.backup)


class FrozenParameters:
    """Context manager: the parameters flagged True take no gradient inside (``requires_grad`` False), and do after.

    ESAM's pass 1 computes no weight gradient for the tensors it leaves unperturbed. ``frozen=None`` does nothing.
    The flags are restored on exit, also when the body raises.
    """

    def __init__(self, params: Sequence[Tensor], frozen: Sequence[bool] | None) -> None:
        self._frozen = [p for p, f in zip(params, frozen) if f] if frozen is not None else []

    def __enter__(self) -> FrozenParameters:
        for p in self._frozen:
            p.requires_grad_(False)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for p in self._frozen:
            p.requires_grad_(True)


def grads_or_zeros(params: Sequence[Tensor]) -> list[Tensor]:
    """The ``.grad`` tensors of ``params``, a zero gradient set first where there is none.

    After pass 2, a parameter that had a pass-1 gradient but took no part in pass 2 has g_p = 0.
    """
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


def all_reduce_mean(tensors: list[Tensor]) -> None:
    """Average a list of tensors, in place, over the process group with one flat all-reduce."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    torch._foreach_copy_(tensors, [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in tensors]), tensors)])


def rng_state() -> dict[str, Any]:
    """torch's CPU and CUDA generator states (what dropout draws from), as tensors."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generator states that :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
