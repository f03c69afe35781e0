"""Minimum sharpness and its α solve (flatminima.callbacks.alpha_scaling) against closed forms, scipy and the original solver."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import scipy.optimize
import torch

from flatminima.callbacks import measures
from tests.measure_nets import cnn_bn, data, fold_bn, gen, mlp, scale_layers
from tests.reference_alpha import reference_sgd_solve

pytestmark = pytest.mark.usefixtures("one_thread")


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
    perm = torch.randperm(len(y), generator=gen(3))
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


def test_sgd_solver_reproduces_the_original_algorithm_and_approaches_the_exact_minimum():
    t, b = [0.7, 2.0, 0.3, 1.1], [0.05, 0.2, 0.0, 0.4]
    ours = measures.minimize_scaled_trace(t, b, solver="sgd", lr=0.1, steps=300, decay=1e-3)
    assert ours == pytest.approx(reference_sgd_solve(t, b, lr=0.1, steps=300, decay=1e-3), rel=1e-12)
    exact = measures.minimize_scaled_trace(t, b)
    long = measures.minimize_scaled_trace(t, b, solver="sgd", lr=0.5, steps=20_000)
    assert exact * (1 - 1e-12) <= long <= exact * (1 + 1e-6)
    with pytest.raises(FloatingPointError, match="diverged"):
        measures.minimize_scaled_trace([1e-3, 5.0, 1e-3], None, solver="sgd", lr=1e4, steps=100)
    assert math.isfinite(measures.minimize_scaled_trace([1.0, 2.0], None, solver="sgd", lr=20.0, steps=50, retries=6))
