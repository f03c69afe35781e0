"""The efficient SAM variants through the module, step by step, against their formulas replayed in float64.

Each test trains a tiny float64 network for a handful of steps (one-pass steps included) and compares the weights
with an independent replay (tests/efficient_reference.py); none uses the library's rules to compute what it expects.
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from flatminima.lightning_modules import SAM, Classifier
from flatminima.lightning_modules.minimizers import (
    ESAM,
    GSAM,
    MESA,
    SAF,
    AdaptiveSteps,
    EveryK,
    LookSAM,
    MomentumSAM,
    RandomSteps,
)
from tests import efficient_reference as ref
from tests.helpers import bn_mlp, classification_batches, clone, fixed_batches, quiet_trainer

pytestmark = pytest.mark.usefixtures("one_thread")

LR, RHO = 0.1, 0.05


def _fit(rule, batches, *, epochs=1, ids=False, optimizer=None, net=None, **trainer_kw):
    """Train a copy of the tanh MLP on ``batches`` (in order, every epoch); return the model and the trainer."""
    net = ref.tanh_mlp() if net is None else net
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    data = (x, y, torch.arange(len(y))) if ids else (x, y)
    loader = DataLoader(TensorDataset(*data), batch_size=len(batches[0][1]), shuffle=False)
    model = Classifier(
        clone(net), num_classes=3, minimizer=rule, optimizer=optimizer or partial(torch.optim.SGD, lr=LR, momentum=0.9)
    )
    trainer = quiet_trainer(max_epochs=epochs, precision="64-true", **trainer_kw)
    trainer.fit(model, loader)
    return model, trainer


def _assert_weights(model, expected, atol=1e-10):
    for n, p in model.net.named_parameters():
        assert torch.allclose(p.detach(), expected[n], rtol=0, atol=atol), (n, (p.detach() - expected[n]).abs().max())


def _gsam_d(g, gs, alpha):
    c = ref.dot(g, gs) / ref.norm(gs) ** 2
    return {k: gs[k] - alpha * (g[k] - c * gs[k]) for k in g}


# ---------------------------------------------------------------------------------------- LookSAM
def test_looksam_sam_steps_and_reuse_steps_follow_the_formula():
    batches = classification_batches(5)
    k, alpha = 2, 0.7
    model, _ = _fit(LookSAM(rho=RHO, k=k, alpha=alpha), batches)
    net, opt = ref.tanh_mlp(), ref.SGD(LR, 0.9)
    w, g_v = ref.weights(net), None
    for t, (x, y) in enumerate(batches):
        if t % k == 0:  # SAM step; keep g_v = g_s − (⟨g, g_s⟩/‖g‖²)·g
            g, d = ref.sam_direction(net, w, x, y, RHO)
            c = ref.dot(g, d) / ref.norm(g) ** 2
            g_v = {n: d[n] - c * g[n] for n in g}
        else:  # one pass: d = g + α·(‖g‖/‖g_v‖)·g_v
            g = ref.grad(net, w, x, y)
            d = {n: g[n] + alpha * ref.norm(g) / ref.norm(g_v) * g_v[n] for n in g}
        w = opt.step(w, d)
    _assert_weights(model, w)


@pytest.mark.parametrize(
    "make",
    [lambda: LookSAM(rho=RHO, k=1, alpha=0.7), lambda: EveryK(SAM(RHO), k=1)],
    ids=["LookSAM(k=1)", "EveryK(k=1)"],
)
def test_k_equal_one_is_sam_bit_for_bit(make):
    batches = classification_batches(6, dtype=torch.float32)
    net = bn_mlp(dtype=torch.float32)
    runs = []
    for rule in (SAM(RHO), make()):
        model = Classifier(
            clone(net),
            num_classes=3,
            minimizer=rule,
            optimizer=partial(torch.optim.SGD, lr=LR, momentum=0.9, weight_decay=5e-4),
        )
        quiet_trainer(max_epochs=1).fit(model, fixed_batches(batches))
        runs.append([t.detach().clone() for t in list(model.net.parameters()) + list(model.net.buffers())])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# ---------------------------------------------------------------------------------------- schedules
def test_every_k_takes_the_rule_on_every_kth_step_and_the_base_step_otherwise():
    batches = classification_batches(5)
    model, _ = _fit(EveryK(GSAM(rho=RHO, alpha=0.3), k=3), batches)
    net, opt = ref.tanh_mlp(), ref.SGD(LR, 0.9)
    w = ref.weights(net)
    for t, (x, y) in enumerate(batches):
        if t % 3 == 0:
            g, gs = ref.sam_direction(net, w, x, y, RHO)
            d = _gsam_d(g, gs, 0.3)
        else:
            d = ref.grad(net, w, x, y)
        w = opt.step(w, d)
    _assert_weights(model, w)


def test_random_steps_draw_from_seed_and_step():
    batches = classification_batches(6)
    seed, p = 1, 0.5
    plan = [u < p for u in (ref.uniforms(seed, t, 1)[0] for t in range(6))]
    assert any(plan) and not all(plan)  # both kinds of step are exercised
    model, _ = _fit(RandomSteps(SAM(RHO), p=p, seed=seed), batches)
    net, opt = ref.tanh_mlp(), ref.SGD(LR, 0.9)
    w = ref.weights(net)
    for two, (x, y) in zip(plan, batches):
        d = ref.sam_direction(net, w, x, y, RHO)[1] if two else ref.grad(net, w, x, y)
        w = opt.step(w, d)
    _assert_weights(model, w)


def test_adaptive_steps_follow_ae_sams_statistics_and_threshold():
    batches = classification_batches(8)
    delta, c0, c1, total = 0.5, 0.5, -0.5, 8
    rule = AdaptiveSteps(SAM(RHO), delta=delta, c_start=c0, c_end=c1)  # T = 8 optimizer steps, from the trainer
    model, _ = _fit(rule, batches)
    net, opt = ref.tanh_mlp(), ref.SGD(LR, 0.9)
    w, mu, var, plan = ref.weights(net), 0.0, 0.0, []
    for t, (x, y) in enumerate(batches):
        g = ref.grad(net, w, x, y)
        sq = ref.norm(g) ** 2
        mu = delta * mu + (1 - delta) * sq
        var = delta * var + (1 - delta) * (sq - mu) ** 2
        plan.append(sq >= mu + (c0 + (c1 - c0) * t / total) * var**0.5)
        w = opt.step(w, ref.sam_direction(net, w, x, y, RHO)[1] if plan[-1] else g)
    assert any(plan) and not all(plan), plan
    _assert_weights(model, w)
    assert rule.mu == pytest.approx(mu, rel=1e-12) and rule.var == pytest.approx(var, rel=1e-12)


# ---------------------------------------------------------------------------------------- Momentum-SAM
def test_momentum_sam_takes_its_gradient_against_the_momentum_and_logs_the_clean_loss():
    batches = classification_batches(5)
    rho, wd = 0.3, 5e-4
    model, trainer = _fit(
        MomentumSAM(rho=rho), batches, optimizer=partial(torch.optim.SGD, lr=LR, momentum=0.9, weight_decay=wd)
    )
    net, opt = ref.tanh_mlp(), ref.SGD(LR, 0.9, wd)
    w, clean = ref.weights(net), []
    for x, y in batches:
        v = opt.v
        eps = {n: 0.0 * w[n] if v is None else -rho * v[n] / (ref.norm(v) + 1e-12) for n in w}
        clean.append(float(torch.nn.functional.cross_entropy(ref.logits(net, w, x), y)))
        w = opt.step(w, ref.grad(net, {n: w[n] + eps[n] for n in w}, x, y))  # weight decay at w, not w + ε
    _assert_weights(model, w)
    assert float(trainer.logged_metrics["train/loss"]) == pytest.approx(sum(clean) / len(clean), rel=1e-12)
    assert "train/grad_norm" not in trainer.logged_metrics  # there is no gradient at w


def test_momentum_sam_without_clean_loss_logs_no_train_loss():
    model, trainer = _fit(MomentumSAM(rho=0.3, clean_loss=False), classification_batches(3))
    assert "train/loss" not in trainer.logged_metrics and "train/loss_perturbed" in trainer.logged_metrics
    assert "train/loss" not in model.epoch_metric_names("train")


def test_momentum_sam_leaves_no_perturbation_where_validation_and_checkpoints_look(tmp_path):
    """lr = 0: w never moves, so every look at the weights outside the pass must see w0 exactly (float32)."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    net = bn_mlp(dtype=torch.float32)
    w0 = [p.detach().clone() for p in net.parameters()]
    seen = {"inside": 0, "outside": 0}

    class Look(pl.Callback):
        def _check(self, module):
            seen["outside"] += 1
            assert all(torch.equal(p.detach(), q) for p, q in zip(module.net.parameters(), w0))

        def on_after_backward(self, trainer, module):
            if module.pass_index == 2 and module.global_step > 0:  # inside MSAM's pass: w0 + ε (ε = 0 at step 0)
                seen["inside"] += 1
                assert not all(torch.equal(p.detach(), q) for p, q in zip(module.net.parameters(), w0))

        on_train_batch_start = lambda self, t, m, *a: self._check(m)  # noqa: E731
        on_train_batch_end = lambda self, t, m, *a: self._check(m)  # noqa: E731
        on_validation_batch_start = lambda self, t, m, *a: self._check(m)  # noqa: E731
        on_save_checkpoint = lambda self, t, m, c: self._check(m)  # noqa: E731

    batches = classification_batches(4, dtype=torch.float32)
    model = Classifier(
        net, num_classes=3, minimizer=MomentumSAM(rho=5.0), optimizer=partial(torch.optim.SGD, lr=0.0, momentum=0.9)
    )
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    quiet_trainer(max_epochs=2, enable_checkpointing=True, callbacks=[Look(), ckpt], num_sanity_val_steps=1).fit(
        model, fixed_batches(batches), fixed_batches(batches[:1])
    )
    assert seen["inside"] == 7 and seen["outside"] >= 16  # step 0 has no momentum yet: ε = 0
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(saved[f"net.{n}"], q) for (n, _), q in zip(net.named_parameters(), w0))


# ---------------------------------------------------------------------------------------- ESAM
def test_esam_perturbs_a_random_subset_of_tensors_and_descends_on_the_sharpest_samples():
    batches = classification_batches(4)
    rho, beta, gamma, seed = 0.2, 0.5, 0.5, 7
    model, trainer = _fit(ESAM(rho=rho, beta=beta, gamma=gamma, seed=seed), batches)
    net, opt = ref.tanh_mlp(), ref.SGD(LR, 0.9)
    w, names, masked = ref.weights(net), [n for n, _ in ref.tanh_mlp().named_parameters()], 0
    for t, (x, y) in enumerate(batches):
        frozen = [u >= beta for u in ref.uniforms(seed, t, len(names))]
        frozen = [False] * len(names) if all(frozen) else frozen
        masked += any(frozen)
        g = ref.grad(net, w, x, y)
        active = {n: g[n] for n, f in zip(names, frozen) if not f}
        scale = rho / (beta * (ref.norm(active) + 1e-12))
        w_eps = {n: w[n] + scale * active[n] if n in active else w[n] for n in w}
        ce = torch.nn.functional.cross_entropy
        rise = ce(ref.logits(net, w_eps, x), y, reduction="none") - ce(ref.logits(net, w, x), y, reduction="none")
        keep = torch.sort(torch.topk(rise, int(len(y) * gamma)).indices).values
        w = opt.step(w, ref.grad(net, w_eps, x[keep], y[keep]))
    assert masked >= 2
    _assert_weights(model, w)
    assert "train/grad_norm" not in trainer.logged_metrics  # pass 1 had a partial gradient


def test_esam_data_selection_is_refused_on_a_task_without_per_sample_losses():
    from flatminima.lightning_modules import NodeClassifier

    model = NodeClassifier(ref.tanh_mlp(), num_classes=3, minimizer=ESAM(gamma=0.5))
    from flatminima.lightning_modules._rule import RuleSetup

    with pytest.raises(ValueError, match="Invalid ESAM gamma: 0.5; .*NodeClassifier does not provide.*gamma=1.0"):
        model.minimizer.setup(RuleSetup(task="NodeClassifier", sample_losses=model.supports_sample_losses))


# ---------------------------------------------------------------------------------------- SAF and MESA
def test_saf_adds_the_kl_to_each_samples_outputs_from_earlier_epochs():
    batches = classification_batches(3)
    lam, tau, back = 0.4, 2.0, 1
    model, trainer = _fit(SAF(lam=lam, temperature=tau, minus_epochs=back, start_epoch=0), batches, epochs=3, ids=True)
    net, opt = ref.tanh_mlp(), ref.SGD(LR, 0.9)
    w, store, clean = ref.weights(net), {}, []
    for epoch in range(3):
        clean.clear()
        for b, (x, y) in enumerate(batches):
            z = ref.logits(net, w, x).detach()
            store[(epoch, b)] = z
            clean.append(float(torch.nn.functional.cross_entropy(z, y)))
            old = store.get((epoch - back, b)) if epoch > 0 else None
            extra = None if old is None else (lambda z_, old=old: lam * ref.kl_term(z_, old, tau))
            w = opt.step(w, ref.grad(net, w, x, y, extra=extra))
    _assert_weights(model, w)
    assert float(trainer.logged_metrics["train/loss"]) == pytest.approx(sum(clean) / 3, rel=1e-12)  # CE alone


def test_saf_refuses_a_batch_without_indices():
    with pytest.raises(ValueError, match=r"Invalid batch for SAF: .*\(x, y, idx\).*data\.init_args\.with_indices"):
        _fit(SAF(), classification_batches(2), ids=False)


def test_mesa_adds_the_kl_to_an_ema_copy_of_the_weights():
    batches = classification_batches(3)
    lam, tau, decay = 0.5, 2.0, 0.8
    model, _ = _fit(MESA(lam=lam, temperature=tau, decay=decay, start_epoch=0), batches, epochs=2)
    net, opt = ref.tanh_mlp(), ref.SGD(LR, 0.9)
    w = ref.weights(net)
    teacher = copy.deepcopy(w)
    for epoch in range(2):
        for x, y in batches:
            z_teacher = ref.logits(net, teacher, x).detach()
            extra = None if epoch == 0 else (lambda z_, r=z_teacher: lam * ref.kl_term(z_, r, tau))
            w = opt.step(w, ref.grad(net, w, x, y, extra=extra))
            teacher = {n: decay * teacher[n] + (1 - decay) * w[n] for n in w}
    _assert_weights(model, w)
    for (n, _), p in zip(net.named_parameters(), model.minimizer.teacher.parameters()):
        assert torch.allclose(p, teacher[n], rtol=0, atol=1e-10), n


def test_saf_and_mesa_refuse_a_task_without_class_logits():
    from flatminima.lightning_modules import Regressor

    for rule in (SAF(), MESA()):
        model = Regressor(torch.nn.Linear(3, 1), minimizer=rule)
        with pytest.raises(ValueError, match=f"Invalid minimizer for Regressor: {type(rule).__name__} .*Classifier"):
            quiet_trainer(max_steps=1).fit(model, fixed_batches([(torch.randn(8, 3), torch.randn(8))]))
