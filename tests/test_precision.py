"""Mixed precision: bf16-mixed, and 16-mixed with a real GradScaler (on CPU, so CI exercises it)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision

from flatminima.lightning_modules import ASAM, GSAM, SAM, USAM, Classifier
from tests.helpers import bn_mlp, classification_batches, clone, fixed_batches, params_of, quiet_trainer

LR = 0.05


def _fp16_plugin(init_scale: float = 2.0**16) -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


def _train(net, rule, batches, **trainer_kwargs):
    model = Classifier(clone(net), num_classes=3, optimizer=partial(torch.optim.SGD, lr=LR), minimizer=rule)
    trainer = quiet_trainer(max_epochs=1, **trainer_kwargs)
    trainer.fit(model, fixed_batches(batches))
    return model, trainer


def _rel_err(a, b, ref):
    num = sum(float((x - y).norm() ** 2) for x, y in zip(a, b)) ** 0.5
    den = sum(float((x - y).norm() ** 2) for x, y in zip(b, ref)) ** 0.5
    return num / den


RULES = [SAM(0.05), USAM(0.05), ASAM(0.5), GSAM(0.05, alpha=0.3)]


@pytest.mark.parametrize("rule", RULES, ids=repr)
@pytest.mark.parametrize("mode", ["bf16-mixed", "16-mixed+scaler"])
def test_mixed_precision_step_tracks_float32(rule, mode):
    net = bn_mlp(dtype=torch.float32)
    batches = classification_batches(4, dtype=torch.float32)
    # a modest initial scale: at 2**16 ASAM's large ascent overflows fp16 once and the scaler skips that step
    kwargs = {"precision": "bf16-mixed"} if mode == "bf16-mixed" else {"plugins": [_fp16_plugin(2.0**8)]}
    reference, _ = _train(net, rule, batches)
    mixed, trainer = _train(net, rule, batches, **kwargs)
    assert trainer.global_step == 4
    # the update agrees with float32 to the precision of the format (the total update is the yardstick)
    tol = 0.05 if mode == "bf16-mixed" else 0.01
    assert _rel_err(params_of(mixed.net), params_of(reference.net), params_of(net)) < tol


def test_usam_ascent_is_unscaled_under_fp16_loss_scaling():
    # without unscaling, ε = ρ·S·g with S = 2**16 would throw pass 2 far away
    net = bn_mlp(dtype=torch.float32)
    batches = classification_batches(2, dtype=torch.float32)
    reference, _ = _train(net, USAM(0.05), batches)
    scaled_rho, _ = _train(net, USAM(0.05 * 2.0**16), batches)
    mixed, trainer = _train(net, USAM(0.05), batches, plugins=[_fp16_plugin()])
    assert trainer.precision_plugin.scaler.get_scale() == 2.0**16  # no step was skipped
    close = _rel_err(params_of(mixed.net), params_of(reference.net), params_of(net))
    far = _rel_err(params_of(scaled_rho.net), params_of(reference.net), params_of(net))
    assert close < 0.01 < far


def test_steps_the_scaler_skips_leave_the_weights_exactly_restored():
    # an absurd initial scale overflows fp16 gradients: GradScaler skips those steps and halves the scale
    net = bn_mlp(dtype=torch.float32)
    batches = classification_batches(3, dtype=torch.float32)
    model, trainer = _train(net, SAM(0.05), batches, plugins=[_fp16_plugin(init_scale=2.0**120)])
    assert trainer.global_step == 3
    assert trainer.precision_plugin.scaler.get_scale() < 2.0**120  # it did skip
    for a, b in zip(model.net.parameters(), net.parameters()):
        assert torch.equal(a.detach(), b.detach())  # every step skipped, and w + ε fully undone
