"""The pure sharpness measures (callbacks.measures) against independent computations.

Oracles: brute-force autograd Hessians (torch.autograd.functional.hessian) in float64, numpy/torch
dense eigendecompositions, scipy's optimizer and root finder, and straightforward re-implementations
of the published algorithms written here from their definitions.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from callbacks import measures
from callbacks.adaptive import _project_ellipsoid, apgd_checkpoints
from callbacks.ggn import _ce_hessian_factor, _LayerAccumulator, feed_forward_layers

ROOT = Path(__file__).resolve().parents[1]
DT = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread; on a shared CPU, OpenMP threads waiting for each other cost 100×."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------- helpers
def _gen(seed: int) -> torch.Generator:
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
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Linear(2, 3), nn.LeakyReLU(0.1), nn.Flatten(),
        nn.Linear(4 * 2 * 3, 5), nn.ReLU(inplace=True), nn.Dropout(0.3), nn.Linear(5, 4),
    ).to(DT)
    with torch.no_grad():
        bn = net[1]
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    return net


def data(n=9, shape=(2, 8, 8), classes=4, seed=1):
    g = _gen(seed)
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


# ---------------------------------------------------------------------------------------- CE Hessian in the logits
def test_ce_hessian_factor_squares_to_softmax_hessian():
    logits = torch.randn(6, 5, generator=_gen(0), dtype=DT) * 3
    logits[0] = torch.tensor([40.0, 0, 0, 0, 0], dtype=DT)  # p ≈ e_0: the reflection must stay well conditioned
    a = _ce_hessian_factor(logits)
    p = logits.softmax(1)
    expected = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    assert a.shape == (6, 5, 4)
    torch.testing.assert_close(a @ a.transpose(1, 2), expected, rtol=0, atol=1e-14)


# ---------------------------------------------------------------------------------------- exact layer traces
def test_layer_traces_equal_brute_force_hessian_diagonal():
    net = cnn_bn()
    x, y = data()
    folded = fold_bn(net)
    torch.testing.assert_close(folded(x), net.eval()(x), rtol=0, atol=1e-12)
    # Both accumulation paths (direct per-example gradients and L×L Gram) are exercised here.
    layers = feed_forward_layers(net)
    acts = {}
    hooks = [
        layer.module.register_forward_hook(lambda m, a, o, i=i: acts.__setitem__(i, a[0]))
        for i, layer in enumerate(layers)
    ]
    net(x)
    for h in hooks:
        h.remove()
    modes = {_LayerAccumulator(layer, acts[i], 3).direct for i, layer in enumerate(layers) if acts[i].ndim > 2}
    assert modes == {True, False}

    traces = measures.layer_traces(net.train(), [(x[:4], y[:4]), (x[4:], None)])  # labels are not needed
    hess, numels = brute_hessian(folded, x, y)
    per_param = [float(d.sum()) for d in hess.diagonal().split(numels)]
    expected_w, expected_b = per_param[0::2], per_param[1::2]
    torch.testing.assert_close(traces.weight, torch.tensor(expected_w, dtype=DT), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(traces.bias, torch.tensor(expected_b, dtype=DT), rtol=1e-10, atol=1e-14)
    assert traces.count == 9
    assert traces.total == pytest.approx(float(hess.diagonal().sum()), rel=1e-10)
    assert measures.hessian_trace(net, [(x, y)], method="exact") == pytest.approx(float(hess.trace()), rel=1e-10)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=(2, 3), stride=2, padding=(1, 0)),
        dict(kernel_size=3, dilation=2, padding="same"),
        dict(kernel_size=4, padding="same"),  # even kernel: the extra padding goes right/bottom
        dict(kernel_size=3, padding="valid", stride=(1, 2)),
    ],
)
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_conv_patches_reproduce_the_convolution(kwargs):
    from callbacks.ggn import _conv_patches

    conv = nn.Conv2d(3, 5, bias=False, **kwargs).to(DT)
    a = torch.randn(2, 3, 9, 8, generator=_gen(0), dtype=DT)
    out = conv(a)
    patches = _conv_patches(conv, a)  # (N, C_in·kh·kw, L)
    torch.testing.assert_close(conv.weight.reshape(5, -1) @ patches, out.flatten(2), rtol=1e-12, atol=1e-12)


def test_layer_traces_of_a_traced_functional_chain_equal_the_sequential_one():
    class Functional(nn.Module):
        def __init__(self, seq):
            super().__init__()
            self.a, self.b = seq[0], seq[2]

        def forward(self, x):
            h = F.relu(self.a(x.view(x.size(0), -1)))
            return self.b(h)

    seq = mlp((5, 6, 3))
    x, _ = data(shape=(5,), classes=3)
    expected = measures.layer_traces(seq, [x])
    got = measures.layer_traces(Functional(seq), [x])
    torch.testing.assert_close(got.weight, expected.weight, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "net, words",
    [
        (nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), "not positively homogeneous"),
        (nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.BatchNorm1d(4), nn.Linear(4, 2)), "does not directly follow"),
        (nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)), "per-example statistics"),
        (nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2)), "groups=2"),
    ],
)
def test_minimum_sharpness_refuses_networks_without_alpha_symmetry(net, words):
    with pytest.raises(ValueError, match=words):
        measures.minimum_sharpness(net, [torch.randn(2, 3)])


def test_minimum_sharpness_refuses_residual_connections():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.b(x + F.relu(self.a(x)))

    with pytest.raises(ValueError, match="residual"):
        measures.minimum_sharpness(Residual(), [torch.randn(2, 3)])


# ---------------------------------------------------------------------------------------- minimum sharpness
def test_alpha_scale_transformation_changes_trace_not_minimum_sharpness():
    net = mlp()
    x, y = data(shape=(5,))
    scaled = scale_layers(net, (3.0, 0.5, 1 / 1.5))
    torch.testing.assert_close(scaled(x), net(x), rtol=1e-13, atol=1e-13)
    before, after = measures.layer_traces(net, [x]), measures.layer_traces(scaled, [x])
    assert abs(after.total / before.total - 1) > 0.05
    ms, ms_scaled = measures.minimum_sharpness(net, [(x, y)]), measures.minimum_sharpness(scaled, [(x, y)])
    assert ms <= before.total and ms_scaled == pytest.approx(ms, rel=1e-6)


def test_alpha_invariance_with_batchnorm_via_folding():
    net = cnn_bn()
    x, y = data()
    ms = measures.minimum_sharpness(net, [(x, y)])
    assert ms == pytest.approx(measures.minimum_sharpness(fold_bn(net), [(x, y)]), rel=1e-10)
    # α on the folded layers: layer 1 is conv+BN (scale γ by α₁ and set β so the folded bias scales by α₁),
    # layer 2 a conv, layer 3 the Linear on the last axis, then two Linear layers.
    alphas = (3.0, 0.5, 2.0, 0.8, 1 / (3.0 * 0.5 * 2.0 * 0.8))
    scaled = copy.deepcopy(net)
    with torch.no_grad():
        conv, bn = scaled[0], scaled[1]
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        folded_bias = (conv.bias - bn.running_mean) * s + bn.bias
        bn.weight.mul_(alphas[0])
        bn.bias.copy_(alphas[0] * folded_bias - alphas[0] * (conv.bias - bn.running_mean) * s)
        prod = alphas[0]
        for m, a in zip([scaled[4], scaled[6], scaled[9], scaled[12]], alphas[1:]):
            prod *= a
            m.weight.mul_(a)
            m.bias.mul_(prod)
    torch.testing.assert_close(scaled.eval()(x), net.eval()(x), rtol=1e-12, atol=1e-12)
    assert abs(measures.layer_traces(scaled, [x]).total / measures.layer_traces(net, [x]).total - 1) > 0.05
    assert measures.minimum_sharpness(scaled, [(x, y)]) == pytest.approx(ms, rel=1e-6)


def test_closed_form_without_biases():
    net = mlp(bias=False)
    x, _ = data(shape=(5,))
    traces = measures.layer_traces(net, [x])
    assert not any(traces.has_bias) and float(traces.bias.abs().sum()) == 0
    depth = len(traces.weight)
    closed = depth * float(torch.prod(traces.weight)) ** (1 / depth)
    assert measures.minimum_sharpness(net, [x]) == pytest.approx(closed, rel=1e-12)


def test_permuted_labels_leave_minimum_sharpness_unchanged():
    net = cnn_bn()
    x, y = data()
    perm = torch.randperm(len(y), generator=_gen(3))
    assert measures.minimum_sharpness(net, [(x, y)]) == measures.minimum_sharpness(net, [(x, y[perm])])


def _scipy_minimum(t, b):
    depth = len(t)

    def f(u_free):
        u = np.append(u_free, -u_free.sum())
        return float(np.sum(t * np.exp(-2 * u)) + np.sum(b * np.exp(-2 * np.cumsum(u))))

    res = scipy.optimize.minimize(f, np.zeros(depth - 1), method="BFGS", options={"gtol": 1e-13, "maxiter": 10_000})
    return res.fun


def test_exact_alpha_solver_matches_scipy_with_biases():
    rng = np.random.default_rng(0)
    for depth in (2, 3, 5):
        t = rng.uniform(0.01, 3.0, depth)
        b = rng.uniform(0.0, 1.0, depth)
        exact = measures.minimize_scaled_trace(t, b)
        assert exact == pytest.approx(_scipy_minimum(t, b), rel=1e-8)
        assert exact <= measures.scaled_trace(t, b, [1.0] * depth)


def _reference_sgd(t, b, lr, steps, decay):
    """The original solver, written from its description: torch SGD on log α with LambdaLR."""
    scale = float(sum(t) + sum(b))
    t = [v / scale for v in t]
    b = [v / scale for v in b]
    exponent = torch.zeros(len(t) - 1, dtype=DT, requires_grad=True)
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


def test_sgd_solver_reproduces_the_original_algorithm_and_approaches_the_exact_minimum():
    t, b = [0.7, 2.0, 0.3, 1.1], [0.05, 0.2, 0.0, 0.4]
    ours = measures.minimize_scaled_trace(t, b, solver="sgd", lr=0.1, steps=300, decay=1e-3)
    assert ours == pytest.approx(_reference_sgd(t, b, 0.1, 300, 1e-3), rel=1e-12)
    exact = measures.minimize_scaled_trace(t, b)
    long = measures.minimize_scaled_trace(t, b, solver="sgd", lr=0.5, steps=20_000)
    assert exact * (1 - 1e-12) <= long <= exact * (1 + 1e-6)
    with pytest.raises(FloatingPointError, match="diverged"):
        measures.minimize_scaled_trace([1e-3, 5.0, 1e-3], None, solver="sgd", lr=1e4, steps=100)
    assert math.isfinite(measures.minimize_scaled_trace([1.0, 2.0], None, solver="sgd", lr=20.0, steps=50, retries=6))


# ---------------------------------------------------------------------------------------- Hessian
class Quadratic(nn.Module):
    def __init__(self, n, seed=0):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n, generator=_gen(seed), dtype=DT))

    def forward(self, x):
        return self.w


def _quadratic_loss(a):
    return lambda w, _: 0.5 * w @ a @ w


def test_quadratic_loss_top_eigenvalues_and_trace():
    n = 30
    m = torch.randn(n, n, generator=_gen(1), dtype=DT)
    a = (m + m.T) / 2  # indefinite: top-k are the largest algebraic eigenvalues
    batches = [(torch.zeros(1), None)]
    got = measures.hessian_eigenvalues(Quadratic(n), batches, k=4, loss_fn=_quadratic_loss(a), tol=1e-10)
    expected = np.sort(np.linalg.eigvalsh(a.numpy()))[::-1][:4]
    np.testing.assert_allclose(got, expected, rtol=1e-8)
    diag = torch.diag(torch.linspace(-1, 3, n, dtype=DT))
    est = measures.hutchinson_trace(Quadratic(n), batches, n_probes=7, loss_fn=_quadratic_loss(diag))
    assert est.value == pytest.approx(float(diag.trace()), rel=1e-12)  # Rademacher: vᵀDv = tr D exactly
    est = measures.hutchinson_trace(Quadratic(n), batches, n_probes=400, loss_fn=_quadratic_loss(a), seed=5)
    assert abs(est.value - float(a.trace())) < 4 * est.stderr
    assert est.stderr > 0


def test_network_hessian_eigenvalues_and_trace_match_dense():
    net = mlp((5, 6, 4))
    x, y = data(n=12, shape=(5,))
    hess, _ = brute_hessian(net, x, y)
    dense = torch.linalg.eigvalsh(hess).flip(0)
    got = measures.hessian_eigenvalues(net, [(x[:6], y[:6]), (x[6:], y[6:])], k=2, tol=1e-10, cache_graphs=False)
    np.testing.assert_allclose(got, dense[:2].numpy(), rtol=1e-7)
    est = measures.hutchinson_trace(net, [(x[:6], y[:6]), (x[6:], y[6:])], n_probes=300)
    assert abs(est.value - float(hess.trace())) < 4 * est.stderr
    assert measures.hessian_trace(net, [(x, y)], method="exact") == pytest.approx(float(hess.trace()), rel=1e-10)


# ---------------------------------------------------------------------------------------- adaptive sharpness
def test_apgd_checkpoints_as_in_the_reference_code():
    assert apgd_checkpoints(20) == [5, 9, 12, 15, 16, 18, 19, 20]


def test_ellipsoid_projection_matches_the_kkt_solution():
    v = torch.randn(40, generator=_gen(0), dtype=DT)
    c = torch.rand(40, generator=_gen(1), dtype=DT)
    c[:3] = 0.0  # zero weights cannot move
    rho = 0.3
    got = _project_ellipsoid(v, rho, c)
    vv, cc = v[3:].numpy(), c[3:].numpy()
    lam = scipy.optimize.brentq(lambda l: np.sum((vv * cc / (cc**2 + l)) ** 2) - rho**2, 0, 1e6, xtol=1e-15)
    np.testing.assert_allclose(got[3:].numpy(), vv * cc**2 / (cc**2 + lam), rtol=1e-9)
    assert torch.all(got[:3] == 0)
    inside = 0.01 * v * c
    assert torch.equal(_project_ellipsoid(inside, rho, c), torch.where(c > 0, inside, 0.0))


def _ratio(rho, **kw):
    net = mlp()
    x, y = data(n=16, shape=(5,))
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    first = measures.gradient_norm_sharpness(net, batches, rho, p=kw["p"], adaptive=kw["adaptive"])
    return measures.adaptive_sharpness(net, batches, rho, **kw) / first


@pytest.mark.parametrize("p, adaptive", [(math.inf, True), (math.inf, False), (2.0, False)])
def test_adaptive_sharpness_approaches_first_order_value_as_rho_vanishes(p, adaptive):
    far, near = abs(_ratio(1e-2, p=p, adaptive=adaptive) - 1), abs(_ratio(1e-5, p=p, adaptive=adaptive) - 1)
    assert near < 1e-3 and near < far


def test_apgd_is_never_negative_and_pga_can_be():
    net = mlp(seed=4)
    x, y = data(n=16, shape=(5,), seed=7)
    batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 16, 4)]
    for rho, step in [(0.5, None), (2.0, 50.0), (0.05, 1e-4)]:
        for p in (2.0, math.inf):
            values = measures.adaptive_sharpness_per_batch(net, batches, rho, p=p, step_size=step, n_iters=7)
            assert min(values) >= 0
    # L(w) = sin(w) at w = 0: a step of 5 along the gradient lands at sin(5) < 0 = L(0) (APGD: 0.75·5, also < 0).
    # PGA reports the failed ascent (seed 002: "PGA will occasionally fail"); APGD counts δ = 0 in its iterates.
    sine = Quadratic(1)
    with torch.no_grad():
        sine.w.zero_()
    kw = dict(p=math.inf, adaptive=False, n_iters=1, step_size=5.0, loss_fn=lambda w, _: torch.sin(w).sum())
    assert measures.adaptive_sharpness(sine, [(torch.zeros(1), None)], 10.0, method="pga", **kw) == \
        pytest.approx(math.sin(5.0), rel=1e-12)
    assert measures.adaptive_sharpness(sine, [(torch.zeros(1), None)], 10.0, method="apgd", **kw) == 0.0


def test_adaptive_linf_sharpness_is_invariant_to_relu_rescaling():
    net = mlp()
    x, y = data(n=16, shape=(5,))
    scaled = copy.deepcopy(net)
    with torch.no_grad():
        scaled[0].weight.mul_(7.0)
        scaled[0].bias.mul_(7.0)
        scaled[2].weight.div_(7.0)
    torch.testing.assert_close(scaled(x), net(x), rtol=1e-13, atol=1e-13)
    # (APGD-L∞ steps along sign(g) ⊙ |w|, which is equivariant; the L2 direction g/‖g‖₂ ⊙ |w| of the
    # reference is not, and neither is PGA's plain η·∇L step.)
    a = measures.adaptive_sharpness(net, [(x, y)], 0.05, p=math.inf)
    b = measures.adaptive_sharpness(scaled, [(x, y)], 0.05, p=math.inf)
    assert a > 0 and b == pytest.approx(a, rel=1e-8)


def _reference_apgd(net, x, y, rho, n_iters, p, adaptive):
    """APGD with the iterate reset to the best point at a halving (``method="apgd_reset"``), for one batch.

    The authors' own loop (``method="apgd"``) is re-implemented from their code in test_apgd_reference.py.
    """
    names, shapes, numels, w0 = flat_params(net)
    c = w0.abs() if adaptive else torch.ones_like(w0)

    def loss_grad(d):
        d = d.clone().requires_grad_(True)
        views = [t.view(s) for t, s in zip((w0 + d).split(numels), shapes)]
        loss = F.cross_entropy(functional_call(net, dict(zip(names, views)), (x,)), y)
        return float(loss.detach()), torch.autograd.grad(loss, d)[0]

    def proj(d):
        if p == math.inf:
            return torch.clamp(d, -rho * c, rho * c)
        return _project_ellipsoid(d, rho, c) if adaptive else d * min(1.0, rho / float(d.norm()))

    def direction(g):
        return (g.sign() if p == math.inf else g / (g.norm() + 1e-12)) * c

    loss0, g = loss_grad(torch.zeros_like(w0))
    delta = prev = torch.zeros_like(w0)
    best, best_delta, best_g, step = loss0, delta, g, 2 * rho
    prev_step, prev_best, prev_cp, count = step, best, 0, 0
    checks = apgd_checkpoints(n_iters)
    for i in range(n_iters):
        delta, prev = 0.75 * proj(delta + step * direction(g)) + 0.25 * prev, delta
        loss, g = loss_grad(delta)
        if loss > best:
            best, best_delta, best_g, count = loss, delta, g, count + 1
        if i in checks:
            halve = count < 0.75 * (i - prev_cp) or (prev_step == step and prev_best == best)
            prev_step, prev_best, prev_cp, count = step, best, i, 0
            if halve:
                step, delta, prev, g = step / 2, best_delta, best_delta, best_g
    return best - loss0


@pytest.mark.parametrize("p, adaptive", [(math.inf, True), (2.0, True), (2.0, False)])
def test_apgd_reset_matches_a_straightforward_implementation(p, adaptive):
    net = mlp(seed=2).eval()
    x, y = data(n=8, shape=(5,), seed=3)
    expected = _reference_apgd(net, x, y, 0.2, 20, p, adaptive)
    got = measures.adaptive_sharpness(net, [(x, y)], 0.2, p=p, adaptive=adaptive, n_iters=20, method="apgd_reset")
    assert got == pytest.approx(expected, rel=1e-10)


def test_pga_matches_seed_002_protocol():
    net = mlp(seed=5).eval()
    x, y = data(n=8, shape=(5,), seed=6)
    names, shapes, numels, w0 = flat_params(net)
    c, rho, lr = w0.abs(), 0.1, 0.3

    def loss_grad(d):
        d = d.clone().requires_grad_(True)
        views = [t.view(s) for t, s in zip((w0 + d).split(numels), shapes)]
        loss = F.cross_entropy(functional_call(net, dict(zip(names, views)), (x,)), y)
        return float(loss.detach()), torch.autograd.grad(loss, d)[0]

    loss0, g = loss_grad(torch.zeros_like(w0))
    delta, losses = torch.zeros_like(w0), []
    for _ in range(5):
        delta = torch.clamp(delta + lr * g, -rho * c, rho * c)
        loss, g = loss_grad(delta)
        losses.append(loss)
    got = measures.adaptive_sharpness(net, [(x, y)], rho, method="pga", step_size=lr, n_iters=5)
    assert got == pytest.approx(max(losses) - loss0, rel=1e-12)


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
        assert float(measures.gradient_norm(grads, list(net.parameters()), rho=0.05, p=p, adaptive=adaptive)) == \
            pytest.approx(expected[-1], rel=1e-12)
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
        net, b, 0.05, p=2, method="pga", step_size=0.1, n_iters=3, **kw),
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

    from callbacks.inputs import masked_cross_entropy, node_inputs

    class Gat(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = GATConv(6, 4, heads=2), GATConv(8, 3)

        def forward(self, x, edge_index):
            return self.b(F.elu(self.a(x, edge_index)), edge_index)

    g = _gen(0)
    graph = torch_geometric.data.Data(
        x=torch.randn(12, 6, generator=g), edge_index=torch.randint(0, 12, (2, 30), generator=g),
        y=torch.randint(0, 3, (12,), generator=g), train_mask=torch.arange(12) < 5,
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
    from callbacks.inputs import mse_loss

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
        "import torch, callbacks.measures as m\n"
        "net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))\n"
        "print(m.minimum_sharpness(net, [torch.randn(5, 3)]) > 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
