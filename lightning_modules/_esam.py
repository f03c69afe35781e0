"""ESAM (Du et al., 2022): SAM with a stochastic subset of the weights perturbed and pass 2 on the sharpest samples."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._rule import DEFAULT_EPS, PUBLIC_MODULE, Minimizer, RuleSetup, StepContext, safe_scale, step_uniforms
from .validation import check_fraction, invalid, is_integer

__all__ = ["ESAM"]


class ESAM(Minimizer):
    """Efficient SAM: stochastic weight perturbation (SWP) and sharpness-sensitive data selection (SDS).

    Du, Yan, Feng, Zhou, Zhen, Goh & Tan (2022), "Efficient Sharpness-aware Minimization for Improved
    Training of Neural Networks" (ICLR), https://openreview.net/forum?id=n0OeTdNRG0Q; code
    dydjw9/Efficient_SAM (``utils/Esam.py``), which this follows. Each step::

        SWP:  m_j ~ Bernoulli(β) per parameter tensor j; pass 1 computes g only for the tensors with m_j = 1
              (the others are frozen: no weight gradient is computed for them)
              ε_j = m_j · ρ · g_j / (β · (‖m ⊙ g‖₂ + eps))            (ε = 0 on the frozen tensors)
        SDS:  l_i(w) from pass 1, l_i(w + ε) from a forward pass without gradient at w + ε;
              S = the ⌊γ·n⌋ samples (at least 1) whose loss rose most, l_i(w + ε) − l_i(w)
              g_p = ∇ (1/|S|) Σ_{i∈S} l_i(w + ε),   d = g_p                  (pass 2 on S only)

    The mask is drawn from (seed, step) alone, the same on every rank and after a resume; the official
    code draws it with Python's global RNG at the end of the previous step (so its first step is
    unmasked). Its selection keeps the samples strictly above the ⌊γ·n⌋-th largest rise, one fewer than
    ⌊γ·n⌋ without ties; here exactly ⌊γ·n⌋. β = 1 perturbs every tensor (SAM's ε), γ = 1 runs pass 2 on
    the whole batch without the extra forward pass; β = γ = 1 is SAM.

    ``train/loss`` is the clean pass-1 loss; ``train/loss_perturbed`` the mean loss of S at w + ε. With
    β < 1 the pass-1 gradient is partial: ``train/grad_norm`` is not logged and ``pass_index`` is 3
    during pass 1 (not the clean gradient). Data selection needs per-sample losses (Classifier,
    BinaryClassifier, Regressor provide them; NodeClassifier does not and is refused with γ < 1).
    Under DDP each replica selects from its own sub-batch (the official code's per-replica ascent);
    ``ascent="global"`` is refused with β < 1.

    Defaults ρ = 0.05, β = 0.6, γ = 0.5: the official ``run.sh`` for ResNet-18 on CIFAR-10 (its
    WideResNet lines use ρ = 0.1, β = 0.5). The official code divides by ‖g‖ + 1e-7; eps here is 1e-12
    as for every rule.

    Args:
        rho: Radius ρ ≥ 0.
        beta: β ∈ (0, 1], the probability that a parameter tensor is perturbed.
        gamma: γ ∈ (0, 1], the fraction of the batch pass 2 runs on.
        seed: Seed of the masks (an integer).
        eps: Added to the norm.
    """

    __module__ = PUBLIC_MODULE
    plain_two_pass = False

    def __init__(
        self, rho: float = 0.05, beta: float = 0.6, gamma: float = 0.5, seed: int = 0, eps: float = DEFAULT_EPS
    ) -> None:
        super().__init__(rho, eps)
        self.beta = _check_open_unit("beta", beta)
        self.gamma = _check_open_unit("gamma", gamma)
        if not is_integer(seed):
            raise invalid("seed", seed, "an integer")
        self.seed = int(seed)

    @property
    def clean_gradient(self) -> bool:
        return self.beta == 1.0

    @property
    def selects_data(self) -> bool:
        return self.gamma < 1.0

    def setup(self, info: RuleSetup) -> None:
        if self.selects_data and not info.sample_losses:
            raise ValueError(
                f"Invalid ESAM gamma: {self.gamma}; selecting samples by their loss needs per-sample "
                f"losses, which {info.task or 'this task'} does not provide; use gamma=1.0"
            )
        if self.beta < 1.0 and info.ascent == "global" and info.world_size > 1:
            raise ValueError(
                f"Invalid ascent: 'global' with ESAM(beta={self.beta}); its pass 1 is per replica (use "
                "ascent='replica', the default, or beta=1.0)"
            )

    def frozen_in_pass_one(self, params: Sequence[Tensor], ctx: StepContext) -> list[bool] | None:
        """m_j = 0 (frozen) with probability 1 − β per tensor, from (seed, step); never every tensor."""
        if self.beta == 1.0:
            return None
        frozen = [u >= self.beta for u in step_uniforms(self.seed, ctx.step, len(params))]
        return None if all(frozen) else frozen

    def perturbation(self, params, grads, *, names=None, grad_norm=None, lr=None, lr_max=None):
        """ε = ρ·g/(β·(‖g‖ + eps)) over the tensors that have a pass-1 gradient."""
        scale = safe_scale(self.rho / self.beta, self._grad_norm(grads, grad_norm), self.eps)
        return list(torch._foreach_mul(grads, scale))

    def select(self, clean_losses: Tensor, perturbed_losses: Tensor) -> Tensor:
        """The ⌊γ·n⌋ samples (at least one) with the largest rise l(w + ε) − l(w), in batch order."""
        n = clean_losses.shape[0]
        k = max(1, int(n * self.gamma))
        rise = perturbed_losses.detach() - clean_losses.detach()
        return torch.topk(rise, k, sorted=False).indices.sort().values  # in batch order

    def extra_repr(self) -> str:
        return f"rho={self.rho}, beta={self.beta}, gamma={self.gamma}, seed={self.seed}"


def _check_open_unit(name: str, value: object) -> float:
    """A fraction in (0, 1]."""
    number = check_fraction(name, value, closed=True)
    if number <= 0.0:
        raise invalid(name, value, f"0 < {name} <= 1")
    return number
