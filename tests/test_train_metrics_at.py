"""train_metrics_at: the logged train/acc is the accuracy at w (clean) or at w + ε (perturbed), replayed in plain torch."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from helpers import classification_batches, fixed_batches, quiet_trainer
from torch import nn

from flatminima.lightning_modules import SAM, BinaryClassifier, Classifier

LR, RHO = 0.5, 0.3


pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(out: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, out)).double()
    net.out_features = out
    return net


def replay(net: nn.Module, batches, binary: bool) -> tuple[float, float]:
    """SAM with plain SGD written out: (accuracy at w, accuracy at w + ε) over the epoch's examples."""
    params = [p.detach().clone() for p in net.parameters()]

    def forward(ps, x):
        w1, b1, w2, b2 = ps
        out = torch.tanh(x @ w1.T + b1) @ w2.T + b2
        return out.squeeze(1) if binary else out

    def loss_fn(out, y):
        return F.binary_cross_entropy_with_logits(out, y.double()) if binary else F.cross_entropy(out, y)

    def correct(out, y):
        pred = (out > 0).long() if binary else out.argmax(1)
        return int((pred == y).sum())

    clean = perturbed = total = 0
    for x, y in batches:
        leaf = [p.clone().requires_grad_() for p in params]
        out = forward(leaf, x)
        grads = torch.autograd.grad(loss_fn(out, y), leaf)
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        shifted = [(p + RHO * g / (norm + 1e-12)).requires_grad_() for p, g in zip(params, grads)]
        out_p = forward(shifted, x)
        grads_p = torch.autograd.grad(loss_fn(out_p, y), shifted)
        clean, perturbed, total = (
            clean + correct(out.detach(), y),
            perturbed + correct(out_p.detach(), y),
            total + len(y),
        )
        params = [p - LR * g for p, g in zip(params, grads_p)]
    return clean / total, perturbed / total


@pytest.mark.parametrize("binary", [False, True], ids=["Classifier", "BinaryClassifier"])
def test_logged_train_acc_is_measured_where_asked(binary):
    batches = classification_batches(6, batch=16, classes=2 if binary else 3, seed=3)
    expected = replay(mlp(1 if binary else 3), batches, binary)
    assert expected[0] != expected[1]  # the test can tell the two apart
    for where, want in zip(("clean", "perturbed"), expected):
        task = BinaryClassifier if binary else Classifier
        model = task(
            mlp(1 if binary else 3),
            optimizer=partial(torch.optim.SGD, lr=LR),
            minimizer=SAM(rho=RHO),
            train_metrics_at=where,
        )
        trainer = quiet_trainer(max_epochs=1, limit_val_batches=0)
        trainer.fit(model, fixed_batches(batches))
        assert float(trainer.callback_metrics["train/acc"]) == pytest.approx(want, abs=1e-6), where


def test_perturbed_without_a_rule_is_the_clean_accuracy_and_bad_values_are_refused():
    batches = classification_batches(3, batch=16, seed=4)
    accs = []
    for where in ("clean", "perturbed"):
        model = Classifier(mlp(3), optimizer=partial(torch.optim.SGD, lr=LR), train_metrics_at=where)
        trainer = quiet_trainer(max_epochs=1, limit_val_batches=0)
        trainer.fit(model, fixed_batches(batches))
        accs.append(float(trainer.callback_metrics["train/acc"]))
    assert accs[0] == accs[1]
    with pytest.raises(ValueError, match="Invalid train_metrics_at: 'both'"):
        Classifier(mlp(3), train_metrics_at="both")
