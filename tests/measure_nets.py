"""Small float64 networks, data and brute-force oracles shared by the sharpness-measure tests.

Oracles: brute-force autograd Hessians (torch.autograd.functional.hessian) in float64, the BatchNorm
folding and the α-scale transformation written out by hand.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

DT = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mlp(widths=(5, 7, 6, 4), bias=True, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).to(DT)


def cnn_bn(seed=0) -> nn.Sequential:
    """Conv(pad)+BN, max-pool, conv, a Linear on the last axis of a 4-D map, LeakyReLU, Linear (float64)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        nn.Linear(2, 3),
        nn.LeakyReLU(0.1),
        nn.Flatten(),
        nn.Linear(4 * 2 * 3, 5),
        nn.ReLU(inplace=True),
        nn.Dropout(0.3),
        nn.Linear(5, 4),
    ).to(DT)
    with torch.no_grad():
        bn = net[1]
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    return net


def data(n=9, shape=(2, 8, 8), classes=4, seed=1):
    g = gen(seed)
    return torch.randn(n, *shape, generator=g, dtype=DT), torch.randint(0, classes, (n,), generator=g)


def flat_params(net: nn.Module):
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    numels = [p.numel() for p in net.parameters()]
    w = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    return names, shapes, numels, w


def brute_hessian(net: nn.Module, x, y, loss_fn=F.cross_entropy) -> tuple[torch.Tensor, list[int]]:
    """The full Hessian of loss_fn(net(x), y) w.r.t. all parameters (eval mode), by autograd."""
    net = copy.deepcopy(net).eval()
    names, shapes, numels, w = flat_params(net)

    def loss(v):
        views = [t.view(s) for t, s in zip(v.split(numels), shapes)]
        return loss_fn(functional_call(net, dict(zip(names, views)), (x,)), y)

    return torch.autograd.functional.hessian(loss, w, vectorize=True), numels


def fold_bn(net: nn.Sequential) -> nn.Sequential:
    """The same function without BatchNorm: conv' = (γ/σ)·conv, bias' = (γ/σ)(b − μ) + β."""
    out = copy.deepcopy(net).eval()
    for i, m in enumerate(out):
        if isinstance(m, nn.BatchNorm2d):
            conv = out[i - 1]
            s = m.weight / torch.sqrt(m.running_var + m.eps)
            with torch.no_grad():
                conv.weight.mul_(s[:, None, None, None])
                conv.bias.copy_((conv.bias - m.running_mean) * s + m.bias)
            out[i] = nn.Identity()
    return out


def scale_layers(net: nn.Sequential, alphas) -> nn.Sequential:
    """α-scale transformation of a plain chain: W_d ← α_d W_d, b_d ← (∏_{k≤d} α_k) b_d."""
    out = copy.deepcopy(net)
    layers = [m for m in out if isinstance(m, (nn.Linear, nn.Conv2d))]
    prod = 1.0
    with torch.no_grad():
        for m, a in zip(layers, alphas):
            prod *= a
            m.weight.mul_(a)
            if m.bias is not None:
                m.bias.mul_(prod)
    return out


class Quadratic(nn.Module):
    def __init__(self, n, seed=0):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n, generator=gen(seed), dtype=DT))

    def forward(self, x):
        return self.w
