"""Momentum-SAM (Becker et al., 2024): one gradient per step, taken against the base optimizer's momentum."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._rule import DEFAULT_EPS, PUBLIC_MODULE, Minimizer, RuleSetup, StepContext, global_norm, safe_scale
from .validation import check_choice

__all__ = ["MomentumSAM"]

_KEYS = ("momentum_buffer", "exp_avg")


class MomentumSAM(Minimizer):
    """Momentum-SAM (MSAM): the step's one gradient is taken at w − ρ·v/‖v‖, v the base optimizer's momentum.

    Becker, Altrock & Risse (2024), "Momentum-SAM: Sharpness Aware Minimization without Computational
    Overhead", https://arxiv.org/abs/2401.12033; code MarlonBecker/MSAM. With v the momentum buffer of the
    base optimizer (SGD's ``momentum_buffer``, Adam's and AdamW's ``exp_avg``) as the previous step left it::

        ε = −ρ · v / (‖v‖₂ + eps)          (ε = 0 before the first step: no momentum yet)
        g̃ = ∇L_B(w + ε),   d = g̃          then optimizer.step() at w with d

    One forward-backward pass per step. The weights are w + ε only inside that pass (the module's
    ``PerturbedWeights``: an exact copy of w restored right after the backward, also on an error), so
    every callback, validation, checkpoint and sharpness measure sees the unperturbed w. (The authors'
    code instead keeps the parameters at w + ε between steps and moves them back for evaluation; its
    weight decay is then applied at w + ε; here the base optimizer sees w, as everywhere else.)

    ``clean_loss=True`` (default) also runs one forward pass at w without gradient, so that ``train/loss``
    (and the training metrics) keep their meaning, the clean loss L_B(w), and the BatchNorm statistics
    are those of w (the pass at w + ε then leaves them as they were): about a third of a pass more.
    ``clean_loss=False`` is the authors' one-pass step: ``train/loss`` is not logged (a callback
    monitoring it is refused before training), ``train/loss_perturbed`` is L_B(w + ε), and the
    BatchNorm statistics follow the pass at w + ε, as in their code. ``train/grad_norm`` is never logged
    (there is no gradient at w), and a callback reading the clean gradient in ``on_after_backward``
    finds ``pass_index`` 2 (a perturbed gradient).

    Default ρ = 3, the authors' value for SGD (their README and configs for WRN-16-4 and ResNet-50 on
    CIFAR-100 and ResNet-50 on ImageNet; their optimizer class defaults to 0.3, AdamW-MSAM to 1). ρ is
    a radius in weight space: v/‖v‖ has norm 1, independent of the learning rate.

    Args:
        rho: Radius ρ ≥ 0 of the step against the momentum.
        clean_loss: Also evaluate the loss at w (one forward pass without gradient), see above.
        momentum_key: The optimizer state entry holding v; None: ``momentum_buffer`` for SGD (with
            momentum > 0), ``exp_avg`` for Adam-type optimizers.
        eps: Added to ‖v‖₂.
    """

    __module__ = PUBLIC_MODULE
    plain_two_pass = False

    def __init__(
        self, rho: float = 3.0, clean_loss: bool = True, momentum_key: str | None = None, eps: float = DEFAULT_EPS
    ) -> None:
        super().__init__(rho, eps)
        if not isinstance(clean_loss, bool):
            raise ValueError(f"Invalid clean_loss: {clean_loss!r}; expected True or False")
        self._clean_loss = clean_loss
        self.momentum_key = None if momentum_key is None else check_choice("momentum_key", momentum_key, _KEYS)
        self._key = self.momentum_key

    @property
    def clean_loss(self) -> bool:
        return self._clean_loss

    @property
    def clean_gradient(self) -> bool:
        return False

    def plan(self, ctx: StepContext) -> str:
        return "one"

    def setup(self, info: RuleSetup) -> None:
        opt = info.optimizer
        if opt is None or self.momentum_key is not None:
            return
        groups = opt.param_groups
        if isinstance(opt, torch.optim.SGD):
            if any(float(g.get("momentum", 0.0)) <= 0.0 for g in groups):
                raise ValueError(
                    "Invalid optimizer for MomentumSAM: SGD without momentum has no momentum buffer; "
                    "set optimizer.init_args.momentum > 0 (0.9 in Becker et al.)"
                )
            self._key = "momentum_buffer"
        elif all("betas" in g for g in groups):
            self._key = "exp_avg"
        else:
            raise ValueError(
                f"Invalid optimizer for MomentumSAM: {type(opt).__name__} has no momentum buffer; use "
                "SGD with momentum or an Adam-type optimizer, or name the state entry (momentum_key)"
            )

    def evaluation_offset(self, params: Sequence[Tensor], ctx: StepContext) -> list[Tensor] | None:
        """ε = −ρ·v/(‖v‖ + eps) over ``params`` (zero where a parameter has no momentum yet)."""
        key = self._key or "momentum_buffer"
        state = ctx.optimizer.state if ctx.optimizer is not None else {}
        momenta = [state[p].get(key) if p in state else None for p in params]
        if all(v is None for v in momenta):
            return [torch.zeros_like(p) for p in params]
        v = [torch.zeros_like(p) if m is None else m for m, p in zip(momenta, params)]
        with torch.no_grad():
            return list(torch._foreach_mul(v, safe_scale(-self.rho, global_norm(v), self.eps)))

    def extra_repr(self) -> str:
        return f"rho={self.rho}, clean_loss={self.clean_loss}"
