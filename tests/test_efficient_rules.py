"""The efficient variants as pure rules: their decisions, their refusals and their helpers, without a Trainer."""

from __future__ import annotations

import math

import pytest
import torch

from flatminima.lightning_modules._rule import RuleSetup, StepContext, step_uniforms
from flatminima.lightning_modules._saf import softened_kl
from flatminima.lightning_modules.minimizers import (
    ESAM,
    GSAM,
    MESA,
    SAF,
    SAM,
    AdaptiveSteps,
    EveryK,
    LookSAM,
    MomentumSAM,
    RandomSteps,
)


def test_step_uniforms_depend_on_seed_and_step_only():
    assert step_uniforms(3, 17, 4) == step_uniforms(3, 17, 4)
    assert step_uniforms(3, 17, 4) != step_uniforms(3, 18, 4) != step_uniforms(4, 17, 4)
    draws = [step_uniforms(0, t, 1)[0] for t in range(4000)]
    assert all(0.0 <= u < 1.0 for u in draws) and abs(sum(draws) / len(draws) - 0.5) < 0.02


def test_random_steps_take_about_p_of_the_steps():
    rule = RandomSteps(SAM(), p=0.3, seed=5)
    plans = [rule.plan(StepContext(step=t)) for t in range(4000)]
    assert abs(plans.count("two") / 4000 - 0.3) < 0.03 and set(plans) == {"one", "two"}
    assert plans == [RandomSteps(SAM(), p=0.3, seed=5).plan(StepContext(step=t)) for t in range(4000)]


def test_every_k_and_looksam_plan_by_the_step():
    assert [EveryK(SAM(), k=3).plan(StepContext(step=t)) for t in range(6)] == ["two", "one", "one"] * 2
    assert [LookSAM(k=2).plan(StepContext(step=t)) for t in range(4)] == ["two", "one"] * 2


def test_a_schedule_passes_its_rules_needs_through():
    inner = GSAM(rho=0.07, alpha=0.3)
    rule = EveryK(inner, k=2)
    assert rule.uses_clean_grad and rule.rho == 0.07 and rule.current_rho() == 0.07
    g = [torch.tensor([3.0, 4.0])]
    assert torch.equal(rule.perturbation([torch.zeros(2)], g)[0], inner.perturbation([torch.zeros(2)], g)[0])


def test_adaptive_steps_statistics_and_threshold():
    rule = AdaptiveSteps(SAM(), delta=0.9, c_start=2.0, c_end=-2.0, total_steps=10)
    mu = var = 0.0
    for t, x in enumerate([4.0, 1.0, 9.0, 2.0, 30.0]):
        taken = rule.second_pass([], torch.tensor(x), StepContext(step=t))
        mu = 0.9 * mu + 0.1 * x
        var = 0.9 * var + 0.1 * (x - mu) ** 2
        assert taken == (x >= mu + (2.0 - 4.0 * t / 10) * math.sqrt(var))
        assert (rule.mu, rule.var) == pytest.approx((mu, var), rel=1e-15)
    assert rule.threshold_c(20) == -2.0  # clamped after T
    state = rule.state_dict()
    other = AdaptiveSteps(SAM(), delta=0.9, c_start=2.0, c_end=-2.0, total_steps=10)
    other.load_state_dict(state)
    assert (other.mu, other.var) == (rule.mu, rule.var)
    before = (rule.mu, rule.var)
    assert rule.second_pass([], torch.tensor(float("nan")), StepContext(step=5)) is False
    assert (rule.mu, rule.var) == before  # a non-finite gradient leaves the statistics alone


def test_adaptive_steps_need_the_number_of_steps():
    with pytest.raises(ValueError, match=r"Invalid total_steps: None.*AdaptiveSteps\(total_steps=\.\.\.\)"):
        AdaptiveSteps(SAM()).setup(RuleSetup(total_steps=None))
    AdaptiveSteps(SAM(), total_steps=100).setup(RuleSetup(total_steps=None))


def test_looksam_reuse_step_formula_on_plain_tensors():
    rule = LookSAM(rho=0.1, k=2, alpha=0.5)
    params = [torch.zeros(2, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)]
    ctx = StepContext(step=0, params=params)
    g = [torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64)]
    gs = [torch.tensor([2.0, 3.0], dtype=torch.float64), torch.tensor([4.0], dtype=torch.float64)]
    rule.after_second_pass(params, g, gs, ctx)  # g_v = g_s − (⟨g, g_s⟩/‖g‖²) g = (0, 3, 4), ‖g_v‖ = 5
    g2 = [torch.tensor([0.0, 6.0], dtype=torch.float64), torch.tensor([8.0], dtype=torch.float64)]  # ‖g‖ = 10
    d = rule.one_pass_descent_(params, [t.clone() for t in g2], ctx)
    expected = [g2[0] + 0.5 * 10 / 5 * torch.tensor([0.0, 3.0]), g2[1] + 0.5 * 10 / 5 * torch.tensor([4.0])]
    assert all(torch.allclose(a, b.double(), rtol=0, atol=1e-14) for a, b in zip(d, expected))


def test_msam_offset_is_against_the_momentum_and_zero_before_any():
    w = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD(w, lr=0.1, momentum=0.9)
    rule = MomentumSAM(rho=2.0)
    rule.setup(RuleSetup(optimizer=opt))
    ctx = StepContext(optimizer=opt, params=w)
    assert all(torch.equal(e, torch.zeros_like(e)) for e in rule.evaluation_offset(w, ctx))
    w[0].grad, w[1].grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    opt.step()  # momentum buffer = g = (3, 0, 4), ‖v‖ = 5
    eps = rule.evaluation_offset(w, ctx)
    assert torch.allclose(eps[0], torch.tensor([-1.2, 0.0])) and torch.allclose(eps[1], torch.tensor([-1.6]))


@pytest.mark.parametrize(
    ("optimizer", "match"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1), "SGD without momentum"),
        (lambda p: torch.optim.Adagrad(p, lr=0.1), "Adagrad has no momentum buffer"),
    ],
)
def test_msam_refuses_an_optimizer_without_momentum(optimizer, match):
    with pytest.raises(ValueError, match=f"Invalid optimizer for MomentumSAM: {match}"):
        MomentumSAM().setup(RuleSetup(optimizer=optimizer([torch.nn.Parameter(torch.zeros(1))])))
    adam = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    rule = MomentumSAM()
    rule.setup(RuleSetup(optimizer=adam))
    assert rule._key == "exp_avg"


def test_esam_selects_the_largest_loss_rises_and_masks_whole_tensors():
    rule = ESAM(beta=0.5, gamma=0.5, seed=2)
    clean = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
    perturbed = torch.tensor([1.5, 0.9, 3.0, 1.1, 2.0])
    assert rule.select(clean, perturbed).tolist() == [2, 4]  # ⌊0.5·5⌋ = 2 samples, in batch order
    frozen = rule.frozen_in_pass_one([torch.zeros(1)] * 200, StepContext(step=3))
    assert 60 < sum(frozen) < 140
    assert ESAM(beta=1.0).frozen_in_pass_one([torch.zeros(1)] * 5, StepContext()) is None
    g = [torch.tensor([3.0]), torch.tensor([4.0])]
    eps = ESAM(rho=0.1, beta=0.5).perturbation(g, g)
    assert torch.allclose(torch.cat(eps), torch.tensor([0.12, 0.16]))  # ρ·g/(β‖g‖)


def test_softened_kl_is_tau_squared_times_the_mean_kl():
    z = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], dtype=torch.float64)
    r = torch.tensor([[0.5, 0.5, 2.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    tau = 3.0
    expected = 0.0
    for zi, ri in zip(z.tolist(), r.tolist()):
        q = [math.exp(v / tau) / sum(math.exp(u / tau) for u in zi) for v in zi]
        p = [math.exp(v / tau) / sum(math.exp(u / tau) for u in ri) for v in ri]
        expected += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)) / 2
    assert float(softened_kl(z, r, tau)) == pytest.approx(tau**2 * expected, rel=1e-12)
    assert float(softened_kl(z, z, tau)) == pytest.approx(0.0, abs=1e-15)


def test_saf_refuses_a_checkpoint_of_another_training_set_and_bad_indices():
    rule = SAF(minus_epochs=1, start_epoch=0)
    rule.load_state_dict({"store": torch.zeros(10, 2, 3)})
    with pytest.raises(ValueError, match="Invalid checkpoint for SAF: its store holds 10 samples, the training set"):
        rule.setup(RuleSetup(dataset_size=12, softmax_outputs=True))
    rule = SAF(minus_epochs=1, start_epoch=0)
    rule.setup(RuleSetup(dataset_size=4, softmax_outputs=True))
    with pytest.raises(ValueError, match=r"Invalid sample index for SAF: 4; expected 0 <= idx < 4"):
        rule.extra_loss(torch.zeros(2, 3), torch.tensor([1, 4]), (), StepContext())


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: LookSAM(k=0), "Invalid k: 0"),
        (lambda: LookSAM(alpha=-1), "Invalid alpha"),
        (lambda: EveryK(SAM(), k=0), "Invalid k"),
        (lambda: EveryK(LookSAM()), "Invalid rule: LookSAM.*a schedule wraps a two-pass rule"),
        (lambda: RandomSteps(SAM(), p=1.5), r"Invalid p: 1\.5; expected 0 <= p <= 1"),
        (lambda: RandomSteps(SAM(), seed=0.5), "Invalid seed"),
        (lambda: AdaptiveSteps(SAM(), delta=1.0), "Invalid delta"),
        (lambda: AdaptiveSteps(SAM(), total_steps=0), "Invalid total_steps"),
        (lambda: MomentumSAM(rho=-1), "Invalid rho"),
        (lambda: MomentumSAM(momentum_key="v"), "Invalid momentum_key"),
        (lambda: ESAM(beta=0), r"Invalid beta: 0; expected 0 < beta <= 1"),
        (lambda: ESAM(gamma=1.5), "Invalid gamma"),
        (lambda: SAF(minus_epochs=0), "Invalid minus_epochs"),
        (
            lambda: SAF(minus_epochs=4, start_epoch=1),
            r"Invalid start_epoch: 1; expected start_epoch >= minus_epochs - 1",
        ),
        (lambda: SAF(temperature=0), "Invalid temperature"),
        (lambda: MESA(decay=1.0), "Invalid decay"),
        (lambda: MESA(start_epoch=5, end_epoch=5), "Invalid end_epoch"),
    ],
)
def test_bad_arguments_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()
    with pytest.raises(TypeError, match="Invalid rule"):
        EveryK("SAM")


def test_the_variants_are_public_in_minimizers():
    """Configs name them ``flatminima.lightning_modules.minimizers.<Name>`` (their modules are private; importing
    ``minimizers`` without Lightning, and so these modules, is pinned in tests/test_validation.py)."""
    import flatminima.lightning_modules.minimizers as m

    for name in ("LookSAM", "EveryK", "RandomSteps", "AdaptiveSteps", "MomentumSAM", "ESAM", "SAF", "MESA"):
        assert getattr(m, name).__module__ == "flatminima.lightning_modules.minimizers" and name in m.__all__


def test_tasks_ignore_a_trailing_index_and_their_sample_losses_average_to_the_loss():
    from flatminima.lightning_modules import BinaryClassifier, Classifier, Regressor

    torch.manual_seed(0)
    x = torch.randn(6, 3)
    cases = [
        (Classifier(torch.nn.Linear(3, 4), num_classes=4, label_smoothing=0.1), torch.randint(0, 4, (6,))),
        (BinaryClassifier(torch.nn.Linear(3, 1)), torch.randint(0, 2, (6,))),
        (Regressor(torch.nn.Linear(3, 1), loss_scale=0.5), torch.randn(6)),
    ]
    for task, y in cases:
        idx = torch.arange(10, 16)
        loss, output, target, size = task.forward_loss((x, y), "train")
        loss_idx, output_idx, _, _ = task.forward_loss((x, y, idx), "train")
        assert torch.equal(loss, loss_idx) and torch.equal(output, output_idx) and size == 6
        assert task.sample_ids((x, y, idx)) is idx and task.sample_ids((x, y)) is None
        per_sample = task.sample_losses(output, target)
        assert per_sample.shape == (6,) and torch.allclose(per_sample.mean(), loss, rtol=1e-6, atol=0)
        picked = task.select_batch((x, y, idx), torch.tensor([4, 1]))
        assert torch.equal(picked[0], x[[4, 1]]) and torch.equal(picked[2], idx[[4, 1]])
