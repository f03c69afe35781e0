"""GSAM's ρ_t stays within [ρ_min, ρ] under warmup schedules, inside the module (Zhuang et al. 2022)."""

from __future__ import annotations

import warnings
from functools import partial

import pytest
import torch
from torch.optim import lr_scheduler

from flatminima.lightning_modules import GSAM, Classifier
from flatminima.lightning_modules.two_pass import schedule_peak_lr
from tests.helpers import bn_mlp, classification_batches, fixed_batches, quiet_trainer

RHO, RHO_MIN = 0.05, 0.01


def _rhos(scheduler, epochs=2, **gsam):
    """ρ_t of every step of a short run (the rule's own current_rho, recorded)."""
    rule = GSAM(rho=RHO, alpha=0.1, rho_min=RHO_MIN, **gsam)
    rhos: list[float] = []
    inner = rule.current_rho

    def spy(*args, **kwargs):
        rhos.append(inner(*args, **kwargs))
        return rhos[-1]

    rule.current_rho = spy
    model = Classifier(
        bn_mlp(dtype=torch.float32),
        num_classes=3,
        optimizer=partial(torch.optim.SGD, lr=0.1),
        minimizer=rule,
        lr_scheduler=scheduler,
        lr_scheduler_interval="step",
    )
    quiet_trainer(max_epochs=epochs).fit(model, fixed_batches(classification_batches(5, dtype=torch.float32)))
    assert len(rhos) == 5 * epochs
    return rhos


def test_rho_follows_a_one_cycle_schedule_within_its_range():
    # OneCycleLR starts at max_lr/25: with the initial lr as lr_max, rho_t climbed to ~25 rho.
    rhos = _rhos(partial(lr_scheduler.OneCycleLR, max_lr=0.5, total_steps=10, pct_start=0.3))
    assert all(RHO_MIN <= r <= RHO for r in rhos), rhos
    assert max(rhos) == pytest.approx(RHO, rel=1e-9)  # at the peak lr, rho_t = rho
    assert rhos[0] == pytest.approx(RHO_MIN + (RHO - RHO_MIN) * (0.5 / 25) / 0.5, rel=1e-9)


def test_rho_under_a_linear_warmup_that_starts_below_lr_min():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        rhos = _rhos(partial(lr_scheduler.LinearLR, start_factor=0.01, total_iters=6), lr_min=0.005)
    assert all(RHO_MIN <= r <= RHO for r in rhos), rhos
    assert rhos[0] == RHO_MIN and rhos[-1] == pytest.approx(RHO)  # lr 0.001 < lr_min, then the peak 0.1
    assert len([w for w in record if "outside [lr_min, lr_max]" in str(w.message)]) == 1


def test_rho_under_a_lambda_warmup_above_the_initial_lr_is_clamped_with_one_warning():
    warmup = partial(lr_scheduler.LambdaLR, lr_lambda=lambda s: 2.0 * min(1.0, (s + 1) / 4))  # peak 2x the initial lr
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        rhos = _rhos(warmup)
    assert all(RHO_MIN <= r <= RHO for r in rhos), rhos
    assert rhos[-1] == RHO
    assert len([w for w in record if "outside [lr_min, lr_max]" in str(w.message)]) == 1


def test_schedule_peaks():
    def opt():
        return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)

    assert schedule_peak_lr(opt(), []) == 0.1
    o = opt()
    assert schedule_peak_lr(o, [lr_scheduler.OneCycleLR(o, max_lr=0.7, total_steps=10)]) == 0.7
    o = opt()
    assert schedule_peak_lr(o, [lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=3)]) == pytest.approx(0.1)
    o = opt()
    assert schedule_peak_lr(o, [lr_scheduler.CyclicLR(o, base_lr=0.01, max_lr=0.3)]) == 0.3
    o = opt()
    seq = lr_scheduler.SequentialLR(
        o,
        [lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=3), lr_scheduler.CosineAnnealingLR(o, T_max=5)],
        milestones=[3],
    )
    assert schedule_peak_lr(o, [seq]) == pytest.approx(0.1)
    o = opt()
    assert schedule_peak_lr(o, [lr_scheduler.StepLR(o, step_size=2)]) == 0.1
