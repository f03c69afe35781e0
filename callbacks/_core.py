"""Plumbing shared by the sharpness measures (torch only, no Lightning).

* the argument checks ``check_int``, ``check_float``, ``check_choice``, ``check_p``: re-exported from
  :mod:`flatminima.lightning_modules.validation`, the project's one validation module (importable without Lightning).
* :func:`evaluating` — the no-trace context every measure runs in: eval mode, fp32 (no autocast),
  autograd on (also inside ``torch.inference_mode``), the global RNG forked, and the ``training``
  flags restored exactly, also on exceptions.
* :class:`FlatModel` — calls a network with its trainable parameters taken from one flat vector
  (a detached copy, through ``torch.func.functional_call``): measures perturb and differentiate that
  vector and never write to the module, so weights, buffers and ``.grad`` stay bit-identical.
* batch helpers (``(inputs, targets)`` pairs, device/dtype moves) and the cross-process ``reduce``
  hook: a callable that returns the elementwise sum of a tensor over all processes (identity on one).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

# The argument checks live in flatminima.lightning_modules.validation (one set of rules for the whole project); re-exported
# for the math modules of this package, which import them from here.
from flatminima.lightning_modules.validation import check_choice, check_float, check_int, check_p  # noqa: F401

Reduce = Callable[[Tensor], Tensor]
"""Sums a tensor elementwise over all processes and returns the sum (same shape, same device)."""

LossFn = Callable[[Any, Any], Tensor]
"""``loss_fn(outputs, targets)`` returning a scalar (mean) loss, like ``F.cross_entropy``."""


def dual_exponent(p: float) -> float:
    """Hölder dual q of p (1/p + 1/q = 1): q = ∞ for p = 1, q = 1 for p = ∞."""
    if p == 1.0:
        return math.inf
    if math.isinf(p):
        return 1.0
    return p / (p - 1.0)


# ---------------------------------------------------------------------------------------- the model
def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel``/``DataParallel`` wrappers (measures never go through DDP)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"Invalid model: {type(model).__name__}; expected a torch.nn.Module")
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def model_device(model: nn.Module) -> torch.device:
    """Device of the first parameter (or buffer); CPU for a module without tensors."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def compute_dtype(model: nn.Module) -> torch.dtype:
    """float64 for a float64 model, else float32 (half and bfloat16 models are measured in fp32)."""
    for t in model.parameters():
        if t.is_floating_point():
            return torch.float64 if t.dtype == torch.float64 else torch.float32
    return torch.float32


@contextlib.contextmanager
def _no_autocast(device: torch.device) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for device_type in {"cpu", device.type}:
            if torch.amp.is_autocast_available(device_type):
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        yield


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Run a measure on ``model`` without leaving a trace.

    Sets every submodule's ``training`` flag to False (the flag only: overridden ``train()`` methods
    are not called), disables autocast, enables autograd (also under ``torch.inference_mode``), forks
    the global RNG, and restores the flags exactly on exit, also on exceptions.
    """
    modules = list(model.modules())
    flags = [m.training for m in modules]
    device = model_device(model)
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            for m in modules:
                m.training = False
            with torch.inference_mode(False), torch.enable_grad(), _no_autocast(device):
                yield
    finally:
        for m, flag in zip(modules, flags):
            m.training = flag


class FlatModel:
    """A network called with its trainable parameters taken from one flat vector.

    ``w0`` is a detached copy of the trainable parameters (``requires_grad=True`` ones, in
    ``named_parameters`` order) in the compute dtype; ``self(flat, inputs)`` runs the network through
    ``torch.func.functional_call`` with ``flat`` in their place. Frozen parameters and floating
    buffers are passed converted when the model is not in the compute dtype. The module itself is
    never written to, so its weights, buffers and ``.grad`` stay exactly as they were.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.dtype = compute_dtype(model)
        self.device = model_device(model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(f"Invalid model: {type(model).__name__} has no trainable parameters (requires_grad=True)")
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        with torch.no_grad():
            self.w0 = torch.cat([p.detach().reshape(-1).to(self.dtype) for _, p in named])
        self.extra: dict[str, Tensor] = {}
        for n, t in model.named_parameters():
            if not t.requires_grad and t.is_floating_point() and t.dtype != self.dtype:
                self.extra[n] = t.detach().to(self.dtype)
        for n, t in model.named_buffers():
            if t.is_floating_point() and t.dtype != self.dtype:
                self.extra[n] = t.detach().to(self.dtype)

    @property
    def numel(self) -> int:
        """Number of trainable scalars."""
        return self.w0.numel()

    def params(self, flat: Tensor) -> dict[str, Tensor]:
        """The named parameter views of a flat vector."""
        return {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.numels), self.shapes)}

    def __call__(self, flat: Tensor, inputs: Any) -> Any:
        args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        return functional_call(self.model, {**self.params(flat), **self.extra}, args)

    def loss(self, flat: Tensor, batch: tuple[Any, Any], loss_fn: LossFn) -> Tensor:
        """``loss_fn(network(inputs), targets)`` at parameters ``flat``; refuses non-scalar losses."""
        inputs, targets = batch
        loss = loss_fn(self(flat, inputs), targets)
        if not isinstance(loss, Tensor) or loss.ndim != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"Invalid loss_fn: it returned {shape}; expected a scalar (mean-reduced) loss tensor")
        return loss

    def loss_and_grad(self, flat: Tensor, batch: tuple[Any, Any], loss_fn: LossFn) -> tuple[Tensor, Tensor]:
        """Loss and its gradient with respect to the flat parameters (exact, one backward)."""
        leaf = flat.detach().requires_grad_(True)
        loss = self.loss(leaf, batch, loss_fn)
        (grad,) = torch.autograd.grad(loss, leaf)
        return loss.detach(), grad


# ---------------------------------------------------------------------------------------- batches
def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` from a batch: a pair, or a bare tensor of inputs (targets None)."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        f"Invalid batch: {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        + "; expected an (inputs, targets) pair (use batch_to_inputs to convert other batches)"
    )


def to_device(obj: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move tensors (nested in tuples/lists/dicts) to ``device``; floating ones also to ``dtype``.

    Inference tensors (made under ``torch.inference_mode``) are cloned so autograd can use them.
    Other objects with a ``.to`` method (PyG ``Data``) are moved to the device only.
    """
    if isinstance(obj, Tensor):
        out = obj.to(device=device, dtype=dtype) if obj.is_floating_point() else obj.to(device=device)
        return out.clone() if out.is_inference() else out
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(to_device(o, device, dtype) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device, dtype) for k, v in obj.items()}
    if hasattr(obj, "to") and callable(obj.to):
        return obj.to(device)
    return obj


def prepared(batches: Iterable[Any], device: torch.device, dtype: torch.dtype) -> Iterator[tuple[Any, Any]]:
    """Each batch as an ``(inputs, targets)`` pair on ``device`` (floating tensors in ``dtype``)."""
    if isinstance(batches, Tensor):
        raise TypeError(
            "Invalid batches: got a tensor; expected an iterable of (inputs, targets) batches "
            "(wrap one batch in a list: [(x, y)])"
        )
    for batch in batches:
        inputs, targets = split_batch(batch)
        yield to_device(inputs, device, dtype), to_device(targets, device, dtype)


def all_sum(t: Tensor, reduce: Reduce | None) -> Tensor:
    """The sum of ``t`` over processes (``t`` itself without a ``reduce`` hook)."""
    if reduce is None:
        return t
    out = reduce(t)
    if not isinstance(out, Tensor) or out.shape != t.shape:
        raise TypeError(
            "Invalid reduce: it must return a tensor of the same shape (the elementwise sum over processes)"
        )
    return out


def mean_of(values: Tensor, count: int, reduce: Reduce | None, what: str) -> Tensor:
    """Sum ``values`` (float64, any shape) and ``count`` over processes and return their ratio."""
    packed = torch.cat([values.reshape(-1).to(torch.float64), values.new_tensor([float(count)], dtype=torch.float64)])
    packed = all_sum(packed, reduce)
    total = float(packed[-1])
    if total == 0:
        raise ValueError(f"Invalid batches: no batch to measure {what} on (the iterable is empty)")
    return (packed[:-1] / total).reshape(values.shape)
