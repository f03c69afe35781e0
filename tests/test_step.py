"""The two-pass step of the LightningModule, checked against independent computations.

The expected values are computed here from the formulas (docs/design.md, "Update rules") with ``torch.func`` on a
copy of the network, per parameter, in float64 — not with the library's rule objects.
"""

from __future__ import annotations

import math
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from flatminima.lightning_modules import ASAM, GSAM, SAM, USAM, AdaptiveGSAM, Classifier
from tests.helpers import bn_mlp, classification_batches, clone, fixed_batches, params_of, quiet_trainer

LR = 0.1


def _grad(net, named, x, y):
    """∇L_B at the weights ``named`` (train-mode BN on a copy of ``net``), per parameter name."""
    names = list(named)
    values = [named[n].detach().requires_grad_(True) for n in names]
    loss = F.cross_entropy(functional_call(clone(net), dict(zip(names, values)), (x,)), y)
    return dict(zip(names, torch.autograd.grad(loss, values)))


def _norm(d):
    return math.sqrt(sum(float((v * v).sum()) for v in d.values()))


def _expected_sgd_step(net, x, y, kind, rho, **kw):
    """w − lr·d for one rule, from the formulas."""
    w = {n: p.detach().clone() for n, p in net.named_parameters()}
    g = _grad(net, w, x, y)
    if kind == "none":
        return {n: w[n] - LR * g[n] for n in w}
    if kind == "sam":
        e = {n: rho * g[n] / (_norm(g) + 1e-12) for n in w}
    elif kind == "sam_inf":
        e = {n: rho * torch.sign(g[n]) for n in w}
    elif kind == "usam":
        e = {n: rho * g[n] for n in w}
    elif kind in ("asam", "asam_all"):
        t = {n: (w[n].abs() + kw["eta"]) if (kind == "asam_all" or "weight" in n) else torch.ones_like(w[n]) for n in w}
        ntg = _norm({n: t[n] * g[n] for n in w})
        e = {n: rho * t[n] ** 2 * g[n] / (ntg + 1e-12) for n in w}
    elif kind in ("gsam", "agsam"):
        scale = (lambda n: w[n].abs() + kw["gamma"]) if kind == "agsam" else (lambda n: 1.0)
        e = {n: rho * scale(n) * g[n] / (_norm(g) + 1e-12) for n in w}
    gp = _grad(net, {n: w[n] + e[n] for n in w}, x, y)
    d = gp
    if kind in ("gsam", "agsam"):
        dot = sum(float((g[n] * gp[n]).sum()) for n in w)
        perp = {n: g[n] - dot / _norm(gp) ** 2 * gp[n] for n in w}
        d = {n: gp[n] - kw["alpha"] * perp[n] for n in w}
    return {n: w[n] - LR * d[n] for n in w}


CASES = [
    ("none", None, {}),
    ("sam", SAM(rho=0.05), {}),
    ("sam_inf", SAM(rho=0.01, p=math.inf), {}),
    ("usam", USAM(rho=0.2), {}),
    ("asam", ASAM(rho=0.5, eta=0.01), {"eta": 0.01}),
    ("asam_all", ASAM(rho=0.5, eta=0.0, scope="all"), {"eta": 0.0}),
    ("gsam", GSAM(rho=0.05, alpha=0.3), {"alpha": 0.3}),
    ("agsam", AdaptiveGSAM(rho=0.05, alpha=0.3, gamma=0.01), {"alpha": 0.3, "gamma": 0.01}),
]


@pytest.mark.parametrize(("kind", "rule", "kw"), CASES, ids=[c[0] for c in CASES])
def test_one_step_equals_the_formula(kind, rule, kw):
    net = bn_mlp()
    ((x, y),) = classification_batches(1)
    expected = _expected_sgd_step(net, x, y, kind, getattr(rule, "rho", 0.0), **kw)
    model = Classifier(clone(net), num_classes=3, optimizer=partial(torch.optim.SGD, lr=LR), minimizer=rule)
    trainer = quiet_trainer(max_steps=1, precision="64-true")
    trainer.fit(model, fixed_batches([(x, y)]))
    assert trainer.global_step == 1
    for n, p in model.net.named_parameters():
        assert torch.allclose(p.detach(), expected[n], rtol=0, atol=1e-9), n


@pytest.mark.parametrize("rule", [SAM(0.05), GSAM(0.05, alpha=0.2), ASAM(0.5)], ids=repr)
def test_batchnorm_stats_after_a_step_equal_one_clean_forward(rule):
    net = bn_mlp()
    net[1].momentum = None  # cumulative average: a second update would also show in num_batches_tracked
    ((x, y),) = classification_batches(1)
    reference = clone(net).train()
    with torch.no_grad():
        reference(x)
    model = Classifier(clone(net), num_classes=3, optimizer=partial(torch.optim.SGD, lr=LR), minimizer=rule)
    quiet_trainer(max_steps=1, precision="64-true").fit(model, fixed_batches([(x, y)]))
    for (n, a), b in zip(model.net.named_buffers(), reference.buffers()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("rule", [SAM(5.0), USAM(50.0), ASAM(5.0), GSAM(5.0, alpha=0.5)], ids=repr)
def test_weights_are_restored_exactly(rule):
    # lr = 0: the base optimizer does not move, so any trace of w + ε − ε would show (float32, large ρ)
    net = bn_mlp(dtype=torch.float32)
    batches = classification_batches(3, dtype=torch.float32)
    before = params_of(net)
    model = Classifier(net, num_classes=3, optimizer=partial(torch.optim.SGD, lr=0.0), minimizer=rule)
    quiet_trainer(max_steps=3).fit(model, fixed_batches(batches))
    for a, b in zip(model.net.parameters(), before):
        assert torch.equal(a.detach(), b)


def test_base_optimizer_alone_equals_a_plain_pytorch_loop_bit_for_bit():
    net = bn_mlp(dtype=torch.float32)
    batches = classification_batches(7, dtype=torch.float32)
    plain = clone(net)
    opt = torch.optim.SGD(plain.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        opt.step()
    model = Classifier(
        clone(net), num_classes=3, optimizer=partial(torch.optim.SGD, lr=LR, momentum=0.9, weight_decay=5e-4)
    )
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(model, fixed_batches(batches))
    assert trainer.global_step == len(batches)
    for a, b in zip(model.net.parameters(), plain.parameters()):
        assert torch.equal(a.detach(), b.detach())
    for a, b in zip(model.net.buffers(), plain.buffers()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rule", [None, SAM(0.05), GSAM(0.05, alpha=0.1)], ids=repr)
def test_global_step_counts_batches_and_logs_are_named(rule):
    batches = classification_batches(5, dtype=torch.float32)
    model = Classifier(
        bn_mlp(dtype=torch.float32), num_classes=3, optimizer=partial(torch.optim.SGD, lr=LR), minimizer=rule
    )
    trainer = quiet_trainer(max_epochs=2)
    trainer.fit(model, fixed_batches(batches), fixed_batches(batches[:2]))
    assert trainer.global_step == 10
    keys = set(trainer.logged_metrics)
    expected = {"train/loss", "train/acc", "train/grad_norm", "val/loss", "val/acc"}
    if rule is not None:
        expected.add("train/loss_perturbed")
    assert expected <= keys, keys
    if rule is not None:
        # the clean loss is the pass-1 loss: the perturbed one is larger on average for SAM-type ascent
        assert float(trainer.logged_metrics["train/loss_perturbed"]) > float(trainer.logged_metrics["train/loss"])


def test_gradient_clipping_clips_the_final_direction():
    net = bn_mlp()
    ((x, y),) = classification_batches(1)
    expected = _expected_sgd_step(net, x, y, "sam", 0.05)
    w = {n: p.detach() for n, p in net.named_parameters()}
    d = {n: (w[n] - expected[n]) / LR for n in w}
    clip = 0.5 * _norm(d)
    model = Classifier(
        clone(net),
        num_classes=3,
        optimizer=partial(torch.optim.SGD, lr=LR),
        minimizer=SAM(0.05),
        gradient_clip_val=clip,
    )
    quiet_trainer(max_steps=1, precision="64-true").fit(model, fixed_batches([(x, y)]))
    for n, p in model.net.named_parameters():
        clipped = w[n] - LR * d[n] * clip / (_norm(d) + 1e-6)
        assert torch.allclose(p.detach(), clipped, atol=1e-9), n


def test_step_lr_schedule_and_gsam_rho_follow_the_counters():
    batches = classification_batches(4)
    net = bn_mlp()
    sched = partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lambda s: 1.0 / (1 + s))
    rule = GSAM(rho=0.1, alpha=0.0, rho_min=0.0)
    model = Classifier(
        clone(net),
        num_classes=3,
        optimizer=partial(torch.optim.SGD, lr=LR),
        minimizer=rule,
        lr_scheduler=sched,
        lr_scheduler_interval="step",
    )
    quiet_trainer(max_epochs=1, precision="64-true").fit(model, fixed_batches(batches))
    # replay with the formula: step s uses lr = LR/(1+s) and rho = 0.1 * lr / LR
    ref = clone(net)
    for s, (x, y) in enumerate(batches):
        lr = LR / (1 + s)
        rho = 0.1 * lr / LR
        w = {n: p.detach().clone() for n, p in ref.named_parameters()}
        g = _grad(ref, w, x, y)
        gp = _grad(ref, {n: w[n] + rho * g[n] / (_norm(g) + 1e-12) for n in w}, x, y)
        with torch.no_grad():
            for n, p in ref.named_parameters():
                p.copy_(w[n] - lr * gp[n])
            ref.train()(x)  # BN running stats as in one clean forward
    for a, b in zip(model.net.parameters(), ref.parameters()):
        assert torch.allclose(a.detach(), b.detach(), atol=1e-9)
    assert model.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(LR / 5)


@pytest.mark.parametrize("policy", ["raise", "skip", "stop"])
def test_non_finite_loss_never_reaches_the_weights(policy):
    batches = classification_batches(4, dtype=torch.float32)
    batches[1] = (batches[1][0].clone().fill_(float("nan")), batches[1][1])
    net = bn_mlp(dtype=torch.float32)
    model = Classifier(
        net,
        num_classes=3,
        optimizer=partial(torch.optim.SGD, lr=LR, momentum=0.9),
        minimizer=SAM(0.05),
        on_nonfinite=policy,
    )
    trainer = quiet_trainer(max_epochs=1)
    if policy == "raise":
        with pytest.raises(FloatingPointError, match="Non-finite training loss or gradient at epoch 0, step 1"):
            trainer.fit(model, fixed_batches(batches))
    else:
        with pytest.warns(UserWarning, match="Non-finite"):
            trainer.fit(model, fixed_batches(batches))
        assert model.skipped_steps == 1
        assert trainer.global_step == (4 if policy == "skip" else 2)
    assert all(torch.isfinite(p).all() for p in model.net.parameters())


def test_ignore_policy_lets_nan_through_like_plain_pytorch():
    batches = classification_batches(2, dtype=torch.float32)
    batches[0] = (batches[0][0].clone().fill_(float("nan")), batches[0][1])
    model = Classifier(
        bn_mlp(dtype=torch.float32),
        num_classes=3,
        optimizer=partial(torch.optim.SGD, lr=LR),
        minimizer=SAM(0.05),
        on_nonfinite="ignore",
    )
    quiet_trainer(max_epochs=1).fit(model, fixed_batches(batches))
    assert not all(torch.isfinite(p).all() for p in model.net.parameters())


def test_fresh_dropout_masks_in_pass_two_unless_shared():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.Dropout(0.5), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    ((x, y),) = classification_batches(1, dtype=torch.float32)
    masks = {}

    class Record(torch.nn.Module):
        def forward(self, z):
            masks.setdefault("seen", []).append((z != 0).clone())
            return z

    net.insert(2, Record())
    for share in (False, True):
        masks.clear()
        model = Classifier(
            clone(net),
            num_classes=3,
            optimizer=partial(torch.optim.SGD, lr=LR),
            minimizer=SAM(0.05),
            share_dropout_rng=share,
        )
        quiet_trainer(max_steps=1).fit(model, fixed_batches([(x, y)]))
        first, second = masks["seen"]
        assert torch.equal(first, second) == share


def test_an_error_in_pass_two_leaves_the_weights_and_stats_unperturbed():
    net = bn_mlp(dtype=torch.float32)
    calls = {"n": 0}

    class FailSecond(torch.nn.Module):
        def forward(self, z):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("simulated out of memory in pass 2")
            return z

    net.insert(0, FailSecond())
    before = [t.detach().clone() for t in list(net.parameters()) + list(net.buffers())]
    model = Classifier(net, num_classes=3, optimizer=partial(torch.optim.SGD, lr=LR), minimizer=SAM(1.0))
    ((x, y),) = classification_batches(1, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="simulated out of memory"):
        quiet_trainer(max_steps=1).fit(model, fixed_batches([(x, y)]))
    reference = clone(bn_mlp(dtype=torch.float32)).train()
    with torch.no_grad():
        reference(x)  # pass 1 did run: the BN stats are those of one clean forward
    assert all(
        torch.equal(a.detach(), b) for a, b in zip(model.net.parameters(), before[: len(list(net.parameters()))])
    )
    for a, b in zip(model.net.buffers(), reference.buffers()):
        assert torch.equal(a, b)


def test_reduce_lr_on_plateau_sees_this_epochs_validation_loss():
    batches = classification_batches(4, dtype=torch.float32)
    seen = []

    class Plateau(torch.optim.lr_scheduler.ReduceLROnPlateau):
        def step(self, metrics):
            seen.append(metrics)
            super().step(metrics)

    val_losses = []

    class Record(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                val_losses.append(float(trainer.callback_metrics["val/loss"]))

    # mode="max" on a falling loss: every epoch is "worse", so with patience 0 each one halves the lr
    sched = partial(Plateau, mode="max", patience=0, factor=0.5)
    model = Classifier(
        bn_mlp(dtype=torch.float32),
        num_classes=3,
        optimizer=partial(torch.optim.SGD, lr=LR),
        minimizer=SAM(0.05),
        lr_scheduler=sched,
    )
    trainer = quiet_trainer(max_epochs=3, callbacks=[Record()], num_sanity_val_steps=1)
    trainer.fit(model, fixed_batches(batches), fixed_batches(batches[:2]))
    assert seen == pytest.approx(val_losses) and len(seen) == 3
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(LR * 0.5**2)
