"""Hessian eigenvalues and traces (flatminima.callbacks.hessian through flatminima.callbacks.measures) against dense eigendecompositions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flatminima.callbacks import measures
from tests.measure_nets import DT, Quadratic, brute_hessian, data, gen, mlp

pytestmark = pytest.mark.usefixtures("one_thread")


def _quadratic_loss(a):
    return lambda w, _: 0.5 * w @ a @ w


def test_quadratic_loss_top_eigenvalues_and_trace():
    n = 30
    m = torch.randn(n, n, generator=gen(1), dtype=DT)
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
