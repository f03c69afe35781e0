"""Exact per-layer cross-entropy Hessian traces (flatminima.callbacks.per_layer_traces) against brute-force Hessians.

Also the refusal of networks without the α-scale symmetry that the traces assume.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatminima.callbacks import measures
from flatminima.callbacks.per_layer_traces import _ce_hessian_factor, _LayerAccumulator, feed_forward_layers
from tests.measure_nets import DT, brute_hessian, cnn_bn, data, fold_bn, gen, mlp

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------- CE Hessian in the logits
def test_ce_hessian_factor_squares_to_softmax_hessian():
    logits = torch.randn(6, 5, generator=gen(0), dtype=DT) * 3
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
    from flatminima.callbacks.per_layer_traces import _conv_patches

    conv = nn.Conv2d(3, 5, bias=False, **kwargs).to(DT)
    a = torch.randn(2, 3, 9, 8, generator=gen(0), dtype=DT)
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
