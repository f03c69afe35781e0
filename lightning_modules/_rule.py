"""The rule interface of the training step (pure torch, no Lightning): the base class and its helpers.

A rule (:class:`Minimizer`) answers the questions :class:`flatminima.lightning_modules.TwoPassModule` asks it at each
step (docs/design.md, "The two-pass step" and "Update rules"). The two-pass rules of the SAM family
(``minimizers.py``) answer only the first two; the cheaper variants (LookSAM, the schedules, Momentum-SAM,
ESAM, SAF, MESA) answer the others, whose defaults give the two-pass step::

    plan(ctx)                       "two" passes, "one" pass, or "decide" after pass 1 (second_pass)
    perturbation(w, g)              where to climb (ε), from the pass-1 gradient g
    descent_(g, g_p)                how to combine the two gradients into d (in place over g_p)
    second_pass(g, ‖g‖², ctx)       with plan "decide": take pass 2 after all?
    evaluation_offset(w, ctx)       a one-pass step's gradient is taken at w + this (Momentum-SAM)
    one_pass_descent_(w, g, ctx)    a one-pass step's d from its one gradient (LookSAM's reuse)
    after_second_pass(w, g, g_p)    state from a two-pass step (LookSAM's g_v)
    extra_loss(outputs, ...)        a term added to the loss of a one-pass step (SAF, MESA)
    frozen_in_pass_one(w, ctx)      parameters without a pass-1 gradient (ESAM's weight perturbation)
    select(l(w), l(w + ε))          the samples pass 2 runs on (ESAM's data selection)
    after_step(w, ctx)              after ``optimizer.step()`` (MESA's moving average)
    setup / reset / state_dict      bound to a run; the state a checkpoint keeps (exact resume)

Every operation on parameter lists is a ``torch._foreach_*`` kernel; the step's decisions that need a value
on the host (AE-SAM's threshold) say so.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from .validation import check_float

__all__ = [
    "DEFAULT_EPS",
    "Plan",
    "StepContext",
    "RuleSetup",
    "Minimizer",
    "global_norm",
    "foreach_dot",
    "step_uniforms",
]

DEFAULT_EPS = 1e-12

#: What a step does: two passes, one pass, or pass 1 and then :meth:`Minimizer.second_pass` decides.
Plan = Literal["two", "one", "decide"]

PUBLIC_MODULE = "flatminima.lightning_modules.minimizers"  # where every rule is imported from (and configs name it)


def _norm_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    return torch.promote_types(tensors[0].dtype, torch.float32)


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """One L2 norm over a list of tensors, as a 0-dim tensor (float32 or wider), without host sync."""
    if len(tensors) == 0:
        return torch.zeros(())
    dtype = _norm_dtype(tensors)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors, 2, dtype=dtype)))


def foreach_dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Inner product ⟨a, b⟩ summed over two lists of tensors, as a 0-dim tensor, without host sync.

    ``Σ x = 2·Σ max(x, 0) − Σ |x|`` over the products ``x = a ⊙ b``: four multi-tensor kernels and
    the rounding error of an ordinary sum (``eps·Σ|aᵢbᵢ|``), unlike the polarisation identity.
    """
    if len(a) == 0:
        return torch.zeros(())
    dtype = _norm_dtype(a)
    prods = torch._foreach_mul(a, b)
    abs_sum = torch.stack(torch._foreach_norm(prods, 1, dtype=dtype)).sum()
    torch._foreach_clamp_min_(prods, 0.0)
    pos_sum = torch.stack(torch._foreach_norm(prods, 1, dtype=dtype)).sum()
    return 2.0 * pos_sum - abs_sum


def safe_scale(numerator: float | Tensor, norm: Tensor, eps: float) -> Tensor:
    """``numerator / (norm + eps)``, or 0 where the norm is not finite."""
    scale = torch.as_tensor(numerator, dtype=norm.dtype, device=norm.device) / (norm + eps)
    return torch.where(torch.isfinite(norm), scale, torch.zeros_like(scale))


def step_uniforms(seed: int, step: int, n: int) -> list[float]:
    """``n`` uniform numbers in [0, 1) drawn from (seed, step) alone: no running RNG, the same on every rank.

    Python's Mersenne Twister seeded with the string ``"<seed>/<step>"`` (hashed with SHA-512, stable across
    platforms and Python versions), so a resumed run draws what the uninterrupted one drew at that step.
    """
    rng = random.Random(f"{seed}/{step}")
    return [rng.random() for _ in range(n)]


def _no_reduce(tensors: list[Tensor]) -> None:
    """One process: nothing to average."""


def _no_gather(tensor: Tensor) -> Tensor:
    """One process: the tensor is already everything."""
    return tensor


@dataclass
class StepContext:
    """What the module tells a rule about the step it takes (plain data; built once per step).

    Attributes:
        step: Optimizer steps taken before this one (Lightning's ``global_step``).
        epoch: The current epoch (0-based).
        total_steps: The optimizer steps of the whole run, where known.
        lr: The learning rate of this step (first param group).
        lr_max: The schedule's peak learning rate (first param group).
        optimizer: The base optimizer (its state holds the momentum Momentum-SAM reads).
        params: Every parameter of the optimizer, in its order.
        reduce_mean: Averages a list of tensors, in place, over the processes whose gradients differ (DDP
            with the per-replica ascent); does nothing otherwise.
        gather: Concatenates a tensor's rows from every process (along dim 0); the tensor itself on one.
    """

    step: int = 0
    epoch: int = 0
    total_steps: int | None = None
    lr: float | None = None
    lr_max: float | None = None
    optimizer: torch.optim.Optimizer | None = None
    params: Sequence[Tensor] = ()
    reduce_mean: Callable[[list[Tensor]], None] = _no_reduce
    gather: Callable[[Tensor], Tensor] = _no_gather


@dataclass
class RuleSetup:
    """What the module tells a rule when a run starts (:meth:`Minimizer.setup`), so it can refuse early.

    Attributes:
        net: The network being trained (MESA copies it).
        optimizer: The base optimizer (Momentum-SAM checks it has a momentum buffer).
        params: Every parameter of the optimizer, in its order.
        dataset_size: The number of training samples, where the loader knows it (SAF's store).
        total_steps: The optimizer steps of the whole run, where known (AE-SAM's threshold schedule).
        task: The task's class name, for messages.
        sample_losses: Whether the task provides per-sample losses and can select samples of a batch.
        softmax_outputs: Whether the task's outputs are class logits (one per class, softmax).
        ascent: The module's ``ascent`` (``"replica"`` or ``"global"``).
        world_size: The number of processes.
    """

    net: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    params: Sequence[Tensor] = ()
    dataset_size: int | None = None
    total_steps: int | None = None
    task: str = ""
    sample_losses: bool = False
    softmax_outputs: bool = False
    ascent: str = "replica"
    world_size: int = 1


class Minimizer:
    """Base class of a rule: the step's decisions (module docstring); the defaults give the two-pass step.

    Subclasses implement :meth:`perturbation`; rules whose descent uses the clean gradient (GSAM)
    set ``uses_clean_grad = True`` and override :meth:`descent_`. The variants override the other hooks.

    Args:
        rho: Radius ρ ≥ 0 of the neighbourhood.
        eps: Added outside the norm in the normalisation, > 0.
    """

    #: ε is unchanged when every gradient is multiplied by one constant (AMP loss scaling).
    scale_invariant: ClassVar[bool] = True
    #: ``descent_`` needs the clean pass-1 gradient g (else d = g_p and the module may let DDP average g_p).
    uses_clean_grad: ClassVar[bool] = False
    #: ``perturbation`` needs the parameter names (``names=``).
    uses_names: ClassVar[bool] = False
    #: The classic two-pass step on every batch: a schedule (EveryK, ...) may wrap it, and
    #: ``accumulate_ascent="micro"`` may use it. The variants that change the step set it False.
    plain_two_pass: ClassVar[bool] = True
    #: The module hands :meth:`extra_loss` the outputs of the pass (SAF, MESA).
    uses_outputs: ClassVar[bool] = False

    def __init__(self, rho: float = 0.05, eps: float = DEFAULT_EPS) -> None:
        self.rho = check_float("rho", rho)
        self.eps = check_float("eps", eps, strict=True)

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "descent" in vars(cls):  # the old name would be silently ignored by the module
            raise TypeError(f"{cls.__name__} defines descent(); the method is descent_(grads, perturbed_grads) -> list")

    # ------------------------------------------------------------------ the two-pass step
    def current_rho(self, lr: float | None = None, lr_max: float | None = None) -> float:
        """The radius used in a step taken at learning rate ``lr`` (constant unless a subclass schedules it)."""
        return self.rho

    def perturbation(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        *,
        names: Sequence[str] | None = None,
        grad_norm: Tensor | None = None,
        lr: float | None = None,
        lr_max: float | None = None,
    ) -> list[Tensor]:
        """The ascent ε (one tensor per parameter) from the weights and the pass-1 gradient.

        Args:
            params: The parameters w that have a gradient.
            grads: Their pass-1 gradients g, in the same order.
            names: Their names (``model.named_parameters()``), for rules that use them.
            grad_norm: ``global_norm(grads)`` if the caller already has it (saves one reduction).
            lr: The learning rate of this step (a Python float), for rules whose radius follows it.
            lr_max: The schedule's peak learning rate, used by rules that follow the lr and have no
                ``lr_max`` of their own.
        """
        raise NotImplementedError

    def descent_(self, grads: Sequence[Tensor], perturbed_grads: list[Tensor]) -> list[Tensor]:
        """Overwrite the pass-2 gradients g_p with the descent direction d, in place; return them (default: d = g_p).

        The trailing underscore is torch's in-place convention: the caller's ``perturbed_grads`` (the
        ``.grad`` tensors, in the module) hold d afterwards; no parameter-sized list is allocated.
        """
        return perturbed_grads

    # ------------------------------------------------------------------ the variants' decisions
    def plan(self, ctx: StepContext) -> Plan:
        """Two passes, one pass, or ``"decide"`` after pass 1 (:meth:`second_pass`); default: ``"two"``."""
        return "two"

    def second_pass(self, grads: Sequence[Tensor], grad_sq_norm: Tensor, ctx: StepContext) -> bool:
        """With plan ``"decide"``: take pass 2 (True) or step with the pass-1 gradient alone (False).

        ``grad_sq_norm`` is ‖g‖² of the unscaled pass-1 gradient (on the device).
        """
        return True

    def evaluation_offset(self, params: Sequence[Tensor], ctx: StepContext) -> list[Tensor] | None:
        """A one-pass step takes its gradient at w + offset (restored exactly after); None: at w."""
        return None

    def one_pass_descent_(self, params: Sequence[Tensor], grads: list[Tensor], ctx: StepContext) -> list[Tensor]:
        """A one-pass step's direction d from its gradient, in place over ``grads`` (default: d = g)."""
        return grads

    def after_second_pass(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], perturbed_grads: Sequence[Tensor], ctx: StepContext
    ) -> None:
        """See g and g_p of a two-pass step before :meth:`descent_` (needs ``uses_clean_grad``); default: nothing."""

    def extra_loss_active(self, ctx: StepContext) -> bool:
        """Whether :meth:`extra_loss` adds a term in this step (its gradient is then not the clean one)."""
        return False

    def extra_loss(
        self, outputs: Tensor, ids: Tensor | None, inputs: tuple[Any, ...], ctx: StepContext
    ) -> Tensor | None:
        """A term added to the training loss of a one-pass step (``uses_outputs`` rules); None: no term.

        Args:
            outputs: The task's outputs of the batch (class logits), with their graph.
            ids: The samples' dataset indices (a trailing ``idx`` in the batch), or None.
            inputs: The network's inputs for the batch (MESA runs its copy of the net on them).
            ctx: The step.
        """
        return None

    def frozen_in_pass_one(self, params: Sequence[Tensor], ctx: StepContext) -> list[bool] | None:
        """Which parameters get no pass-1 gradient (True: frozen); None: every parameter gets one."""
        return None

    @property
    def selects_data(self) -> bool:
        """Whether pass 2 runs on the samples :meth:`select` picks (ESAM) rather than the whole batch."""
        return False

    def select(self, clean_losses: Tensor, perturbed_losses: Tensor) -> Tensor:
        """The indices of the samples pass 2 runs on, from their losses at w and at w + ε."""
        return torch.arange(clean_losses.shape[0], device=clean_losses.device)

    def after_step(self, params: Sequence[Tensor], ctx: StepContext) -> None:
        """Called after ``optimizer.step()`` (MESA updates its moving average); default: nothing."""

    # ------------------------------------------------------------------ what the module logs
    @property
    def clean_loss(self) -> bool:
        """Whether the step computes the clean loss L_B(w) (``train/loss``); False only for one-pass MSAM."""
        return True

    @property
    def perturbs(self) -> bool:
        """Whether the step may evaluate a loss at perturbed weights (``train/loss_perturbed``)."""
        return True

    @property
    def clean_gradient(self) -> bool:
        """Whether pass 1 always yields the whole clean gradient ∇L_B(w) (``train/grad_norm``, ``pass_index`` 1)."""
        return True

    # ------------------------------------------------------------------ a run and its checkpoint
    def reset(self) -> None:
        """Forget the state of an earlier run (the module calls it when a fit starts, before a resume)."""

    def setup(self, info: RuleSetup) -> None:
        """Bind to a run (after a resume restored the state); refuse what cannot work, in one line."""

    def state_dict(self) -> dict[str, Any]:
        """The rule's state that a resumed run needs (tensors and numbers); empty for stateless rules."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (before :meth:`setup` binds the rule to the run)."""

    def _grad_norm(self, grads: Sequence[Tensor], grad_norm: Tensor | None) -> Tensor:
        return global_norm(grads) if grad_norm is None else grad_norm

    def extra_repr(self) -> str:
        return f"rho={self.rho}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


Minimizer.__module__ = PUBLIC_MODULE
