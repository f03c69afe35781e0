"""AdaBound and AdaShift: the reference algorithms, against pytorch-optimizer 4.1.0, and their state."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from flatminima.lightning_modules.optim import AdaBound, AdaShift

po = pytest.importorskip("pytorch_optimizer", reason="pytorch-optimizer is the test oracle (pip install '.[test]')")
from pytorch_optimizer.base.optimizer import BaseOptimizer  # noqa: E402

STEPS = 30


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _batches(n=STEPS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g, dtype=torch.float64))
        for _ in range(n)
    ]


def _train(net, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        opt.step()
    return net


def _max_diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.fixture
def oracle_without_sqrt_eps(monkeypatch):
    """pytorch-optimizer adds 1e-15 inside √v (not in the AdaBound reference code): take it out."""
    original = BaseOptimizer.apply_ams_bound_foreach

    def no_inner_eps(ams_bound, exp_avg_sqs, max_exp_avg_sqs, eps, exp_avg_sq_eps=1e-15):
        return original(ams_bound, exp_avg_sqs, max_exp_avg_sqs, eps, 0.0)

    monkeypatch.setattr(BaseOptimizer, "apply_ams_bound_foreach", staticmethod(no_inner_eps))


@pytest.mark.parametrize("amsbound", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_adabound_matches_the_reference(oracle_without_sqrt_eps, amsbound, weight_decay):
    net, batches = _net(), _batches()
    ours = _train(copy.deepcopy(net), AdaBound(copy.deepcopy(net).parameters(), lr=1e-2), [])  # construct only
    a = copy.deepcopy(net)
    b = copy.deepcopy(net)
    _train(a, AdaBound(a.parameters(), lr=1e-2, final_lr=0.1, weight_decay=weight_decay, amsbound=amsbound), batches)
    _train(
        b,
        po.AdaBound(
            b.parameters(), lr=1e-2, final_lr=0.1, weight_decay=weight_decay, weight_decouple=False, ams_bound=amsbound
        ),
        batches,
    )
    assert _max_diff(a, b) < 1e-12
    assert _max_diff(a, ours) > 1e-3  # it did move


def test_adabound_bounds_follow_a_scheduled_lr(oracle_without_sqrt_eps):
    net, batches = _net(), _batches()
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    oa, ob = AdaBound(a.parameters(), lr=1e-2), po.AdaBound(b.parameters(), lr=1e-2, weight_decouple=False)
    sa = torch.optim.lr_scheduler.StepLR(oa, step_size=5, gamma=0.5)
    sb = torch.optim.lr_scheduler.StepLR(ob, step_size=5, gamma=0.5)
    for x, y in batches:
        for net_, opt, sch in ((a, oa, sa), (b, ob, sb)):
            opt.zero_grad()
            ((net_(x) - y) ** 2).mean().backward()
            opt.step()
            sch.step()
    assert _max_diff(a, b) < 1e-12


@pytest.mark.parametrize("keep_num", [1, 3, 10])
def test_adashift_matches_the_reference(keep_num):
    net, batches = _net(), _batches()
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    _train(a, AdaShift(a.parameters(), lr=1e-2, keep_num=keep_num), batches)
    _train(b, po.AdaShift(b.parameters(), lr=1e-2, keep_num=keep_num), batches)
    assert _max_diff(a, b) < 1e-12
    assert _max_diff(a, net) > 1e-3


def test_adashift_does_not_move_while_the_window_fills():
    net = _net()
    before = copy.deepcopy(net)
    _train(net, AdaShift(net.parameters(), lr=1e-1, keep_num=10), _batches(10))
    assert _max_diff(net, before) == 0.0
    _train(net, AdaShift(net.parameters(), lr=1e-1, keep_num=10), _batches(11))
    assert _max_diff(net, before) > 0.0


def test_adashift_window_survives_a_weights_only_checkpoint():
    net, batches = _net(), _batches()
    a = copy.deepcopy(net)
    opt = AdaShift(a.parameters(), lr=1e-2, keep_num=5)
    _train(a, opt, batches[:7])
    buffer = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    b = copy.deepcopy(net)
    b.load_state_dict(saved["model"])
    opt_b = AdaShift(b.parameters(), lr=1e-2, keep_num=5)
    opt_b.load_state_dict(saved["opt"])
    _train(a, opt, batches[7:])
    _train(b, opt_b, batches[7:])
    assert _max_diff(a, b) == 0.0


def test_adabound_base_lr_survives_a_checkpoint():
    net = _net()
    opt = AdaBound(net.parameters(), lr=1e-2)
    opt.param_groups[0]["lr"] = 1e-3  # as a scheduler would
    state = opt.state_dict()
    fresh = AdaBound(_net().parameters(), lr=5e-2)
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["base_lr"] == 1e-2


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: AdaBound(p, lr=-1), r"Invalid lr: -1; expected a finite lr >= 0"),
        (lambda p: AdaBound(p, betas=(0.9, 1.0)), "Invalid betas"),
        (lambda p: AdaBound(p, gamma=0), "Invalid gamma"),
        (lambda p: AdaBound(p, final_lr=-0.1), "Invalid final_lr"),
        (lambda p: AdaShift(p, keep_num=0), "Invalid keep_num"),
        (lambda p: AdaShift(p, reduce="mean"), "Invalid reduce"),
        (lambda p: AdaShift(p, eps=-1e-10), "Invalid eps"),
    ],
)
def test_bad_arguments_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make(_net().parameters())
