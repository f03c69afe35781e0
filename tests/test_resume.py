"""A resumed run ends where the uninterrupted one would, bit for bit (CPU, deterministic)."""

from __future__ import annotations

from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from flatminima.datamodules import MoonsDataModule
from flatminima.lightning_modules import ASAM, GSAM, SAM, Classifier
from flatminima.lightning_modules.networks import MLP
from flatminima.lightning_modules.optim import AdaShift
from tests.helpers import quiet_trainer

COMBOS = {
    # SGD + SAM with a per-step schedule
    "sgd_sam": lambda: dict(
        optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4),
        minimizer=SAM(rho=0.05),
        lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=7, gamma=0.8),
        lr_scheduler_interval="step",
    ),
    # Adam + GSAM whose rho follows an epoch schedule
    "adam_gsam": lambda: dict(
        optimizer=partial(torch.optim.Adam, lr=1e-2),
        minimizer=GSAM(rho=0.1, alpha=0.2, rho_min=0.01),
        lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
    ),
    # AdaShift (window state in the optimizer) + ASAM
    "adashift_asam": lambda: dict(optimizer=partial(AdaShift, lr=1e-2, keep_num=5), minimizer=ASAM(rho=0.5)),
}


def _model(combo):
    pl.seed_everything(0, verbose=False)
    return Classifier(MLP(hidden=(16, 16)), num_classes=2, **COMBOS[combo]())


def _data():
    return MoonsDataModule(num_samples=700, batch_size=64, data_seed=3)


@pytest.mark.parametrize(
    ("combo", "on_train_epoch_end"),
    [(c, True) for c in COMBOS] + [("adam_gsam", False)],  # False: saved at validation end, before the lr step
)
def test_resume_equals_uninterrupted(tmp_path, combo, on_train_epoch_end):
    full = _model(combo)
    quiet_trainer(max_epochs=4, deterministic=True).fit(full, _data())

    first = _model(combo)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_on_train_epoch_end=on_train_epoch_end)
    quiet_trainer(max_epochs=2, deterministic=True, enable_checkpointing=True, callbacks=[ckpt]).fit(first, _data())

    resumed = _model(combo)
    with torch.no_grad():  # prove that the weights come from the checkpoint
        for p in resumed.parameters():
            p.add_(1.0)
    trainer = quiet_trainer(max_epochs=4, deterministic=True)
    trainer.fit(resumed, _data(), ckpt_path=str(tmp_path / "last.ckpt"))

    assert trainer.global_step == 4 * 9
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    lr_full = full.trainer.optimizers[0].param_groups[0]["lr"]
    assert trainer.optimizers[0].param_groups[0]["lr"] == lr_full
