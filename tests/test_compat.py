"""One test per private API in flatminima.lightning_modules.compat: an upgrade that changes one fails here, by name.

That compat imports without Lightning is pinned in tests/test_validation.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import Logger
from torch import nn

from flatminima.lightning_modules import compat

STEPS = 3


class _EpochLogger(BoringModel):
    """Logs an epoch-level metric, which reaches ``callback_metrics`` only at the epoch's end."""

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.log("epoch_only", 1.0, on_step=False, on_epoch=True)
        self.log("each_step", float(batch_idx), on_step=True, on_epoch=False)
        return out


class _Steps(Logger):
    """Records the step Lightning passes with each ``train`` metric it logs."""

    name, version = "steps", 0

    def __init__(self):
        super().__init__()
        self.steps: dict[float, int] = {}

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        if "each_step" in metrics:
            self.steps[metrics["each_step"]] = step


class _Probe(Callback):
    """Reads the private trainer state in the middle of the epoch, where the callbacks read it."""

    def __init__(self):
        self.seen: dict[str, object] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 1:
            self.seen = {
                "names": compat.logged_metric_names(trainer),
                "callback_metrics": set(trainer.callback_metrics),
                "logging_step": compat.logging_step(trainer),
                "global_step": trainer.global_step,
                "trainer": compat.attached_trainer(pl_module),
            }


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    probe, logger = _Probe(), _Steps()
    trainer = pl.Trainer(
        max_steps=STEPS,
        limit_val_batches=0,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[probe],
        default_root_dir=tmp_path_factory.mktemp("fit"),
    )
    model = _EpochLogger()
    trainer.fit(model)
    return trainer, model, {**probe.seen, "logged_steps": logger.steps}


# ---------------------------------------------------------------------------------------- LightningModule
class _Recorder(BoringModel):
    def __init__(self, width: int = 2):
        super().__init__()
        self.by_cli = compat.launched_by_cli()


def test_launched_by_cli_reads_lightnings_given_hyperparameters():
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters  # the private name itself

    assert _given_hyperparameters.get() is None
    assert compat.launched_by_cli() is False
    assert _Recorder().by_cli is False
    cli = LightningCLI(
        _Recorder,
        run=False,
        args=[],
        save_config_callback=None,
        trainer_defaults={"logger": False, "enable_progress_bar": False},
    )
    assert cli.model.by_cli is True
    assert compat.launched_by_cli() is False  # only while the CLI instantiates


def test_attached_trainer_reads_the_private_trainer_attribute(fitted):
    trainer, model, seen = fitted
    bare = BoringModel()
    assert compat.attached_trainer(bare) is None
    with pytest.raises(RuntimeError):
        bare.trainer  # noqa: B018 - the public property refuses, which is why the private attribute is read
    assert seen["trainer"] is trainer and compat.attached_trainer(model) is trainer


def test_loss_scale_is_the_scalers_own_tensor():
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler))
    assert callable(getattr(torch.amp.GradScaler, "_get_scale_async", None))
    assert compat.loss_scale(trainer) == 512.0  # before the first scale(): the documented fallback
    scaler.scale(torch.ones(()))
    scale = compat.loss_scale(trainer)
    assert scale is scaler._get_scale_async() and isinstance(scale, torch.Tensor) and float(scale) == 512.0
    assert compat.loss_scale(SimpleNamespace(precision_plugin=SimpleNamespace())) is None
    off = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=torch.amp.GradScaler("cpu", enabled=False)))
    assert compat.loss_scale(off) is None


def test_running_stat_buffers_finds_every_norm_layer_with_running_stats():
    from torch.nn.modules.batchnorm import _NormBase

    for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm2d):
        assert issubclass(cls, _NormBase), cls
    bn, inorm = nn.BatchNorm1d(4), nn.InstanceNorm1d(4, track_running_stats=True)
    net = nn.Sequential(
        nn.Linear(3, 4),
        bn,
        nn.LayerNorm(4),
        nn.BatchNorm1d(4, track_running_stats=False),
        nn.GroupNorm(2, 4),
        inorm,
        nn.InstanceNorm1d(4),
    )
    got = compat.running_stat_buffers(net)
    expected = [
        bn.running_mean,
        bn.running_var,
        bn.num_batches_tracked,
        inorm.running_mean,
        inorm.running_var,
        inorm.num_batches_tracked,
    ]
    assert len(got) == len(expected) and all(a is b for a, b in zip(got, expected))


def test_sequential_schedulers_are_the_ones_sequentiallr_runs():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    first = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=2)
    second = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    seq = torch.optim.lr_scheduler.SequentialLR(opt, [first, second], milestones=[2])
    got = compat.sequential_schedulers(seq)
    assert len(got) == 2 and got[0] is first and got[1] is second


# ---------------------------------------------------------------------------------------- Trainer
def test_logging_step_is_the_step_lightnings_own_logs_use(fitted):
    trainer, _, seen = fitted
    assert seen["logged_steps"] == {0.0: 0, 1.0: 1, 2.0: 2}  # the step Lightning gave each batch's metric
    assert seen["logging_step"] == seen["logged_steps"][1.0]  # read in batch 1's on_train_batch_end
    assert compat.logging_step(trainer) == STEPS


def test_logged_metric_names_include_epoch_level_ones_before_the_epoch_ends(fitted):
    _, _, seen = fitted
    assert "epoch_only" not in seen["callback_metrics"]  # so only trainer._results can know it
    assert "epoch_only" in seen["names"]


# ---------------------------------------------------------------------------------------- callbacks
class Measure(Callback):
    pass


def test_state_key_is_lightnings_generated_key():
    assert compat.state_key(Measure(), name="m", rho=0.1) == "Measure{'name': 'm', 'rho': 0.1}"


def test_checkpoint_filepath_fills_in_the_filename_template(fitted, tmp_path):
    trainer, _, _ = fitted
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}-{step}")
    assert compat.checkpoint_filepath(ckpt, trainer, 4, 17) == str(tmp_path / "epoch=4-step=17.ckpt")


def test_save_checkpoint_writes_and_records_the_step(fitted, tmp_path):
    trainer, _, _ = fitted
    ckpt = ModelCheckpoint(dirpath=tmp_path)
    assert compat.last_global_step_saved(ckpt) == 0
    path = str(tmp_path / "x.ckpt")
    compat.save_checkpoint(ckpt, trainer, path)
    assert Path(path).is_file() and "state_dict" in torch.load(path, weights_only=False)
    assert compat.last_global_step_saved(ckpt) == trainer.global_step == STEPS


# ---------------------------------------------------------------------------------------- loggers, CLI
def test_tensorboard_file_writer_takes_summaries(tmp_path):
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    writer = SummaryWriter(str(tmp_path))
    try:
        file_writer = compat.tensorboard_file_writer(writer)
        file_writer.add_summary(hparams({}, {})[2])
        file_writer.flush()
    finally:
        writer.close()
    assert any(f.name.startswith("events.out.tfevents") and f.stat().st_size > 0 for f in tmp_path.iterdir())


def test_parser_actions_and_subcommand_parsers():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--top", type=int, default=1)
    sub = ArgumentParser(exit_on_error=False)
    sub.add_argument("--inner", type=str, default="a")
    parser.add_subcommands().add_subcommand("fit", sub)
    assert {"--top", "--help"} <= {s for a in compat.parser_actions(parser) for s in a.option_strings}
    assert all(isinstance(a, argparse.Action) for a in compat.parser_actions(parser))
    assert compat.subcommand_parsers(parser) == {"fit": sub}
    assert compat.subcommand_parsers(sub) == {}
    assert "--inner" in {s for a in compat.parser_actions(sub) for s in a.option_strings}
