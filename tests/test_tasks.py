"""BinaryClassifier and Regressor's loss scale, pinned against plain PyTorch; matrix sensing's float64 path."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from helpers import quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flatminima.datamodules import MatrixSensingDataModule
from flatminima.lightning_modules import SAM, USAM, BinaryClassifier, Classifier, Regressor
from flatminima.lightning_modules.networks import MLP, MatrixFactorization

pytestmark = pytest.mark.usefixtures("one_thread")


def full_batch(*tensors: torch.Tensor) -> DataLoader:
    return DataLoader(TensorDataset(*tensors), batch_size=len(tensors[0]), shuffle=False)


# ---------------------------------------------------------------- BinaryClassifier
def test_binary_classifier_step_is_bce_on_the_logit():
    """One SGD step equals the step on mean(softplus(z) - y z), the BCE of sigmoid(z), written out by hand."""
    torch.manual_seed(0)
    net = MLP(2, [5], 1, weight_init="xavier").double()
    x = torch.randn(16, 2, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    ref = [p.detach().clone().requires_grad_() for p in net.parameters()]

    def plain(params):
        w1, b1, w2, b2 = params
        z = (torch.relu(x @ w1.T + b1) @ w2.T + b2).squeeze(1)
        return (F.softplus(z) - y.double() * z).mean()

    loss = plain(ref)
    grads = torch.autograd.grad(loss, ref)
    expected = [p - 0.3 * g for p, g in zip(ref, grads)]
    model = BinaryClassifier(net, optimizer=partial(torch.optim.SGD, lr=0.3), log_train_steps=True)
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(model, full_batch(x, y))
    for got, want in zip(net.parameters(), expected):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-12, atol=1e-12)
    assert float(trainer.callback_metrics["train_step/loss"]) == pytest.approx(float(loss.detach()), rel=1e-6)
    assert {"train/loss", "train/acc"} <= set(trainer.callback_metrics)


def test_binary_accuracy_thresholds_the_logit_at_zero():
    """Logits that all lie in [0, 1] are still logits: z = 0.3 predicts class 1 (torchmetrics alone would say 0)."""
    net = nn.Linear(1, 1)
    with torch.no_grad():
        net.weight.fill_(0.0)
        net.bias.fill_(0.3)
    net.out_features = 1
    y = torch.tensor([1, 1, 1, 0])
    model = BinaryClassifier(net)
    (metrics,) = quiet_trainer().validate(model, full_batch(torch.zeros(4, 1), y), verbose=False)
    assert metrics["val/acc"] == pytest.approx(0.75)
    z = torch.tensor(0.3)
    assert metrics["val/loss"] == pytest.approx(float(0.75 * F.softplus(-z) + 0.25 * F.softplus(z)), rel=1e-6)
    with torch.no_grad():
        net.bias.fill_(-0.3)
    (metrics,) = quiet_trainer().validate(model, full_batch(torch.zeros(4, 1), y), verbose=False)
    assert metrics["val/acc"] == pytest.approx(0.25)
    assert torch.allclose(model.predict_step((torch.zeros(2, 1),), 0), torch.sigmoid(torch.tensor([-0.3, -0.3])))


def test_binary_classifier_refuses_a_multiclass_setup():
    with pytest.raises(ValueError, match="Invalid net for BinaryClassifier: MLP has out_features=2"):
        BinaryClassifier(MLP())
    with pytest.raises(ValueError, match="Invalid num_classes: 3"):
        BinaryClassifier(MLP(out_features=1), num_classes=3)
    with pytest.raises(ValueError, match="Invalid net for Classifier"):
        Classifier(MLP(out_features=1), num_classes=2)


# ---------------------------------------------------------------- Regressor loss scale, matrix sensing in float64
def matrix_sensing_setup(seed: int = 0, d: int = 8, m: int = 40, init_scale: float = 0.05):
    dm = MatrixSensingDataModule(
        dim=d, rank=2, num_measurements=m, num_val=4, num_test=4, dtype="float64", data_seed=seed
    )
    dm.setup()
    torch.manual_seed(seed)
    net = MatrixFactorization(dim=d, width=d, init_scale=init_scale)
    return dm, net


def plain_loss_and_grad(a: torch.Tensor, b: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(1/2m) Σ_i (⟨A_i, U Uᵀ⟩ − b_i)² and its gradient (1/m) Σ_i r_i (A_i + A_iᵀ) U, in closed form."""
    r = torch.einsum("ijk,jk->i", a, u @ u.T) - b
    loss = 0.5 * (r**2).mean()
    grad = torch.einsum("i,ijk->jk", r, a + a.transpose(1, 2)) @ u / len(b)
    return loss, grad


@pytest.mark.parametrize("rule", [None, "SAM", "USAM"])
def test_matrix_sensing_step_in_float64_against_plain_torch(rule):
    """loss_scale 0.5 and precision 64-true: the logged loss and the updated U equal the closed forms in float64.

    USAM's ascent ε = ρ∇L sees the loss scale; SAM's ε = ρ∇L/‖∇L‖ does not.
    """
    dm, net = matrix_sensing_setup()
    a, b = dm.train_set.tensors
    u0 = net.U.detach().double().clone()  # 64-true converts the float32 init to float64
    lr, rho = 0.5, 0.1
    loss0, g = plain_loss_and_grad(a, b, u0)
    if rule is None:
        direction = g
    else:
        eps = rho * g / g.norm() if rule == "SAM" else rho * g
        direction = plain_loss_and_grad(a, b, u0 + eps)[1]
    expected = u0 - lr * direction
    minimizer = {None: None, "SAM": SAM(rho=rho), "USAM": USAM(rho=rho)}[rule]
    model = Regressor(
        net, loss_scale=0.5, optimizer=partial(torch.optim.SGD, lr=lr), minimizer=minimizer, log_train_steps=True
    )
    trainer = quiet_trainer(max_steps=1, precision="64-true", limit_val_batches=0)
    trainer.fit(model, dm)
    assert net.U.dtype == torch.float64
    torch.testing.assert_close(net.U.detach(), expected, rtol=1e-10, atol=1e-12)  # float32 would miss by ~1e-7
    assert float(trainer.callback_metrics["train_step/loss"]) == pytest.approx(float(loss0), rel=1e-12)


def test_loss_scale_multiplies_the_logged_loss_and_is_checked():
    dm, net = matrix_sensing_setup(seed=1)
    a, b = dm.test_set.tensors
    u = net.U.detach().double()
    for scale in (1.0, 0.5, 2.0):
        model = Regressor(MatrixFactorization(dim=8, width=8), loss_scale=scale)
        with torch.no_grad():
            model.net.U.copy_(net.U)
        model.double()
        loss, pred, target, n = model.forward_loss((a, b), "test")
        residual = torch.einsum("ijk,jk->i", a, u @ u.T) - b
        assert float(loss) == pytest.approx(scale * float((residual**2).mean()), rel=1e-12) and n == 4
    for bad in (0.0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="Invalid loss_scale: "):
            Regressor(MatrixFactorization(dim=4, width=4), loss_scale=bad)


def test_usam_diverges_where_sam_converges_on_a_small_instance():
    """The published contrast in miniature (d = 30, r = 2, m = 5dr, lr 0.5, rho 0.1, 1/(2m) loss, float64).

    U_0 = 0.1·N(0, 1) at d = 30 (SAM ends below 0.7 and USAM overflows for data seeds 0-3 in a plain loop).
    """
    losses = {}
    for rule in ("SAM", "USAM"):
        dm, net = matrix_sensing_setup(seed=0, d=30, m=300, init_scale=0.1)
        model = Regressor(
            net,
            loss_scale=0.5,
            optimizer=partial(torch.optim.SGD, lr=0.5),
            minimizer=SAM(rho=0.1) if rule == "SAM" else USAM(rho=0.1),
            on_nonfinite="stop",
        )
        trainer = quiet_trainer(max_steps=10, precision="64-true", limit_val_batches=0)
        trainer.fit(model, dm)
        a, b = dm.train_set.tensors
        losses[rule] = float(plain_loss_and_grad(a, b, net.U.detach())[0])
    assert losses["SAM"] < 1.0
    assert not losses["USAM"] < 1e3  # diverged (or overflowed to inf / nan)
