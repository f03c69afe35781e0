"""The original minimum-sharpness α solver, written from its description: an oracle, not the code under test.

Ibayashi, Hamaguchi & Imaizumi (2021) minimise Tr[H(α)] = Σ_d T_d/α_d² + Σ_d B_d/(∏_{k≤d} α_k)² over
α-scale transformations (∏_d α_d = 1) with torch SGD on log α and a LambdaLR schedule 1/(1 + decay·t),
the traces divided by their sum, autograd at every step (github.com/ibayashi-hikaru/minimum-sharpness).
:func:`flatminima.callbacks.alpha_scaling.minimize_scaled_trace` with ``solver="sgd"`` must reproduce it;
tests/test_alpha_scaling.py checks that, and benchmarks/measures.py times it as the original's baseline.
It lives here, beside the tests, because it is an independent oracle: it imports nothing of the project.
"""

from __future__ import annotations

import torch


def reference_sgd_solve(
    weight: list[float], bias: list[float], lr: float = 0.1, steps: int = 10_000, decay: float = 1e-3
) -> float:
    """Tr[H(α)] after ``steps`` torch-SGD steps on log α from α = 1 (float64), as the original code runs it.

    Args:
        weight: Per-layer weight traces T_d (input to output).
        bias: Per-layer bias traces B_d.
        lr: SGD learning rate (the original's default 0.1).
        steps: SGD steps (the original's default 10 000).
        decay: The step-t learning rate is lr/(1 + decay·t).

    Returns:
        The objective of the last step, in the units of the given traces.
    """
    scale = float(sum(weight) + sum(bias))
    t = [v / scale for v in weight]
    b = [v / scale for v in bias]
    exponent = torch.zeros(len(t) - 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([exponent], lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1 / (e * decay + 1))
    for _ in range(steps):
        alpha = torch.exp(exponent)
        loss, prod = 0, 1
        for layer in range(len(t) - 1):
            loss = loss + t[layer] / alpha[layer] ** 2
            prod = prod * alpha[layer]
            loss = loss + b[layer] / prod**2
        loss = loss + t[-1] * prod**2 + b[-1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return float(loss.detach()) * scale
