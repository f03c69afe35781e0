"""Jiang et al. (2020)'s flatness, sharpness and norm measures and their neighbours, as pure functions.

Oracles: closed forms (the accuracy of a noisy linear classifier, the expected loss increase of a
quadratic, Gaussian KL divergences via torch.distributions, scipy's root finder), brute force (numpy SVDs
and sorts, the explicit sum over all paths of a tiny network, per-example autograd gradients), invariances
(BatchNorm folding leaves the function unchanged) and bit-for-bit snapshots of the model.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import optimize, stats
from torch import nn

from flatminima.callbacks import measures
from flatminima.callbacks.noise_search import bisect_radius, sample_seeds, standard_noise
from flatminima.callbacks.pac_bayes_bounds import pac_bayes_bound, pac_bayes_mag_bound
from tests.helpers import bn_mlp
from tests.measure_nets import DT, Quadratic, cnn_bn, data, gen, mlp
from tests.test_measures import _assert_same, _snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------- the bisection
def test_bisection_brackets_the_crossing_and_counts_its_evaluations():
    calls = []

    def drop(r, k):
        calls.append((r, k))
        return r**2 + 0.001 * k  # mean over k = 0..3 is r² + 0.0015

    found = bisect_radius(drop, 0.1, samples=4, depth=12, lower=0.0, upper=2.0)
    crossing = math.sqrt(0.1 - 0.0015)
    assert found.lower <= crossing <= found.upper and found.upper - found.lower == pytest.approx(2.0 / 2**12)
    assert abs(found.radius - crossing) <= 2.0 / 2**13
    assert found.evaluations == len(calls) == 12 * 4 and found.probes == 12
    assert {k for _, k in calls} == {0, 1, 2, 3}
    # tol: the first probe within tol of the target is returned; max: a probe stops at the first sample over it.
    stop = bisect_radius(lambda r, k: r**2, 0.1, samples=3, depth=30, tol=0.05)
    assert abs(stop.drop - 0.1) <= 0.05 and stop.probes < 30
    calls.clear()
    worst = bisect_radius(drop, 0.1, samples=4, depth=10, combine="max")
    assert worst.evaluations == len(calls) < 10 * 4
    assert abs(worst.radius - math.sqrt(0.1 - 0.003)) <= 2.0 / 2**11
    # log: geometric means, a relative bracket (upper/lower)^(2^-depth) around the crossing.
    geometric = bisect_radius(lambda r, k: r**2, 0.1, samples=1, depth=12, lower=1e-6, upper=2.0, scale="log")
    assert geometric.lower <= math.sqrt(0.1) <= geometric.upper
    assert geometric.upper / geometric.lower == pytest.approx(2e6 ** (2.0**-12), rel=1e-9)
    assert abs(math.log(geometric.radius / math.sqrt(0.1))) <= math.log(2e6) / 2**13


def test_noise_draws_are_seeded_per_sample_and_match_their_distribution():
    seeds = sample_seeds(7, 3)
    assert seeds == sample_seeds(7, 3) and len(set(seeds)) == 3
    z = standard_noise(seeds[0], 200_000, "gaussian", device=torch.device("cpu"), dtype=DT)
    u = standard_noise(seeds[0], 200_000, "uniform", device=torch.device("cpu"), dtype=DT)
    assert torch.equal(z, standard_noise(seeds[0], 200_000, "gaussian", device=torch.device("cpu"), dtype=DT))
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    assert float(u.min()) >= -1 and float(u.max()) <= 1 and abs(float(u.var()) - 1 / 3) < 0.005


# ---------------------------------------------------------------------------------------- PAC-Bayes σ′
def _separable(n=200, d=200, seed=0):
    """A 2-logit linear classifier W = [0; v], b = 0 and points labelled by it (every margin |v·x| > 0)."""
    g = gen(seed)
    x = torch.randn(n, d, generator=g, dtype=DT)
    v = torch.randn(d, generator=g, dtype=DT)
    v /= v.norm()
    net = nn.Linear(d, 2).to(DT)
    with torch.no_grad():
        net.weight.zero_()
        net.weight[1] = v
        net.bias.zero_()
    y = (x @ v > 0).long()
    return net, x, y, (x @ v).abs()


def test_pac_bayes_sigma_of_a_linear_classifier_matches_the_closed_form():
    # Noise u ~ N(0, σ²) on the 2d + 2 parameters moves example i's margin m_i by (u_y − u_o)·x_i + (u_by − u_bo)
    # ~ N(0, 2σ²(‖x_i‖² + 1)): it is misclassified with probability Φ(−m_i / (σ √(2(‖x_i‖² + 1)))). The clean
    # accuracy is 1, so the expected drop is the mean of these; σ* solves drop(σ) = 0.1 (scipy's brentq).
    net, x, y, m = _separable()
    s = np.sqrt(2 * ((x**2).sum(1) + 1).numpy())
    m = m.numpy()

    def expected_drop(sigma):
        return stats.norm.cdf(-m / (sigma * s)).mean()

    sigma_star = optimize.brentq(lambda t: expected_drop(t) - 0.1, 1e-6, 2.0, xtol=1e-12)
    depth, samples = 12, 64
    found = measures.pac_bayes_sigma(
        net, [(x[:100], y[:100]), (x[100:], y[100:])], depth=depth, samples=samples, tol=0.0, seed=3
    )
    # The search brackets the crossing of its Monte-Carlo drop (the same draws at every probe: monotone in σ
    # for a linear classifier) within 2/2^(depth+1); that crossing differs from σ* by the Monte-Carlo error
    # of a mean of `samples` draws, which an independent numpy simulation sizes (4 standard errors, over the
    # slope of the closed form).
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((2000, 2 * x.shape[1] + 2)) * sigma_star
    xa = np.hstack([x.numpy(), np.ones((len(x), 1))])
    shift = (noise[:, : x.shape[1] + 1] - noise[:, x.shape[1] + 1 :]) @ xa.T  # (draws, n): u_0 − u_1 on [x, 1]
    sign = np.where(y.numpy() == 1, -1.0, 1.0)
    per_draw = (m[None, :] + sign[None, :] * shift < 0).mean(1)
    assert per_draw.mean() == pytest.approx(0.1, abs=0.01)  # the closed form, by simulation
    slope = (expected_drop(sigma_star * 1.001) - expected_drop(sigma_star * 0.999)) / (0.002 * sigma_star)
    tolerance = 2.0 / 2 ** (depth + 1) + 4 * per_draw.std() / math.sqrt(samples) / slope
    assert abs(found.radius - sigma_star) <= tolerance, (found, sigma_star, tolerance)
    assert found.evaluations == depth * samples


def _counting(net):
    calls = {"n": 0}
    net.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    return calls


@pytest.mark.parametrize("magnitude_eps", [None, 1e-3])
def test_the_bisection_measures_never_exceed_depth_times_samples_evaluations(magnitude_eps):
    batches = [(x, y) for x, y in [data(n=8, shape=(5,), seed=s) for s in (1, 2, 3)]]
    net = mlp(widths=(5, 6, 4))
    calls = _counting(net)
    found = measures.pac_bayes_sigma(net, batches, depth=6, samples=5, magnitude_eps=magnitude_eps, tol=0.0)
    assert found.evaluations == 30 and calls["n"] == (1 + 30) * len(batches)  # one clean pass, then the draws
    calls["n"] = 0
    found = measures.sharpness_alpha(net, batches, depth=6, restarts=4, steps=3, magnitude_eps=magnitude_eps, tol=0.0)
    assert found.evaluations <= 6 * 4
    assert calls["n"] <= (1 + found.evaluations * (3 + 1)) * len(batches)


def test_worst_case_radius_never_exceeds_the_average_case_radius_of_the_same_box():
    # At any radius the worst start (lowest accuracy along its ascent path, the start included) drops the
    # accuracy at least as much as the mean over the same starts drawn uniformly in the box, so the
    # worst-case α′ ≤ the average-case one (worst-case sharpness 1/α′² ≥ average-case 1/α′²).
    x, y = data(n=60, shape=(5,), seed=4)
    net = mlp(widths=(5, 16, 4), seed=1)
    with torch.no_grad():
        y = net(x).argmax(1)  # clean accuracy 1
    batches = [(x[:30], y[:30]), (x[30:], y[30:])]
    for eps in (None, 1e-3):
        search = dict(depth=10, tol=0.0, seed=5, magnitude_eps=eps, lower=1e-6, upper=2.0, scale="log")
        worst = measures.sharpness_alpha(net, batches, restarts=4, steps=3, **search)
        average = measures.pac_bayes_sigma(net, batches, samples=4, distribution="uniform", **search)
        assert worst.radius <= average.radius and worst.radius < 0.9 * average.radius, (eps, worst, average)
    # The same order for the loss (Andriushchenko et al. 2023): worst-case adaptive L∞ sharpness ≥ average-case.
    assert (
        measures.adaptive_sharpness(net, batches, 0.05)
        > measures.average_sharpness(net, batches, 0.05, p=math.inf, samples=10).value
    )


# ---------------------------------------------------------------------------------------- PAC-Bayes bounds
def _diag_normal(mean, var):
    return torch.distributions.Independent(torch.distributions.Normal(mean, var.sqrt()), 1)


def test_pac_bayes_bounds_are_half_the_kl_plus_the_paper_terms():
    g = gen(2)
    w, w0 = torch.randn(40, generator=g, dtype=DT), torch.randn(40, generator=g, dtype=DT)
    sigma, eps, m = 0.3, 1e-3, 500
    extra = math.log(m / sigma) + 10
    kl = torch.distributions.kl_divergence(
        _diag_normal(w, torch.full_like(w, sigma**2)), _diag_normal(w0, torch.full_like(w, sigma**2))
    )
    assert pac_bayes_bound(float((w - w0).square().sum()), sigma, m) - extra == pytest.approx(float(kl) / 2, rel=1e-12)
    posterior = _diag_normal(w, sigma**2 * w**2 + eps**2)
    for ref in (w0, torch.zeros_like(w)):
        best = (40 * eps**2 + sigma**2 * float(w.square().sum()) + float((w - ref).square().sum())) / 40
        kls = [
            float(torch.distributions.kl_divergence(posterior, _diag_normal(ref, torch.full_like(w, best * f))))
            for f in (0.9, 1.0, 1.1)
        ]
        assert kls[1] < min(kls[0], kls[2])  # the prior variance of the bound minimizes the KL
        assert pac_bayes_mag_bound(w, ref, sigma, eps, m) - extra == pytest.approx(kls[1] / 2, rel=1e-10)


def test_pac_bayes_measures_are_the_bounds_of_the_searched_sigmas():
    x, y = data(n=40, shape=(5,), seed=6)
    net = mlp(widths=(5, 8, 4))
    batches = [(x[:20], y[:20]), (x[20:], y[20:])]
    initial = {k: v + 0.1 for k, v in net.state_dict().items()}
    values = measures.pac_bayes(net, batches, initial=initial, m=1000, depth=8, samples=3, seed=1)
    sigma = measures.pac_bayes_sigma(net, batches, depth=8, samples=3, seed=1).radius
    mag = measures.pac_bayes_sigma(net, batches, depth=8, samples=3, seed=1, magnitude_eps=1e-3).radius
    w = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    w0 = torch.cat([initial[n].reshape(-1) for n, _ in net.named_parameters()])
    assert values["pac_bayes_flatness"] == 1 / sigma**2 and values["pac_bayes_mag_flatness"] == 1 / mag**2
    assert values["pac_bayes_init"] == pytest.approx(
        math.sqrt(((w - w0).square().sum() / (4 * sigma**2) + math.log(1000 / sigma) + 10) / 1000), rel=1e-12
    )
    assert values["pac_bayes_orig"] == pytest.approx(
        math.sqrt((w.square().sum() / (4 * sigma**2) + math.log(1000 / sigma) + 10) / 1000), rel=1e-12
    )
    assert values["pac_bayes_mag_init"] == pytest.approx(
        math.sqrt(pac_bayes_mag_bound(w, w0, mag, 1e-3, 1000) / 1000), rel=1e-12
    )
    assert set(measures.pac_bayes(net, batches, variant="magnitude", depth=2, samples=1)) == {
        "pac_bayes_mag_flatness",
        "pac_bayes_mag_orig",
    }


# ---------------------------------------------------------------------------------------- average case
@pytest.mark.parametrize("p, variance", [(2.0, 1.0), (math.inf, 1 / 3)])
def test_average_sharpness_of_a_quadratic_and_its_standard_error(p, variance):
    # L(w) = ½ Σ a_i w_i²: E L(w + δ) − L(w) = ½ Σ a_i Var δ_i, Var δ_i = ρ² c_i² (Gaussian) or ρ² c_i²/3 (uniform).
    net = Quadratic(30, seed=1)
    a = torch.rand(30, generator=gen(2), dtype=DT) + 0.5

    def loss(out, _):
        return 0.5 * (a * out**2).sum()

    batches = [(torch.zeros(1, dtype=DT), torch.zeros(1))]
    w = net.w.detach()
    for adaptive, c in ((False, torch.ones_like(w)), (True, w.abs())):
        expected = float(0.5 * (a * c**2).sum() * 0.1**2 * variance)
        runs = [
            measures.average_sharpness(net, batches, 0.1, p=p, adaptive=adaptive, samples=20, seed=s, loss_fn=loss)
            for s in range(60)
        ]
        values = np.array([r.value for r in runs])
        assert abs(values.mean() - expected) < 4 * values.std() / math.sqrt(len(values))
        # The reported standard error is the spread of the estimate over seeds (within sampling error).
        assert np.mean([r.stderr for r in runs]) == pytest.approx(values.std(ddof=1), rel=0.3)


# ---------------------------------------------------------------------------------------- norms
def _paths(net: nn.Sequential, x: torch.Tensor) -> float:
    """Σ over every input→output path (a bias is an edge from a constant unit) of ∏ w², written out."""
    layers = [m for m in net if isinstance(m, nn.Linear)]
    weights, biases = [m.weight.detach() for m in layers], [m.bias.detach() for m in layers]
    widths = [layers[0].in_features] + [m.out_features for m in layers]
    total = 0.0
    for start in range(len(layers) + 1):  # 0: paths from the inputs; s ≥ 1: from layer s's bias
        for nodes in itertools.product(*[range(w) for w in widths[start:]]):
            value = float(x[nodes[0]] ** 2) if start == 0 else float(biases[start - 1][nodes[0]] ** 2)
            for layer, (i, j) in enumerate(zip(nodes[:-1], nodes[1:]), start=start):
                value *= float(weights[layer][j, i] ** 2)
            total += value
    return total


def test_norms_margins_and_path_norm_against_brute_force():
    net = mlp(widths=(3, 4, 4, 2), seed=2)
    init = mlp(widths=(3, 4, 4, 2), seed=5)
    x, y = data(n=23, shape=(3,), classes=2, seed=7)
    got = measures.norm_measures(net, [(x[:10], y[:10]), (x[10:], y[10:])], initial=init.state_dict())
    weights = [m.weight.detach().numpy() for m in net if isinstance(m, nn.Linear)]
    starts = [m.weight.detach().numpy() for m in init if isinstance(m, nn.Linear)]
    spec = np.array([np.linalg.svd(w, compute_uv=False)[0] ** 2 for w in weights])
    fro = np.array([(w**2).sum() for w in weights])
    logits = net(x).detach().numpy()
    margin = logits[np.arange(23), y.numpy()] - logits[np.arange(23), 1 - y.numpy()]
    gamma = abs(np.sort(margin)[23 // 10 - 1])  # the ⌊n/10⌋-th smallest
    d = 3
    expected = {
        "params": 4 * 3 + 4 + 4 * 4 + 4 + 2 * 4 + 2,
        "inverse_margin": 1 / gamma**2,
        "log_prod_spec": np.log(spec).sum(),
        "log_prod_spec_over_margin": np.log(spec).sum() - 2 * np.log(gamma),
        "log_sum_spec": np.log(d) + np.log(spec).sum() / d,
        "log_sum_spec_over_margin": np.log(d) + (np.log(spec).sum() - 2 * np.log(gamma)) / d,
        "log_prod_fro": np.log(fro).sum(),
        "log_sum_fro_over_margin": np.log(d) + (np.log(fro).sum() - 2 * np.log(gamma)) / d,
        "fro_over_spec": (fro / spec).sum(),
        "param_norm": fro.sum(),
        "fro_dist": sum(((w - w0) ** 2).sum() for w, w0 in zip(weights, starts)),
        "dist_spec_init": sum(np.linalg.svd(w - w0, compute_uv=False)[0] ** 2 for w, w0 in zip(weights, starts)),
        "path_norm": _paths(net, torch.ones(3, dtype=DT)),
    }
    expected["path_norm_over_margin"] = expected["path_norm"] / gamma**2
    for key, value in expected.items():
        assert got[key] == pytest.approx(float(value), rel=1e-10), key


def test_spectral_norm_of_a_convolution_is_that_of_its_reshaped_kernel():
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).to(DT)
    x, y = data(n=12, shape=(2, 6, 6), classes=2)
    got = measures.norm_measures(net, [(x, y)])
    kernel = net[0].weight.detach().numpy().reshape(3, -1)
    linear = net[3].weight.detach().numpy()
    expected = np.log(np.linalg.svd(kernel, compute_uv=False)[0] ** 2) + np.log(
        np.linalg.svd(linear, compute_uv=False)[0] ** 2
    )
    assert got["log_prod_spec"] == pytest.approx(expected, rel=1e-10)


# ---------------------------------------------------------------------------------------- BatchNorm folding
class Branchy(nn.Module):
    """Not an nn.Sequential: conv → BN inside a forward that torch.fx traces; one BN that cannot be folded."""

    def __init__(self, fold_all: bool = True) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv, self.bn = nn.Conv2d(2, 3, 3, bias=False), nn.BatchNorm2d(3)
        self.fc, self.bn1 = nn.Linear(3 * 6 * 6, 4), nn.BatchNorm1d(4)
        self.post = nn.BatchNorm1d(4) if not fold_all else nn.Identity()

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.post(torch.relu(self.bn1(self.fc(h.flatten(1)))))


def _randomize_bn(net):
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return net


@pytest.mark.parametrize(
    "make, shape",
    [(cnn_bn, (2, 8, 8)), (lambda: bn_mlp(in_features=5), (5,)), (lambda: _randomize_bn(Branchy().to(DT)), (2, 8, 8))],
)
def test_batchnorm_folding_leaves_the_function_unchanged(make, shape):
    net = make()
    net.train()
    x = torch.randn(7, *shape, generator=gen(0), dtype=DT)
    snap = _snapshot(net)
    folded = measures.fold_batchnorm(net)
    _assert_same(net, snap)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert torch.allclose(folded(x), net.eval()(x), rtol=1e-12, atol=1e-12)


def test_a_batchnorm_that_follows_no_layer_is_refused():
    net = Branchy(fold_all=False).to(DT)
    with pytest.raises(ValueError, match=r"post \(BatchNorm1d\) does not directly follow a Linear/Conv layer"):
        measures.fold_batchnorm(net)
    after_relu = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"^Invalid model for BatchNorm folding: 2 \(BatchNorm1d\)"):
        measures.fold_batchnorm(after_relu)


# ---------------------------------------------------------------------------------------- Fisher–Rao
def test_fisher_rao_norm_against_per_example_gradients_and_liang_et_al_identity():
    x, y = data(n=11, shape=(5,), seed=8)
    net = mlp(widths=(5, 7, 6, 4), seed=3)
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    params = list(net.parameters())
    inner = []
    for i in range(11):
        grads = torch.autograd.grad(F.cross_entropy(net(x[i : i + 1]), y[i : i + 1]), params)
        inner.append(float(sum((g * p).sum() for g, p in zip(grads, params))))
    assert measures.fisher_rao_norm(net, batches) == pytest.approx(np.mean(np.square(inner)), rel=1e-10)
    # Liang et al. (2019), Lemma 2.1: without biases, ⟨w, ∇_w ℓ⟩ = (L + 1)⟨∂ℓ/∂f, f⟩ for L + 1 = 3 layers.
    plain = mlp(widths=(5, 7, 6, 4), bias=False, seed=3)
    out = plain(x).detach().requires_grad_(True)
    (dl,) = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), out)
    expected = float(((3 * (dl * out).sum(1)) ** 2).mean())
    assert measures.fisher_rao_norm(plain, batches) == pytest.approx(expected, rel=1e-10)


# ---------------------------------------------------------------------------------------- no trace, bad input
NEW = {
    "pac_bayes": lambda net, b, **kw: measures.pac_bayes(net, b, depth=3, samples=2, **kw),
    "sharpness_alpha": lambda net, b, **kw: measures.sharpness_alpha(net, b, depth=2, restarts=2, steps=2, **kw).radius,
    "average": lambda net, b, **kw: measures.average_sharpness(net, b, 0.1, samples=3, **kw).value,
    "norms": lambda net, b, **kw: measures.norm_measures(
        net, b, initial={k: v / 2 for k, v in net.state_dict().items()}
    ),
    "fisher_rao": lambda net, b, **kw: measures.fisher_rao_norm(net, b, **kw),
    "loss_and_accuracy": lambda net, b, **kw: measures.loss_and_accuracy(net, b, kw.get("loss_fn", F.cross_entropy)),
}


@pytest.mark.parametrize("name", list(NEW))
def test_new_measures_leave_the_model_bit_identical_also_on_exceptions(name):
    net = cnn_bn().float()
    net.train()
    net[1].eval()
    x, y = data()
    x = x.float()
    for i, p in enumerate(net.parameters()):
        p.grad = None if i % 3 == 0 else torch.randn_like(p)
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    snap = _snapshot(net)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = NEW[name](net, batches)
    _assert_same(net, snap)
    assert value == NEW[name](net, batches)
    with pytest.raises((RuntimeError, ValueError)):
        NEW[name](net, [(x[:5], y[:5]), (x[5:, :1], y[5:])])  # the second batch has the wrong shape
    _assert_same(net, snap)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda net, b: measures.pac_bayes_sigma(net, b, target=0.0), "Invalid target: 0.0"),
        (lambda net, b: measures.pac_bayes_sigma(net, b, depth=0), "Invalid depth: 0"),
        (lambda net, b: measures.pac_bayes_sigma(net, b, samples=0), "Invalid samples: 0"),
        (lambda net, b: measures.pac_bayes_sigma(net, b, lower=1.0, upper=0.5), "Invalid upper: 0.5"),
        (lambda net, b: measures.pac_bayes_sigma(net, b, distribution="laplace"), "Invalid distribution"),
        (lambda net, b: measures.pac_bayes(net, b, variant="mag"), "Invalid variant: 'mag'"),
        (lambda net, b: measures.sharpness_alpha(net, b, restarts=0), "Invalid restarts: 0"),
        (lambda net, b: measures.sharpness_alpha(net, b, lower=0.0), "Invalid lower: 0.0; expected a finite lower > 0"),
        (lambda net, b: measures.sharpness_alpha(net, b, steps=-1), "Invalid steps: -1"),
        (lambda net, b: measures.average_sharpness(net, b, 0.1, p=1.0), "Invalid p: 1.0"),
        (lambda net, b: measures.average_sharpness(net, b, 0.1, samples=0), "Invalid samples: 0"),
        (lambda net, b: measures.pac_bayes_sigma(net, [(b[0][0], b[0][0])]), "Invalid targets: dtype torch.float64"),
        (lambda net, b: measures.pac_bayes(net, b, initial={}), "Invalid initial: the initial state has no '0.weight'"),
    ],
)
def test_bad_arguments_are_refused_with_a_clear_message(call, message):
    import re

    x, y = data(n=6, shape=(5,))
    with pytest.raises(ValueError, match=re.escape(message)):
        call(mlp(), [(x, y)])


def test_a_search_that_never_crosses_the_target_warns_that_it_is_a_bound():
    x, y = data(n=20, shape=(5,))
    net = mlp()
    with pytest.warns(UserWarning, match=r"reached the lower end of its bracket \[0.5, 2\].*a bound"):
        found = measures.pac_bayes_sigma(net, [(x, net(x).argmax(1))], lower=0.5, upper=2.0, depth=3, samples=2)
    assert found.saturated == "lower"
    with pytest.warns(UserWarning, match=r"reached the upper end of its bracket \[1e-06, 1e-05\]"):
        found = measures.sharpness_alpha(net, [(x, net(x).argmax(1))], lower=1e-6, upper=1e-5, depth=3, tol=0.0)
    assert found.saturated == "upper"
