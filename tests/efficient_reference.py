"""Independent float64 replays of the efficient SAM variants, written from their formulas (docs/design.md).

Gradients come from ``torch.func.functional_call`` on the weights as a dict, per parameter name; nothing here
uses the library's rule objects or its step. Shared by tests/test_efficient_step.py and tests/test_ddp_variants.py.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


def tanh_mlp(seed: int = 0) -> nn.Module:
    """A tiny float64 MLP without BatchNorm or dropout (train and eval mode compute the same function)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    net.out_features = 3
    return net


def weights(net: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def logits(net: nn.Module, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return functional_call(net, w, (x,))


def grad(net: nn.Module, w: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, extra=None) -> dict:
    """∇ of the mean cross-entropy (plus ``extra(logits)``) at the weights ``w``, per parameter name."""
    names = list(w)
    values = [w[n].detach().requires_grad_(True) for n in names]
    z = logits(net, dict(zip(names, values)), x)
    loss = F.cross_entropy(z, y) + (extra(z) if extra is not None else 0.0)
    return dict(zip(names, torch.autograd.grad(loss, values)))


def norm(d: dict) -> float:
    return math.sqrt(sum(float((v * v).sum()) for v in d.values()))


def dot(a: dict, b: dict) -> float:
    return sum(float((a[n] * b[n]).sum()) for n in a)


def sam_direction(net, w, x, y, rho):
    """(g, g_s) of a SAM step: g at w and g_s at w + ρ·g/(‖g‖ + 1e-12)."""
    g = grad(net, w, x, y)
    n = norm(g)
    return g, grad(net, {k: w[k] + rho * g[k] / (n + 1e-12) for k in w}, x, y)


def kl_term(z: torch.Tensor, reference: torch.Tensor, temperature: float) -> torch.Tensor:
    """τ² · mean_i Σ_c p log(p/q), p = softmax(r/τ), q = softmax(z/τ), written out."""
    p = torch.softmax(reference / temperature, dim=1)
    log_q = z / temperature - torch.logsumexp(z / temperature, dim=1, keepdim=True)
    return temperature**2 * (p * (torch.log(p) - log_q)).sum(1).mean()


class SGD:
    """torch's SGD update, written out: v ← μ·v + (d + λ·w) (v = d + λ·w at the first step), w ← w − lr·v."""

    def __init__(self, lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.v: dict | None = None

    def step(self, w: dict, d: dict) -> dict:
        d = {k: d[k] + self.weight_decay * w[k] for k in w}
        if self.momentum:
            self.v = d if self.v is None else {k: self.momentum * self.v[k] + d[k] for k in w}
            d = self.v
        return {k: w[k] - self.lr * d[k] for k in w}


def uniforms(seed: int, step: int, n: int) -> list[float]:
    """The documented draw of the schedules and ESAM's masks: Mersenne Twister seeded with "<seed>/<step>"."""
    rng = random.Random(f"{seed}/{step}")
    return [rng.random() for _ in range(n)]
