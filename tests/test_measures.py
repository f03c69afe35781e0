"""The sharpness measures' common contract (flatminima.callbacks.measures): gradient norm, no trace, inputs, errors.

Per-module tests: test_per_layer_traces.py, test_alpha_scaling.py, test_hessian.py, test_adaptive.py.
Oracles here: autograd gradients and dual norms, and bit-for-bit snapshots of the model.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatminima.callbacks import measures
from tests.measure_nets import DT, cnn_bn, data, gen, mlp

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------- gradient norm
@pytest.mark.parametrize("p, q", [(2.0, 2.0), (math.inf, 1.0), (1.0, math.inf), (3.0, 1.5)])
@pytest.mark.parametrize("adaptive", [False, True])
def test_gradient_norm_sharpness_is_rho_times_the_dual_norm(p, q, adaptive):
    net = mlp()
    x, y = data(n=10, shape=(5,))
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    expected = []
    for xb, yb in batches:
        grads = torch.autograd.grad(F.cross_entropy(net(xb), yb), list(net.parameters()))
        flat = torch.cat([(g * (w.abs() if adaptive else 1)).reshape(-1) for g, w in zip(grads, net.parameters())])
        expected.append(0.05 * float(torch.linalg.vector_norm(flat, q)))
        assert float(
            measures.gradient_norm(grads, list(net.parameters()), rho=0.05, p=p, adaptive=adaptive)
        ) == pytest.approx(expected[-1], rel=1e-12)
    got = measures.gradient_norm_sharpness(net, batches, 0.05, p=p, adaptive=adaptive)
    assert got == pytest.approx(float(np.mean(expected)), rel=1e-12)


# ---------------------------------------------------------------------------------------- no trace
def _snapshot(net: nn.Module):
    return (
        {k: v.clone() for k, v in net.state_dict().items()},
        [m.training for m in net.modules()],
        [None if p.grad is None else p.grad.clone() for p in net.parameters()],
        [p.requires_grad for p in net.parameters()],
        torch.get_rng_state(),
    )


def _assert_same(net: nn.Module, snap) -> None:
    state, flags, grads, req, rng = snap
    now = net.state_dict()
    assert state.keys() == now.keys()
    for k in state:
        assert now[k].dtype == state[k].dtype and torch.equal(now[k], state[k]), k
    assert [m.training for m in net.modules()] == flags
    for p, g in zip(net.parameters(), grads):
        assert (p.grad is None) == (g is None) and (g is None or torch.equal(p.grad, g))
    assert [p.requires_grad for p in net.parameters()] == req
    assert torch.equal(torch.get_rng_state(), rng)


MEASURES = {
    "minimum": lambda net, b, **kw: measures.minimum_sharpness(net, b),
    "minimum_sgd": lambda net, b, **kw: measures.minimum_sharpness(net, b, solver="sgd", steps=50),
    "apgd": lambda net, b, **kw: measures.adaptive_sharpness(net, b, 0.05, n_iters=4, **kw),
    "pga_l2": lambda net, b, **kw: measures.adaptive_sharpness(
        net, b, 0.05, p=2, method="pga", step_size=0.1, n_iters=3, **kw
    ),
    "gradient_norm": lambda net, b, **kw: measures.gradient_norm_sharpness(net, b, 0.05, **kw),
    "eigenvalues": lambda net, b, **kw: measures.hessian_eigenvalues(net, b, 2, max_iter=6, **kw),
    "trace": lambda net, b, **kw: measures.hessian_trace(net, b, n_probes=3, **kw),
}


@pytest.mark.parametrize("name", list(MEASURES))
def test_measures_leave_the_model_bit_identical_also_on_exceptions(name):
    net = cnn_bn().float()
    net.train()
    net[1].eval()  # mixed flags must come back as they were
    x, y = data()
    x = x.float()
    for i, p in enumerate(net.parameters()):
        p.grad = None if i % 3 == 0 else torch.randn_like(p)
    net[4].bias.requires_grad_(False)
    snap = _snapshot(net)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # measures run in fp32 regardless
        value = MEASURES[name](net, [(x[:5], y[:5]), (x[5:], y[5:])])
    _assert_same(net, snap)
    assert value == MEASURES[name](net, [(x[:5], y[:5]), (x[5:], y[5:])])
    if name.startswith("minimum"):

        class Boom(nn.Module):
            def forward(self, t):
                raise RuntimeError("boom")

        wrapped = nn.Sequential(*list(net), Boom())
        net_snap = _snapshot(wrapped)
        with pytest.raises(ValueError):
            MEASURES[name](wrapped, [(x, y)])
        _assert_same(wrapped, net_snap)
        return
    calls = {"n": 0}

    def failing(out, target):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return F.cross_entropy(out, target)

    with pytest.raises(RuntimeError, match="boom"):
        MEASURES[name](net, [(x[:5], y[:5]), (x[5:], y[5:])], loss_fn=failing)
    _assert_same(net, snap)


def test_minimum_sharpness_failure_midway_leaves_no_hooks_and_no_trace():
    net = cnn_bn()
    x, y = data()
    snap = _snapshot(net)
    with pytest.raises(TypeError):
        measures.minimum_sharpness(net, [(x, y), ("not", "a tensor", "batch")])
    _assert_same(net, snap)
    assert all(not m._forward_hooks for m in net.modules())


def test_bfloat16_model_is_measured_in_float32():
    net = mlp().to(torch.bfloat16)
    x, y = data(shape=(5,))
    ref = copy.deepcopy(net).float()
    assert measures.gradient_norm_sharpness(net, [(x, y)], 0.1) == measures.gradient_norm_sharpness(ref, [(x, y)], 0.1)
    assert measures.minimum_sharpness(net, [(x, y)]) == measures.minimum_sharpness(ref, [(x, y)])


def test_measures_work_inside_inference_mode():
    net = mlp()
    x, y = data(shape=(5,))
    expected = measures.adaptive_sharpness(net, [(x, y)], 0.05, n_iters=3)
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()  # inference tensors, as a validation hook would hold
        assert measures.adaptive_sharpness(net, [(xi, yi)], 0.05, n_iters=3) == expected


def test_graph_batches_with_tuple_inputs_and_masked_loss():
    torch_geometric = pytest.importorskip("torch_geometric")
    from torch_geometric.nn import GATConv

    from flatminima.callbacks.inputs import masked_cross_entropy, node_inputs

    class Gat(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = GATConv(6, 4, heads=2), GATConv(8, 3)

        def forward(self, x, edge_index):
            return self.b(F.elu(self.a(x, edge_index)), edge_index)

    g = gen(0)
    graph = torch_geometric.data.Data(
        x=torch.randn(12, 6, generator=g),
        edge_index=torch.randint(0, 12, (2, 30), generator=g),
        y=torch.randint(0, 3, (12,), generator=g),
        train_mask=torch.arange(12) < 5,
    )
    net = Gat()
    loss = F.cross_entropy(net(graph.x, graph.edge_index)[graph.train_mask], graph.y[graph.train_mask])
    grads = torch.autograd.grad(loss, list(net.parameters()))
    expected = 0.1 * float(torch.cat([t.reshape(-1) for t in grads]).norm())
    batches = [node_inputs(graph)]
    got = measures.gradient_norm_sharpness(net, batches, 0.1, loss_fn=masked_cross_entropy)
    assert got == pytest.approx(expected, rel=1e-6)
    assert measures.adaptive_sharpness(net, batches, 0.02, n_iters=3, loss_fn=masked_cross_entropy) >= 0
    with pytest.raises(ValueError, match="not a supported layer|could not be traced|not positively"):
        measures.minimum_sharpness(net, batches)


def test_regression_mse_helper_does_not_broadcast():
    from flatminima.callbacks.inputs import mse_loss

    out, target = torch.randn(7, 1, dtype=DT), torch.randn(7, dtype=DT)
    assert float(mse_loss(out, target)) == pytest.approx(float(((out[:, 0] - target) ** 2).mean()), rel=1e-14)


# ---------------------------------------------------------------------------------------- API hygiene
@pytest.mark.parametrize(
    "call, message",
    [
        (lambda net, b: measures.adaptive_sharpness(net, b, -0.1), "Invalid rho: -0.1; expected a finite rho >= 0"),
        (lambda net, b: measures.adaptive_sharpness(net, b, 0.1, p=3.0), "Invalid p: 3.0"),
        (lambda net, b: measures.adaptive_sharpness(net, b, 0.1, method="sgd"), "Invalid method: 'sgd'"),
        (lambda net, b: measures.adaptive_sharpness(net, b, 0.1, method="pga"), "Invalid step_size: None"),
        (lambda net, b: measures.adaptive_sharpness(net, b, 0.1, n_iters=0), "Invalid n_iters: 0"),
        (lambda net, b: measures.gradient_norm_sharpness(net, b, 0.1, p=0.5), "Invalid p: 0.5"),
        (lambda net, b: measures.hessian_eigenvalues(net, b, k=0), "Invalid k: 0"),
        (lambda net, b: measures.hessian_trace(net, b, n_probes=0), "Invalid n_probes: 0"),
        (lambda net, b: measures.hessian_trace(net, b, method="exact", loss_fn=F.mse_loss), "Invalid loss_fn"),
        (lambda net, b: measures.minimum_sharpness(net, b, solver="adam"), "Invalid solver: 'adam'"),
        (lambda net, b: measures.minimum_sharpness(net, []), "Invalid batches"),
        (lambda net, b: measures.adaptive_sharpness(net, [], 0.1), "Invalid batches"),
    ],
)
def test_bad_arguments_are_refused_with_a_clear_message(call, message):
    net = mlp()
    x, y = data(shape=(5,))
    with pytest.raises(ValueError, match=re_escape(message)):
        call(net, [(x, y)])


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_measures_import_without_lightning():
    code = (
        "import sys; sys.modules['lightning'] = None; sys.modules['lightning.pytorch'] = None\n"
        "import torch, flatminima.callbacks.measures as m\n"
        "net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))\n"
        "print(m.minimum_sharpness(net, [torch.randn(5, 3)]) > 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
