"""The sharpness callbacks in real use: several instances, resumes from any checkpoint, early errors.

Every comparison is against the same fit run without interruption (CPU, deterministic), never against
numbers produced here by the code under test in another way.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader

from flatminima.callbacks import (
    AdaptiveSharpness,
    GradientNormSharpness,
    HessianSpectrum,
    LossThresholdCheckpoint,
    MinimumSharpness,
)
from flatminima.lightning_modules import Classifier
from tests.test_sharpness_callbacks import DictData, Plain, Silent, dataset

QUIET = dict(
    enable_progress_bar=False,
    enable_model_summary=False,
    accelerator="cpu",
    devices=1,
    num_sanity_val_steps=0,
    deterministic=True,
)


pytestmark = pytest.mark.usefixtures("one_thread")


class Memory(Logger):
    """Keeps every logged row in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, {k: float(v) for k, v in metrics.items()}))

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def series(self, key: str) -> list[float]:
        return [m[key] for _, m in self.rows if key in m]


def _loader(n=48):
    return DataLoader(dataset(n), batch_size=16)


class Validated(Plain):
    def validation_step(self, batch, batch_idx):
        self.log("val/loss", F.cross_entropy(self(batch[0]), batch[1]))


def _fit(tmp_path: Path, callbacks, max_epochs: int, ckpt_path=None, val=False, extra=(), **trainer_kw) -> Memory:
    logger = Memory()
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        callbacks=[*callbacks, *extra],
        logger=logger,
        default_root_dir=tmp_path,
        **QUIET,
        **trainer_kw,
    )
    trainer.fit(Validated() if val else Plain(), _loader(), _loader(16) if val else None, ckpt_path=ckpt_path)
    return logger


# ---------------------------------------------------------------------------------------- two instances
def pairs():
    """Two instances of every measure, told apart by one argument each."""
    small = dict(num_samples=24, every_n_epochs=1)
    return [
        MinimumSharpness(batch_size=12, seed=0, **small),
        MinimumSharpness(batch_size=12, seed=1, **small),
        AdaptiveSharpness(rho=1e-3, n_iters=3, batch_size=12, **small),
        AdaptiveSharpness(rho=1e-2, n_iters=3, batch_size=12, **small),
        HessianSpectrum(k=1, trace="none", batch_size=24, **small),
        HessianSpectrum(k=2, trace="none", batch_size=24, **small),
        GradientNormSharpness(rho=0.05, every_n_epochs=2, num_samples=24),
        GradientNormSharpness(rho=0.1, num_samples=24),
    ]


def test_two_instances_of_each_measure_log_apart_and_resume_like_the_uninterrupted_run(tmp_path):
    full = pairs()
    log_full = _fit(tmp_path / "full", full, 4)
    keys = {
        "sharpness/minimum_seed0",
        "sharpness/minimum_seed1",
        "sharpness/adaptive_rho0.001",
        "sharpness/adaptive_rho0.01",
        "sharpness/hessian_k1_eig1",
        "sharpness/hessian_k2_eig2",
        "sharpness/gradient_norm_rho0.05",
        "sharpness/gradient_norm_rho0.1",
        "sharpness/gradient_norm_rho0.05_subset",
    }
    logged = {k for _, m in log_full.rows for k in m}
    assert keys <= logged
    assert not {"sharpness/minimum", "sharpness/adaptive", "sharpness/gradient_norm"} & logged
    assert len({c.state_key for c in full}) == len(full)

    first = pairs()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    log_first = _fit(tmp_path / "first", first, 2, extra=[ckpt])
    resumed = pairs()
    log_resumed = _fit(tmp_path / "resumed", resumed, 4, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    for a, b in zip(full, resumed):
        assert b.history == a.history, a.metric_name
        assert [h["epoch"] for h in a.history] == (
            [1, 3] if a.every_n_epochs == 2 else [] if a.every_n_epochs is None else [0, 1, 2, 3]
        )
    for key in keys:  # the logged series: first part + resumed part = the uninterrupted run
        assert log_first.series(key) + log_resumed.series(key) == log_full.series(key), key


def test_identical_instances_are_refused_naming_name(tmp_path):
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        default_root_dir=tmp_path,
        **QUIET,
        callbacks=[AdaptiveSharpness(rho=1e-3, every_n_epochs=1), AdaptiveSharpness(rho=1e-3, every_n_epochs=2)],
    )
    with pytest.raises(
        ValueError,
        match=r"Invalid name: two AdaptiveSharpness callbacks named 'adaptive' measure "
        r"the same thing .* pass distinct name=\.\.\. values",
    ):
        trainer.fit(Plain(), _loader())
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        default_root_dir=tmp_path,
        **QUIET,
        callbacks=[AdaptiveSharpness(rho=1e-3, name="s"), MinimumSharpness(name="s")],
    )
    with pytest.raises(ValueError, match=r"Invalid name: 's' is used by AdaptiveSharpness, MinimumSharpness"):
        trainer.fit(Plain(), _loader())


def test_explicit_names_and_a_single_instance_keep_their_keys(tmp_path):
    a = AdaptiveSharpness(rho=1e-3, n_iters=2, num_samples=16, every_n_epochs=1, name="sharp_small")
    b = AdaptiveSharpness(rho=1e-2, n_iters=2, num_samples=16, every_n_epochs=1, name="sharp_large")
    c = MinimumSharpness(every_n_epochs=1)
    logger = _fit(tmp_path, [a, b, c], 1)
    assert {"sharpness/sharp_small", "sharpness/sharp_large", "sharpness/minimum"} <= {
        k for _, m in logger.rows for k in m
    }
    assert c.state_key == "MinimumSharpness{'name': 'minimum'}"  # unchanged for a default single instance


def test_two_loss_threshold_checkpoints_keep_their_own_schedules_across_a_resume(tmp_path):
    losses = [1.0, 0.4, 0.3, 0.009, 0.02, 0.008, 0.001, 0.001]

    def run(name, epochs, ckpt_path=None, extra=()):
        callbacks = [
            LossThresholdCheckpoint(threshold=0.5, every_n_epochs=2, dirpath=str(tmp_path / name / "a")),
            LossThresholdCheckpoint(threshold=0.01, every_n_epochs=3, dirpath=str(tmp_path / name / "b")),
            MinimumSharpness(num_samples=24),
        ]
        trainer = pl.Trainer(
            max_epochs=epochs, callbacks=[*callbacks, *extra], logger=False, default_root_dir=tmp_path / name, **QUIET
        )
        trainer.fit(Plain(losses), _loader(), ckpt_path=ckpt_path)
        return callbacks

    full = run("full", 8)
    assert [(s["epoch"], s["reason"]) for s in full[0].saved] == [
        (1, "threshold"),
        (3, "periodic"),
        (5, "periodic"),
        (7, "periodic"),
    ]
    assert [(s["epoch"], s["reason"]) for s in full[1].saved] == [(3, "threshold"), (6, "periodic"), (7, "end")]
    run("first", 8, extra=[ModelCheckpoint(dirpath=tmp_path / "every", save_top_k=-1)])
    resumed = run("resumed", 8, ckpt_path=str(tmp_path / "every" / "epoch=4-step=15.ckpt"))
    for a, b in zip(full[:2], resumed[:2]):
        assert [(s["epoch"], s["reason"]) for s in b.saved] == [(s["epoch"], s["reason"]) for s in a.saved]
    assert resumed[2].history == full[2].history


# ---------------------------------------------------------------------------------------- resume at an epoch's end
def measured():
    return [
        MinimumSharpness(num_samples=24, batch_size=12, every_n_epochs=1),
        GradientNormSharpness(rho=0.05),
        LossThresholdCheckpoint(threshold=math.inf, every_n_epochs=1, dirpath=None),
    ]


@pytest.mark.parametrize(
    "val, ckpt_name",
    [
        (False, "epoch=1-step=6.ckpt"),  # step checkpoint written at epoch 1's last batch, before its end
        (False, "epoch=3-step=12.ckpt"),  # ... at the very last batch: the resumed fit runs no training hook
        (True, "epoch=1-step=6.ckpt"),  # saved at validation end, which comes before the epoch's end too
        # (ModelCheckpoint(save_on_train_epoch_end=False))
        (True, "epoch=3-step=12.ckpt"),
    ],
)
def test_resume_from_a_checkpoint_at_an_epochs_last_batch_keeps_every_measurement(tmp_path, val, ckpt_name):
    full = measured()
    log_full = _fit(tmp_path / "full", full, 4, val=val)
    steps = ModelCheckpoint(
        dirpath=tmp_path / "steps",
        save_top_k=-1,
        **(dict(save_on_train_epoch_end=False) if val else dict(every_n_train_steps=3)),
    )
    _fit(tmp_path / "first", measured(), 4, val=val, extra=[steps])
    resumed = measured()
    log_resumed = _fit(tmp_path / "resumed", resumed, 4, val=val, ckpt_path=str(tmp_path / "steps" / ckpt_name))

    assert [h["epoch"] for h in full[0].history] == [0, 1, 2, 3]
    assert resumed[0].history == full[0].history
    before = int(ckpt_name.split("-")[0].split("=")[1])  # epochs whose means the first run logged before the file
    means = log_full.series("sharpness/gradient_norm")
    assert len(means) == 4 and log_resumed.series("sharpness/gradient_norm") == pytest.approx(means[before:], rel=1e-12)
    assert [(s["epoch"], s["step"], s["reason"]) for s in resumed[2].saved] == [
        (s["epoch"], s["step"], s["reason"]) for s in full[2].saved
    ]
    assert [s["sharpness/minimum"] for s in resumed[2].saved] == [s["sharpness/minimum"] for s in full[2].saved]


def test_resume_mid_epoch_keeps_the_gradient_norm_epoch_sums(tmp_path):
    # (A plain DataLoader restarts the epoch from its first batch on a mid-epoch resume, so the run itself
    # differs from the uninterrupted one; the epoch mean must still count the batch trained before the file.)
    steps = ModelCheckpoint(dirpath=tmp_path / "steps", save_top_k=-1, every_n_train_steps=4)
    first = _fit(tmp_path / "first", [GradientNormSharpness(rho=0.05)], 2, extra=[steps], log_every_n_steps=1)
    resumed = _fit(
        tmp_path / "resumed",
        [GradientNormSharpness(rho=0.05)],
        2,
        log_every_n_steps=1,
        ckpt_path=str(tmp_path / "steps" / "epoch=1-step=4.ckpt"),
    )  # after batch 1 of 3 of epoch 1
    per_batch = first.series("sharpness/gradient_norm_step")[3:4] + resumed.series("sharpness/gradient_norm_step")
    assert len(per_batch) == 3
    assert resumed.series("sharpness/gradient_norm") == pytest.approx([sum(per_batch) / 3], rel=1e-6)


def test_an_unknowable_threshold_decision_warns(tmp_path):
    def callbacks():
        return [LossThresholdCheckpoint(threshold=-1.0, every_n_epochs=1)]

    steps = ModelCheckpoint(dirpath=tmp_path / "steps", save_top_k=-1, every_n_train_steps=3)
    _fit(tmp_path / "first", callbacks(), 2, extra=[steps])
    with pytest.warns(UserWarning, match=r"whether epoch 0 reached the threshold cannot be known"):
        _fit(tmp_path / "resumed", callbacks(), 2, ckpt_path=str(tmp_path / "steps" / "epoch=0-step=3.ckpt"))


# ---------------------------------------------------------------------------------------- early errors
def test_a_monitor_a_foreign_module_does_not_log_is_refused_after_the_first_batch(tmp_path):
    module = Silent()
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[LossThresholdCheckpoint(dirpath=str(tmp_path))], logger=False, **QUIET
    )
    with pytest.raises(ValueError, match=r"Invalid monitor: 'train/loss' is not logged by Silent .*'loss'"):
        trainer.fit(module, _loader(64))
    assert module.forwards == 1  # one batch of four, not a whole epoch


def test_a_monitor_our_module_does_not_log_is_refused_at_setup(tmp_path):
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    model = Classifier(net, num_classes=3, optimizer=partial(torch.optim.SGD, lr=0.1))
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        callbacks=[LossThresholdCheckpoint(monitor="train/los", dirpath=str(tmp_path))],
        **QUIET,
    )
    with pytest.raises(ValueError, match=r"Invalid monitor: 'train/los' is not logged by Classifier .*'train/acc'"):
        trainer.fit(model, _loader())
    assert trainer.global_step == 0


def test_a_monitor_logged_at_epoch_end_by_a_subclass_is_accepted(tmp_path):
    class Extra(Classifier):
        def on_train_epoch_end(self):
            super().on_train_epoch_end()
            self.log("train/extra", 0.0)

    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    ckpt = LossThresholdCheckpoint(monitor="train/extra", threshold=0.5, dirpath=str(tmp_path))
    trainer = pl.Trainer(max_epochs=1, logger=False, callbacks=[ckpt], **QUIET)
    trainer.fit(Extra(net, num_classes=3, optimizer=partial(torch.optim.SGD, lr=0.1)), _loader())
    assert [s["reason"] for s in ckpt.saved] == ["threshold"]


class DictModule(Plain):
    steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        loss = F.cross_entropy(self(batch["features"]), batch["label"])
        self.log("train/loss", loss, on_epoch=True, on_step=False)
        return loss


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: AdaptiveSharpness(rho=0.01, every_n_epochs=1),
            r"AdaptiveSharpness\('adaptive'\) cannot measure on the training batches: Invalid batch: dict; "
            r".*pass batch_to_inputs",
        ),
        (
            lambda: AdaptiveSharpness(rho=0.01, every_n_epochs=1, batch_to_inputs=lambda b: (b["x"], b["label"])),
            r"Invalid batch_to_inputs: .* failed on a training batch of AdaptiveSharpness\('adaptive'\): KeyError",
        ),
        (
            lambda: HessianSpectrum(
                every_n_epochs=1,
                batch_to_inputs=lambda b: (b["features"], b["label"]),
                loss_fn=lambda out, y: F.cross_entropy(out, y, reduction="none"),
            ),
            r"HessianSpectrum\('hessian'\) cannot measure on the training batches: Invalid loss_fn: it returned \(48,\)",
        ),
    ],
)
def test_a_batch_a_measure_cannot_use_is_refused_before_training(tmp_path, make, message):
    module = DictModule()
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[make()], logger=False, default_root_dir=tmp_path, enable_checkpointing=False, **QUIET
    )
    with pytest.raises(ValueError, match=message):
        trainer.fit(module, DataLoader(DictData(48), batch_size=24))
    assert module.steps == 0


def test_an_unsupported_network_for_minimum_sharpness_is_refused_before_training(tmp_path):
    class Smooth(Plain):
        def __init__(self):
            super().__init__()
            self.model[1] = nn.Tanh()

    module = Smooth()
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[MinimumSharpness(every_n_epochs=1)],
        logger=False,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        **QUIET,
    )
    with pytest.raises(ValueError, match=r"MinimumSharpness\('minimum'\) cannot measure .*Tanh"):
        trainer.fit(module, _loader())
    assert trainer.global_step == 0
