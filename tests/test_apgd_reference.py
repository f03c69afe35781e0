"""Adaptive sharpness (``method="apgd"``) against the authors' algorithm, re-implemented here.

The reference below transcribes ``eval_APGD_sharpness`` and ``weight_ascent_step_momentum`` of
Andriushchenko et al. (2023), github.com/tml-epfl/sharpness-vs-generalization, ``sharpness.py``, as
their ``eval_sharpness.py`` calls them (no random init, one restart, ``version="default"``): the model
itself is perturbed through ``param.data``, the perturbations live in dicts keyed by parameter, losses
are Python floats, and the ellipsoid projection is their tolerance-based bisection. Only ``.cuda()``
and the logging are left out. At a step-size halving their code reloads the best model
(``model.load_state_dict(worst_model_dict)``) but keeps ``delta_dict``/``prev_delta_dict``: the best
point is used for one gradient only. ``method="apgd_reset"`` (this project's earlier variant) resets
the iterate to the best point instead, and differs.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatminima.callbacks import measures

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------- the reference
def _zero_grad(model):
    for p in model.parameters():
        if p.grad is not None:
            p.grad.zero_()


def _ascent_step(model, x, y, loss_f, orig, delta, prev_delta, step_size, rho, adaptive, norm, momentum=0.75):
    """``weight_ascent_step_momentum`` of the reference code."""
    backup = {p: delta[p].clone() for p in delta}
    _zero_grad(model)
    loss_f(model(x), y).backward()
    with torch.no_grad():
        if norm == "l2":
            grad_norm = sum([p.grad.norm() ** 2 for p in model.parameters()]) ** 0.5
            for p in model.parameters():
                delta[p] += step_size / (grad_norm + 1e-12) * p.grad * (1 if not adaptive else orig[p].abs())
        else:
            for p in model.parameters():
                delta[p] += step_size * p.grad.sign() * (1 if not adaptive else orig[p].abs())
    _zero_grad(model)
    with torch.no_grad():
        if norm == "l2":

            def weighted_norm(d):
                return sum([((d[p] / (orig[p].abs() if adaptive else 1)) ** 2).sum() for p in d]) ** 0.5

            if not adaptive:
                delta_norm = weighted_norm(delta)
                if delta_norm > rho:
                    for p in delta:
                        delta[p] *= rho / delta_norm
            else:
                lmbd, max_lmbd_limit = 0.1, 10.0
                min_lmbd, max_lmbd = 0.0, max_lmbd_limit
                tmp = {p: delta[p].clone() for p in delta}
                curr_norm = new_norm = weighted_norm(tmp)
                if curr_norm > rho:
                    while (new_norm - rho).abs() > 10**-5:
                        curr_norm = new_norm
                        for p in delta:
                            c = 1 / orig[p].abs()
                            tmp[p] = delta[p] / (1 + 2 * lmbd * c**2)
                        new_norm = weighted_norm(tmp)
                        if new_norm > rho:
                            lmbd, min_lmbd = (lmbd + max_lmbd) / 2, lmbd
                        else:
                            lmbd, max_lmbd = (min_lmbd + lmbd) / 2, lmbd
                        if (max_lmbd_limit - max_lmbd) < 10**-2:
                            max_lmbd_limit, max_lmbd = max_lmbd_limit * 2, max_lmbd * 2
                delta = {p: tmp[p].clone() for p in tmp}
        else:
            for p in delta:
                bound = orig[p].abs() if adaptive else torch.ones_like(orig[p])
                delta[p] = torch.max(torch.min(delta[p], bound * rho), -1.0 * bound * rho)
        for p in model.parameters():
            delta[p] = momentum * delta[p] + (1 - momentum) * prev_delta[p]
        for p in model.parameters():
            p.data = orig[p] + delta[p]
        for p in model.parameters():
            prev_delta[p] = backup[p]
    return delta, prev_delta


def reference_apgd_sharpness(model, batches, rho, n_iters, adaptive, norm, min_update_ratio=0.75):
    """``eval_APGD_sharpness`` of the reference code (rand_init=False, n_restarts=1): the mean sharpness."""
    loss_f = F.cross_entropy

    def get_loss(x, y):
        with torch.no_grad():
            return loss_f(model(x), y).cpu().item()

    orig_state = copy.deepcopy(model.state_dict())
    orig = {p: p.clone() for p in model.parameters()}
    p_, w = [0, 0.22], [0, math.ceil(n_iters * 0.22)]
    while w[-1] < n_iters and w[-1] != w[-2]:
        p_.append(p_[-1] + max(p_[-1] - p_[-2] - 0.03, 0.06))
        w.append(math.ceil(p_[-1] * n_iters))
    w = w[1:]
    avg_loss = avg_init_loss = 0.0
    for x, y in batches:
        init_loss = get_loss(x, y)
        avg_init_loss += init_loss
        delta = {p: torch.zeros_like(p) for p in model.parameters()}
        prev_delta = {p: delta[p].clone() for p in delta}
        worst_model = copy.deepcopy(model.state_dict())
        prev_worst, worst = init_loss, init_loss
        step_size = prev_step_size = 2 * rho
        prev_cp, num_of_updates = 0, 0
        for i in range(n_iters):
            delta, prev_delta = _ascent_step(
                model, x, y, loss_f, orig, delta, prev_delta, step_size, rho, adaptive, norm
            )
            with torch.no_grad():
                curr_loss = get_loss(x, y)
                if curr_loss > worst:
                    worst = curr_loss
                    worst_model = copy.deepcopy(model.state_dict())
                    num_of_updates += 1
                if i in w:
                    cond1 = num_of_updates < (min_update_ratio * (i - prev_cp))
                    cond2 = (prev_step_size == step_size) and (prev_worst == worst)
                    prev_step_size, prev_worst, prev_cp = step_size, worst, i
                    num_of_updates = 0
                    if cond1 or cond2:
                        step_size *= 0.5
                        model.load_state_dict(worst_model)
        model.load_state_dict(orig_state)
        avg_loss += worst
    return (avg_loss - avg_init_loss) / len(batches)


# ---------------------------------------------------------------------------------------- the comparison
def small_cnn(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(12 * 4 * 4, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    ).eval()


def cnn_batches(n_batches=3, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 3, 16, 16, generator=g), torch.randint(0, 10, (size,), generator=g))
        for _ in range(n_batches)
    ]


PROTOCOLS = [  # (norm, adaptive, rho): the authors' radii for ResNet-18 (sh/eval_sharpness_final.sh)
    ("l2", False, 0.5),
    ("l2", True, 0.5),
    ("l2", True, 2.0),
    ("linf", False, 0.002),
    ("linf", True, 0.004),
]


@pytest.mark.parametrize("norm, adaptive, rho", PROTOCOLS)
def test_apgd_reproduces_the_authors_code(norm, adaptive, rho):
    net, batches = small_cnn(), cnn_batches()
    expected = reference_apgd_sharpness(copy.deepcopy(net), batches, rho, 20, adaptive, norm)
    got = measures.adaptive_sharpness(
        net, batches, rho, p=2.0 if norm == "l2" else math.inf, adaptive=adaptive, n_iters=20
    )
    assert expected > 0
    assert got == pytest.approx(expected, rel=1e-4)


def test_apgd_reset_is_a_different_algorithm():
    """The earlier variant (iterate reset at each halving) stays available under its own name, and differs."""
    net, batches = small_cnn(), cnn_batches(n_batches=1)
    faithful = measures.adaptive_sharpness(net, batches, 0.5, p=2.0, adaptive=False, n_iters=20)
    reset = measures.adaptive_sharpness(net, batches, 0.5, p=2.0, adaptive=False, n_iters=20, method="apgd_reset")
    assert reset > 0 and abs(reset / faithful - 1) > 1e-4
