"""Differential tests: the module's SAM, ASAM (davda54 convention) and GSAM against pytorch-optimizer 4.1.0.

pytorch-optimizer is an independent implementation (its SAM follows davda54/sam, its GSAM the
reference code of Zhuang et al.); it is a test-only dependency. 12 steps, float64.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from flatminima.lightning_modules import ASAM, GSAM, SAM, Classifier
from tests.helpers import bn_mlp, classification_batches, clone, fixed_batches, quiet_trainer

po = pytest.importorskip("pytorch_optimizer", reason="pytorch-optimizer is the test oracle (pip install '.[test]')")

STEPS = 12


@pytest.fixture(autouse=True)
def oracle_norm_in_float64(monkeypatch):
    """pytorch-optimizer casts the squared global gradient norm to float32; keep the grads' dtype instead.

    That cast alone moves the weights by ~4e-9 after 12 float64 steps; everything else is untouched.
    """

    def global_norm_sq(param_groups, device=None, *, weight_adaptive=False):
        grads = [
            p.grad * p.abs() if weight_adaptive and group.get("adaptive", False) else p.grad
            for group in param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        return torch.stack([g.norm() for g in grads]).square().sum().reshape(1)

    monkeypatch.setattr(po.optimizer.sam, "get_global_gradient_norm", global_norm_sq)


BASES = {
    "sgd_momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=5e-4)),
    "adam": (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-4)),
}


def _ours(net, batches, base, rule):
    cls, kw = BASES[base]
    model = Classifier(clone(net), num_classes=3, optimizer=partial(cls, **kw), minimizer=rule)
    trainer = quiet_trainer(max_epochs=1, precision="64-true")
    trainer.fit(model, fixed_batches(batches))
    assert trainer.global_step == STEPS
    return model.net


def _oracle_sam(net, batches, base, adaptive, rho):
    cls, kw = BASES[base]
    net = clone(net)
    opt = po.SAM(net.parameters(), base_optimizer=cls, rho=rho, adaptive=adaptive, **kw)
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(net(x), y).backward()
        opt.second_step(zero_grad=True)
    return net


def _oracle_gsam(net, batches, base, rho, alpha):
    cls, kw = BASES[base]
    net = clone(net)
    base_opt = cls(net.parameters(), **kw)
    constant = torch.optim.lr_scheduler.LambdaLR(base_opt, lambda s: 1.0)
    rho_scheduler = po.ProportionScheduler(constant, max_lr=kw["lr"], min_lr=0.0, max_value=rho, min_value=rho)
    opt = po.GSAM(net.parameters(), base_optimizer=base_opt, model=net, rho_scheduler=rho_scheduler, alpha=alpha)
    for x, y in batches:
        opt.set_closure(F.cross_entropy, x, y)
        opt.step()
        opt.update_rho_t()
    return net


def _assert_same(a, b, tol=1e-11):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p.detach(), q.detach(), rtol=0, atol=tol), (n, (p - q).abs().max().item())


@pytest.mark.parametrize("base", list(BASES))
def test_sam_matches_pytorch_optimizer(base):
    net, batches = bn_mlp(), classification_batches(STEPS)
    _assert_same(_ours(net, batches, base, SAM(rho=0.05)), _oracle_sam(net, batches, base, False, 0.05))


@pytest.mark.parametrize("base", list(BASES))
def test_asam_davda54_convention_matches_pytorch_optimizer_adaptive_sam(base):
    net, batches = bn_mlp(), classification_batches(STEPS)
    ours = _ours(net, batches, base, ASAM(rho=0.5, eta=0.0, scope="all"))
    _assert_same(ours, _oracle_sam(net, batches, base, True, 0.5))


@pytest.mark.parametrize("base", list(BASES))
def test_gsam_matches_pytorch_optimizer(base):
    net, batches = bn_mlp(), classification_batches(STEPS)
    ours = _ours(net, batches, base, GSAM(rho=0.05, alpha=0.4))
    _assert_same(ours, _oracle_gsam(net, batches, base, 0.05, 0.4))


def test_the_oracle_comparison_is_sensitive():
    # a different rho must show: the comparison above is not trivially satisfied
    net, batches = bn_mlp(), classification_batches(STEPS)
    ours = _ours(net, batches, "sgd_momentum", SAM(rho=0.05))
    other = _oracle_sam(net, batches, "sgd_momentum", False, 0.051)
    with pytest.raises(AssertionError):
        _assert_same(ours, other)
