"""The SAM-family rules as pure functions: each equals its formula, written here per parameter."""

from __future__ import annotations

import math

import pytest
import torch

from flatminima.lightning_modules.minimizers import ASAM, GSAM, SAM, USAM, AdaptiveGSAM, foreach_dot, global_norm

RHO = 0.07


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    names = ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight"]
    shapes = [(4, 3), (4,), (4,), (4,), (2, 4)]
    params = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    grads = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    return names, params, grads


def _norm(ts):
    return math.sqrt(sum(float((t * t).sum()) for t in ts))


def _close(a, b, tol=1e-13):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape
        assert torch.allclose(x, y, rtol=0, atol=tol), (x - y).abs().max()


def test_global_norm_and_dot(tensors):
    _, params, grads = tensors
    assert float(global_norm(grads)) == pytest.approx(_norm(grads), rel=1e-14)
    dot = sum(float((a * b).sum()) for a, b in zip(params, grads))
    assert float(foreach_dot(params, grads)) == pytest.approx(dot, rel=1e-13)


def test_dot_has_no_cancellation_of_the_polarisation_identity():
    # ⟨a, b⟩ with ‖a‖ ≫ ‖b‖ and a ⟂ b nearly: an exact sum gets it, (‖a+b‖²−‖a‖²−‖b‖²)/2 would not.
    a = [torch.tensor([1e8, 1.0], dtype=torch.float32)]
    b = [torch.tensor([1e-8, 3.0], dtype=torch.float32)]
    assert float(foreach_dot(a, b)) == pytest.approx(4.0, rel=1e-6)


def test_sam_l2(tensors):
    names, params, grads = tensors
    n = _norm(grads)
    expected = [RHO * g / (n + 1e-12) for g in grads]
    _close(SAM(rho=RHO).perturbation(params, grads), expected)


def test_sam_linf(tensors):
    _, params, grads = tensors
    expected = [RHO * torch.sign(g) for g in grads]
    _close(SAM(rho=RHO, p=math.inf).perturbation(params, grads), expected, tol=0)


def test_usam(tensors):
    _, params, grads = tensors
    _close(USAM(rho=RHO).perturbation(params, grads), [RHO * g for g in grads], tol=0)


@pytest.mark.parametrize("scope", ["weight", "all"])
@pytest.mark.parametrize("eta", [0.0, 0.01])
def test_asam(tensors, scope, eta):
    names, params, grads = tensors
    t = [(p.abs() + eta) if (scope == "all" or "weight" in n) else torch.ones_like(p) for n, p in zip(names, params)]
    n_tg = _norm([ti * gi for ti, gi in zip(t, grads)])
    expected = [RHO * ti * ti * gi / (n_tg + 1e-12) for ti, gi in zip(t, grads)]
    _close(ASAM(rho=RHO, eta=eta, scope=scope).perturbation(params, grads, names=names), expected)


def test_asam_official_convention_leaves_biases_unscaled(tensors):
    names, params, grads = tensors
    eps = ASAM(rho=RHO, eta=0.01).perturbation(params, grads, names=names)
    bias = names.index("0.bias")
    ratio = eps[bias] / grads[bias]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))  # T = 1: ε ∝ g on biases


def test_asam_weight_scope_needs_names(tensors):
    _, params, grads = tensors
    with pytest.raises(ValueError, match="names"):
        ASAM().perturbation(params, grads)


def _gsam_descent(g, gp, alpha):
    dot = sum(float((a * b).sum()) for a, b in zip(g, gp))
    gp2 = _norm(gp) ** 2
    perp = [a - dot / gp2 * b for a, b in zip(g, gp)]
    return [b - alpha * c for b, c in zip(gp, perp)]


def test_gsam(tensors):
    _, params, grads = tensors
    rule = GSAM(rho=RHO, alpha=0.3)
    n = _norm(grads)
    _close(rule.perturbation(params, grads), [RHO * g / (n + 1e-12) for g in grads])
    gp = [g.flip(0) * 0.7 + 0.1 for g in grads]
    expected = _gsam_descent(grads, gp, 0.3)
    rule.descent_(grads, gp)
    _close(gp, expected, tol=1e-13)


def test_gsam_descent_removes_only_the_orthogonal_part(tensors):
    _, _, grads = tensors
    gp = [g * 2.0 for g in grads]  # parallel: g⊥ = 0, so d = g_p
    expected = [t.clone() for t in gp]
    GSAM(alpha=0.5).descent_(grads, gp)
    _close(gp, expected, tol=1e-13)


def test_gsam_zero_perturbed_gradient_is_safe(tensors):
    _, _, grads = tensors
    gp = [torch.zeros_like(g) for g in grads]
    GSAM(alpha=0.5).descent_(grads, gp)  # c = 0: d = −α g
    _close(gp, [-0.5 * g for g in grads], tol=0)


def test_gsam_rho_follows_the_lr():
    rule = GSAM(rho=0.1, alpha=0.1, rho_min=0.02, lr_min=0.0)
    assert rule.current_rho(lr=0.05, lr_max=0.1) == pytest.approx(0.02 + 0.08 * 0.5)
    assert rule.current_rho(lr=0.1, lr_max=0.1) == pytest.approx(0.1)
    assert GSAM(rho=0.1, rho_min=0.0, lr_max=0.2).current_rho(lr=0.05) == pytest.approx(0.025)
    assert GSAM(rho=0.1).current_rho(lr=0.001, lr_max=0.1) == 0.1  # no rho_min: constant


def test_adaptive_gsam(tensors):
    _, params, grads = tensors
    n = _norm(grads)
    expected = [RHO * (p.abs() + 0.02) * g / (n + 1e-12) for p, g in zip(params, grads)]
    rule = AdaptiveGSAM(rho=RHO, alpha=0.2, gamma=0.02)
    _close(rule.perturbation(params, grads), expected)
    gp = [g.roll(1) for g in grads]
    want = _gsam_descent(grads, gp, 0.2)
    rule.descent_(grads, gp)
    _close(gp, want, tol=1e-13)


RULES = [SAM(RHO), SAM(RHO, p=math.inf), USAM(RHO), ASAM(RHO), ASAM(RHO, 0.0, "all"), GSAM(RHO), AdaptiveGSAM(RHO)]


@pytest.mark.parametrize("rule", RULES, ids=repr)
def test_zero_gradient_gives_zero_perturbation(tensors, rule):
    names, params, _ = tensors
    zeros = [torch.zeros_like(p) for p in params]
    for e in rule.perturbation(params, zeros, names=names):
        assert torch.equal(e, torch.zeros_like(e))


@pytest.mark.parametrize("rule", RULES, ids=repr)
def test_non_finite_gradient_norm_gives_zero_in_finite_entries(tensors, rule):
    names, params, grads = tensors
    grads = [g.clone() for g in grads]
    grads[0][0, 0] = float("inf")
    eps = rule.perturbation(params, grads, names=names)
    finite_entries = torch.cat(
        [torch.where(torch.isfinite(g), e, torch.zeros_like(e)).flatten() for g, e in zip(grads, eps)]
    )
    if isinstance(rule, SAM) and rule.p == math.inf:
        # the L∞ ascent ρ·sign(g) needs no norm: finite entries keep their sign step
        assert torch.isfinite(torch.cat([e.flatten() for e in eps])).all()
    else:
        assert torch.equal(finite_entries, torch.zeros_like(finite_entries))


@pytest.mark.parametrize("rule", RULES, ids=repr)
def test_float32_and_bfloat16_lists_work(rule):
    names = ["a.weight", "a.bias"]
    for dtype in (torch.float32, torch.bfloat16):
        params = [torch.randn(3, 2, dtype=dtype), torch.randn(3, dtype=dtype)]
        grads = [torch.randn(3, 2, dtype=dtype), torch.randn(3, dtype=dtype)]
        eps = rule.perturbation(params, grads, names=names)
        assert [e.dtype for e in eps] == [dtype, dtype]
        assert all(torch.isfinite(e).all() for e in eps)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: SAM(rho=-0.1), r"Invalid rho: -0\.1; expected a finite rho >= 0"),
        (lambda: SAM(rho=float("nan")), "Invalid rho"),
        (lambda: SAM(p=3), r"Invalid p: 3\.0; expected p = 2 or p = inf"),
        (lambda: SAM(p=1), "Invalid p"),
        (lambda: SAM(eps=0), "Invalid eps"),
        (lambda: USAM(rho=-1), "Invalid rho"),
        (lambda: ASAM(eta=-0.01), "Invalid eta"),
        (lambda: ASAM(scope="bias"), "Invalid scope"),
        (lambda: GSAM(alpha=1.5), r"Invalid alpha: 1\.5; expected 0 <= alpha <= 1"),
        (lambda: GSAM(alpha=-0.1), "Invalid alpha"),
        (lambda: GSAM(rho=0.05, rho_min=0.1), "Invalid rho_min"),
        (lambda: GSAM(lr_min=0.1, lr_max=0.05), "Invalid lr_max"),
        (lambda: AdaptiveGSAM(gamma=-1), "Invalid gamma"),
    ],
)
def test_bad_arguments_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_type_errors_name_the_argument():
    with pytest.raises(TypeError, match="Invalid rho"):
        SAM(rho="0.05")
    with pytest.raises(TypeError, match="Invalid alpha"):
        GSAM(alpha=True)


def test_repr_shows_the_configuration():
    assert repr(SAM(0.1, p=math.inf)) == "SAM(rho=0.1, p=inf)"
    assert "scope='all'" in repr(ASAM(0.5, 0.0, "all"))


def test_gsam_rho_is_clamped_to_its_range_and_warns_once():
    rule = GSAM(rho=0.1, alpha=0.1, rho_min=0.02, lr_min=0.01)
    with pytest.warns(UserWarning, match=r"lr 0.5 is outside \[lr_min, lr_max\] = \[0.01, 0.1\]") as record:
        assert rule.current_rho(lr=0.5, lr_max=0.1) == 0.1
        assert rule.current_rho(lr=0.001, lr_max=0.1) == 0.02  # below lr_min: rho_min, not less
        assert rule.current_rho(lr=0.055, lr_max=0.1) == pytest.approx(0.06)
    assert len([w for w in record if "outside" in str(w.message)]) == 1
    with pytest.warns(UserWarning, match="cannot follow the lr"):
        assert GSAM(rho=0.1, rho_min=0.0, lr_min=0.2).current_rho(lr=0.1, lr_max=0.1) == 0.1


def test_descent_is_in_place_and_returns_the_perturbed_gradients(tensors):
    _, _, grads = tensors
    for rule in (SAM(), GSAM(alpha=0.4), GSAM(alpha=0.0)):
        gp = [g.flip(0) + 0.2 for g in grads]
        ids = [id(t) for t in gp]
        out = rule.descent_(grads, gp)
        assert out is gp and [id(t) for t in out] == ids  # no new list, no new tensors


def test_a_rule_defining_the_old_descent_name_is_refused():
    with pytest.raises(TypeError, match="descent_"):

        class OldStyle(SAM):  # noqa: F841
            def descent(self, grads, perturbed_grads):
                pass
