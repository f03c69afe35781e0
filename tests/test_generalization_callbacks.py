"""The generalization-measure callbacks inside real Lightning fits: values, the end of fit, resume, the summary.

Values are checked against the pure functions on the same fixed subset; the initial weights across a
resume bit for bit; the final training evaluation against the network evaluated by hand; the preset
through the CLI. DDP: tests/ddp_measures_script.py (run by tests/test_sharpness_callbacks.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flatminima.callbacks import (
    AverageSharpness,
    ComplexityMeasures,
    FinalTrainEvaluation,
    FisherRaoNorm,
    LossThresholdCheckpoint,
    PacBayesFlatness,
    RunSummary,
    WorstCaseSharpness,
    measures,
)

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)

pytestmark = pytest.mark.usefixtures("one_thread")


def dataset(n=96, seed=0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


class Net(pl.LightningModule):
    """A foreign LightningModule: Linear → BatchNorm → ReLU → Dropout → Linear as ``self.net``."""

    def __init__(self, dropout: float = 0.3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader(n=96, shuffle=True):
    return DataLoader(dataset(n), batch_size=16, shuffle=shuffle, generator=torch.Generator().manual_seed(0))


def subset(data, indices, batch_size):
    x = torch.stack([data[i][0] for i in indices])
    y = torch.stack([data[i][1] for i in indices])
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(indices), batch_size)]


SMALL = dict(num_samples=48, batch_size=24, at_end=True, on_checkpoint=False)


def _callbacks():
    return [
        PacBayesFlatness(depth=6, samples=3, **SMALL),
        WorstCaseSharpness(depth=5, restarts=2, steps=2, **SMALL),
        AverageSharpness(rho=0.1, samples=4, **SMALL),
        AverageSharpness(rho=0.1, p=math.inf, samples=4, **SMALL),
        ComplexityMeasures(**SMALL),
        FisherRaoNorm(**SMALL),
        FinalTrainEvaluation(),
    ]


def test_the_callbacks_measure_the_final_weights_once_as_the_pure_functions_do(tmp_path):
    callbacks = _callbacks()
    every = ComplexityMeasures(name="every", every_n_epochs=1, **{**SMALL, "at_end": True})
    module = Net()
    initial = {k: v.clone() for k, v in module.net.state_dict().items()}
    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=[*callbacks, every, RunSummary(str(tmp_path / "summary.json"))],
        logger=CSVLogger(tmp_path),
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        **QUIET,
    )
    trainer.fit(module, loader())
    assert all(len(c.history) == 1 for c in callbacks)  # at the end of fit only
    assert [h["epoch"] for h in every.history] == [0, 1]  # measured at the last epoch end: not again at the end
    data, net = dataset(), module.net
    for c in callbacks[:-1]:
        assert torch.equal(c.initial["0.weight"], initial["0.weight"]) if hasattr(c, "initial") else True
    pac, worst, l2, linf, norms, fisher, final = callbacks
    b = subset(data, pac.state_dict()["indices"], 24)
    expected = {
        f"sharpness/{k}": v for k, v in measures.pac_bayes(net, b, initial=initial, m=96, depth=6, samples=3).items()
    }
    b = subset(data, worst.state_dict()["indices"], 24)
    expected["sharpness/sharpness_flatness"] = (
        1 / measures.sharpness_alpha(net, b, depth=5, restarts=2, steps=2).radius ** 2
    )
    expected["sharpness/average_l2"] = measures.average_sharpness(
        net, subset(data, l2.state_dict()["indices"], 24), 0.1, samples=4
    ).value
    expected["sharpness/average_linf"] = measures.average_sharpness(
        net, subset(data, linf.state_dict()["indices"], 24), 0.1, p=math.inf, samples=4
    ).value
    norm_values = measures.norm_measures(net, subset(data, norms.state_dict()["indices"], 24), initial=initial)
    expected.update({f"complexity/{k}": v for k, v in norm_values.items()})
    expected["complexity/fisher_rao"] = measures.fisher_rao_norm(net, subset(data, fisher.state_dict()["indices"], 24))
    # The final training evaluation: the whole training set, eval mode (dropout off, BatchNorm running statistics).
    with torch.no_grad():
        out = net.eval()(data.tensors[0])
    expected["train_final/loss"] = float(F.cross_entropy(out, data.tensors[1]))
    expected["train_final/acc"] = float((out.argmax(1) == data.tensors[1]).float().mean())
    summary = json.loads((tmp_path / "summary.json").read_text())["metrics"]
    for key, value in expected.items():
        assert float(trainer.callback_metrics[key]) == pytest.approx(value, rel=1e-5, abs=1e-7), key
        assert summary[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert {"sharpness/average_l2_stderr", "sharpness/sharpness_mag_flatness"} <= set(summary)
    assert expected["train_final/loss"] != pytest.approx(float(trainer.callback_metrics["train/loss"]), rel=1e-3)


def _fit(tmp_path, max_epochs, ckpt_path=None, keep=True):
    norms = ComplexityMeasures(**SMALL)
    pac = PacBayesFlatness(depth=4, samples=2, variant="plain", **SMALL)
    saver = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        callbacks=[norms, pac, saver] if keep else [saver],
        logger=False,
        default_root_dir=tmp_path,
        **QUIET,
    )
    module = Net(dropout=0.0)  # no dropout and a fixed order: the resumed run trains as the uninterrupted one
    if ckpt_path is not None:  # a fresh module with other weights: the initial ones must come from the checkpoint
        with torch.no_grad():
            for p in module.parameters():
                p.add_(1.0)
    trainer.fit(module, loader(shuffle=False), ckpt_path=ckpt_path)
    return trainer, norms, pac


def test_the_initial_weights_survive_a_resume_bit_for_bit(tmp_path):
    full, norms, pac = _fit(tmp_path / "full", 3)
    resumed, norms2, pac2 = _fit(tmp_path / "resumed", 3, ckpt_path=str(tmp_path / "full" / "ckpt" / "epoch=0.ckpt"))
    for key in norms.initial:
        assert torch.equal(norms2.initial[key], norms.initial[key]) and torch.equal(pac2.initial[key], pac.initial[key])
    assert norms2.history == norms.history and pac2.history == pac.history  # fro_dist, pac_bayes_init included
    assert "complexity/fro_dist" in norms.history[-1] and "sharpness/pac_bayes_init" in pac.history[-1]
    # A checkpoint written without the callback holds no initial weights: the resumed weights are taken, with a warning.
    _fit(tmp_path / "bare", 1, keep=False)
    with pytest.warns(UserWarning, match="holds no initial weights"):
        _fit(tmp_path / "late", 2, ckpt_path=str(tmp_path / "bare" / "ckpt" / "epoch=0.ckpt"))


def test_at_end_and_the_loss_threshold_checkpoint_measure_the_final_weights_once(tmp_path):
    ckpt = LossThresholdCheckpoint(threshold=-1.0, dirpath=str(tmp_path))  # never reached: saves at the end only
    fisher = FisherRaoNorm(num_samples=48, batch_size=24, at_end=True)  # on_checkpoint too
    trainer = pl.Trainer(max_steps=9, callbacks=[fisher, ckpt], logger=False, default_root_dir=tmp_path, **QUIET)
    trainer.fit(Net(), loader())  # stops in the middle of epoch 1: the end save comes from on_train_end
    assert [s["reason"] for s in ckpt.saved] == ["end"] and len(fisher.history) == 1
    assert torch.load(ckpt.saved[0]["path"], weights_only=False)["sharpness"] == {
        "complexity/fisher_rao": fisher.history[0]["complexity/fisher_rao"]
    }


@pytest.mark.parametrize("in_memory", [True, False])
def test_vision_data_modules_evaluate_the_training_set_without_augmentation(tmp_path, monkeypatch, in_memory):
    from fixtures_data import skip_md5, write_cifar10

    from flatminima.datamodules import CIFAR10DataModule

    write_cifar10(tmp_path, per_batch=4, test=2)
    skip_md5(monkeypatch)
    dm = CIFAR10DataModule(
        str(tmp_path), val_size=4, cutout=8, label_noise=0.5, eval_batch_size=16, in_memory=in_memory
    )
    dm.setup()
    x, y = next(iter(dm.train_eval_dataloader()))
    plain = CIFAR10DataModule(
        str(tmp_path),
        val_size=4,
        augment=False,
        eval_batch_size=16,  # no cutout either
        in_memory=in_memory,
    )
    plain.setup()
    clean_x, clean_y = next(iter(plain.train_eval_dataloader()))
    assert x.shape == (16, 3, 32, 32) and torch.equal(x, clean_x)  # the training images, not augmented
    assert torch.equal(y, torch.tensor([dm.train_set[i][1] for i in range(16)]))  # the (noisy) training labels
    assert not torch.equal(y, clean_y)
    augmented = torch.stack([dm.train_set[i][0] for i in range(16)])  # outside the loader: global-RNG draws
    assert not torch.equal(augmented, x)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: PacBayesFlatness(target=0), "Invalid target: 0"),
        (lambda: PacBayesFlatness(variant="mag"), "Invalid variant: 'mag'"),
        (lambda: PacBayesFlatness(lower=2.0), "Invalid upper: 2.0"),
        (lambda: WorstCaseSharpness(restarts=0), "Invalid restarts: 0"),
        (lambda: WorstCaseSharpness(step_size=0.0), "Invalid step_size: 0.0"),
        (lambda: AverageSharpness(rho=-1.0), "Invalid rho: -1.0"),
        (lambda: AverageSharpness(rho=0.1, p=3.0), "Invalid p: 3.0"),
    ],
)
def test_bad_arguments_are_refused(make, message):
    import re

    with pytest.raises(ValueError, match=re.escape(message)):
        make()


def test_a_network_the_measures_cannot_read_is_refused_before_training(tmp_path):
    class Regression(Net):
        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.mse_loss(self.net(x)[:, 0], y.float())
            self.log("train/loss", loss)
            return loss

    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[PacBayesFlatness(at_end=True, num_samples=16)],
        logger=False,
        default_root_dir=tmp_path,
        **QUIET,
    )
    data = DataLoader(TensorDataset(torch.randn(32, 4), torch.randn(32)), batch_size=16)
    with pytest.raises(ValueError, match=r"PacBayesFlatness\('pac_bayes'\) cannot measure .*Invalid targets"):
        trainer.fit(Regression(), data)


@pytest.mark.slow
def test_the_preset_adds_every_measure_at_the_end_of_fit_through_the_cli(tmp_path):
    from flatminima.cli import main

    args = [
        "fit",
        "--config",
        str(ROOT / "configs/experiments/moons_gsam.yaml"),
        "--config",
        str(ROOT / "configs/callbacks/generalization_measures.yaml"),
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=4",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--data.init_args.num_samples=1200",
        "--test_after_fit=false",
    ]
    cli = main(args)
    metrics = cli.trainer.callback_metrics
    keys = {
        "sharpness/pac_bayes_flatness",
        "sharpness/pac_bayes_mag_flatness",
        "sharpness/pac_bayes_init",
        "sharpness/pac_bayes_mag_orig",
        "sharpness/sharpness_flatness",
        "sharpness/sharpness_mag_flatness",
        "sharpness/average_l2",
        "sharpness/average_linf",
        "complexity/path_norm",
        "complexity/fro_dist",
        "complexity/fisher_rao",
        "complexity/params",
        "train_final/loss",
        "train_final/acc",
    }
    assert keys <= set(metrics)
    assert all(math.isfinite(float(metrics[k])) for k in keys)
