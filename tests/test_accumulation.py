"""Gradient accumulation inside the two-pass step (``accumulate_grad_batches`` of TwoPassModule).

With the ascent on the accumulated gradient, k micro-batches of a mean loss give exactly the step on
the whole batch (no BatchNorm, no dropout: the networks here have neither), for the base optimizer
alone and every rule. The per-micro-batch ascent is replayed here from its definition with
``torch.func``. Lightning's own ``Trainer(accumulate_grad_batches=k)`` is refused by the module.
"""

from __future__ import annotations

import math
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from flatminima.lightning_modules import ASAM, GSAM, SAM, USAM, AdaptiveGSAM, Classifier
from tests.helpers import classification_batches, clone, fixed_batches, quiet_trainer

LR = 0.1
RULES = {
    "none": lambda: None,
    "sam": lambda: SAM(rho=0.3),
    "sam_inf": lambda: SAM(rho=0.01, p=math.inf),
    "usam": lambda: USAM(rho=0.2),
    "asam": lambda: ASAM(rho=0.5),
    "gsam": lambda: GSAM(rho=0.3, alpha=0.4),
    "agsam": lambda: AdaptiveGSAM(rho=0.3, alpha=0.4, gamma=0.1),
}


def mlp(seed=0) -> nn.Module:
    """No BatchNorm, no dropout: the micro-batches' mean gradients add up to the batch's."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    net.out_features = 3
    return net


def _fit(net, batches, rule, **kw):
    model = Classifier(
        clone(net), num_classes=3, optimizer=partial(torch.optim.SGD, lr=LR, momentum=0.9), minimizer=rule, **kw
    )
    trainer = quiet_trainer(max_epochs=1, precision="64-true")
    trainer.fit(model, fixed_batches(batches))
    return model, trainer


@pytest.mark.parametrize("kind", list(RULES))
@pytest.mark.parametrize("size, k", [(16, 4), (15, 4)])  # 4 × 4, and 4 + 4 + 4 + 3 (weights nᵢ/N)
def test_accumulated_ascent_equals_the_whole_batch_step(kind, size, k):
    net, batches = mlp(), classification_batches(3, batch=size)
    whole, t1 = _fit(net, batches, RULES[kind]())
    acc, t2 = _fit(net, batches, RULES[kind](), accumulate_grad_batches=k)
    assert t1.global_step == t2.global_step == 3  # one optimizer step per loader batch
    for (name, a), b in zip(whole.named_parameters(), acc.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12, msg=name)
    for key in ("train/loss", "train/grad_norm") + (("train/loss_perturbed",) if kind != "none" else ()):
        assert float(t2.callback_metrics[key]) == pytest.approx(float(t1.callback_metrics[key]), rel=1e-12), key


def _grad(net, w, x, y):
    names = list(w)
    values = [w[n].detach().requires_grad_(True) for n in names]
    loss = F.cross_entropy(functional_call(net, dict(zip(names, values)), (x,)), y)
    return dict(zip(names, torch.autograd.grad(loss, values)))


def _norm(d):
    return math.sqrt(sum(float((v * v).sum()) for v in d.values()))


@pytest.mark.parametrize("kind", ["sam", "gsam"])
def test_micro_ascent_is_the_mean_of_the_micro_batches_directions(kind):
    net, batches = mlp(seed=1), classification_batches(2, batch=12, seed=4)
    rule = SAM(rho=0.3) if kind == "sam" else GSAM(rho=0.3, alpha=0.4)
    model, trainer = _fit(net, batches, rule, accumulate_grad_batches=3, accumulate_ascent="micro")
    ref = clone(net)
    w = {n: p.detach().clone() for n, p in ref.named_parameters()}
    buf = {n: torch.zeros_like(v) for n, v in w.items()}
    for x, y in batches:
        d = {n: torch.zeros_like(v) for n, v in w.items()}
        for xi, yi in zip(x.split(4), y.split(4)):  # εᵢ from the micro-batch's own gradient
            g = _grad(ref, w, xi, yi)
            gp = _grad(ref, {n: w[n] + 0.3 * g[n] / (_norm(g) + 1e-12) for n in w}, xi, yi)
            if kind == "gsam":
                c = sum(float((g[n] * gp[n]).sum()) for n in w) / _norm(gp) ** 2
                gp = {n: gp[n] - 0.4 * (g[n] - c * gp[n]) for n in w}
            d = {n: d[n] + gp[n] / 3 for n in w}
        buf = {n: 0.9 * buf[n] + d[n] for n in w}  # SGD momentum 0.9
        w = {n: w[n] - LR * buf[n] for n in w}
    for name, p in model.net.named_parameters():
        torch.testing.assert_close(p.detach(), w[name], rtol=0, atol=1e-12, msg=name)
    # and it is another algorithm than the accumulated ascent
    other, _ = _fit(
        net, batches, SAM(rho=0.3) if kind == "sam" else GSAM(rho=0.3, alpha=0.4), accumulate_grad_batches=3
    )
    assert not torch.allclose(other.net[0].weight, model.net[0].weight, atol=1e-6)


def test_trainer_accumulation_is_refused_with_the_module_argument_in_the_message():
    model = Classifier(mlp(), num_classes=3, optimizer=partial(torch.optim.SGD, lr=LR))
    trainer = quiet_trainer(max_epochs=1, accumulate_grad_batches=4)
    with pytest.raises(ValueError, match=r"pass accumulate_grad_batches=4 to Classifier instead"):
        trainer.fit(model, fixed_batches(classification_batches(2)))
    trainer = quiet_trainer(max_epochs=1, gradient_clip_val=1.0)
    with pytest.raises(ValueError, match=r"pass gradient_clip_val to Classifier instead"):
        trainer.fit(model, fixed_batches(classification_batches(2)))


def test_a_batch_that_cannot_be_split_is_refused_at_the_first_step():
    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.randn(3, dtype=torch.float64), i % 3

    class Odd(Classifier):
        def forward_loss(self, batch, stage):
            return super().forward_loss((batch[0], batch[1].long()), stage)

    model = Odd(mlp(), num_classes=3, optimizer=partial(torch.optim.SGD, lr=LR), accumulate_grad_batches=2)
    loader = torch.utils.data.DataLoader(
        Pairs(), batch_size=4, collate_fn=lambda b: (torch.stack([x for x, _ in b]), [y for _, y in b])
    )
    with pytest.raises(ValueError, match=r"Invalid accumulate_grad_batches: 2; it splits each batch"):
        quiet_trainer(max_epochs=1, precision="64-true").fit(model, loader)
    assert model.trainer.global_step == 0
    with pytest.raises(ValueError, match=r"Invalid accumulate_grad_batches: 0; expected an integer >= 1"):
        Classifier(mlp(), num_classes=3, accumulate_grad_batches=0)
    with pytest.raises(ValueError, match=r"Invalid accumulate_ascent: 'each'"):
        Classifier(mlp(), num_classes=3, accumulate_ascent="each")


def test_gradient_norm_callback_reads_the_accumulated_clean_gradient_once_per_step(tmp_path):
    from flatminima.callbacks import GradientNormSharpness

    callback = GradientNormSharpness(rho=0.5, log_every_step=False)
    model = Classifier(
        mlp(),
        num_classes=3,
        optimizer=partial(torch.optim.SGD, lr=LR),
        minimizer=SAM(rho=0.1),
        accumulate_grad_batches=4,
    )
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[callback],
        logger=False,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        precision="64-true",
    )
    trainer.fit(model, fixed_batches(classification_batches(3, batch=16)))
    assert float(trainer.callback_metrics["sharpness/gradient_norm"]) == pytest.approx(
        0.5 * float(trainer.callback_metrics["train/grad_norm"]), rel=1e-6
    )
