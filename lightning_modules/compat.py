"""Every private Lightning, torch, TensorBoard and argparse API the project relies on, in one place.

Each function wraps one private name (a leading underscore: no stability promise) and says in its
docstring which one and the version it was checked against: Lightning 2.6.6, torch 2.14.1,
jsonargparse 4.53. ``tests/test_compat.py`` has one test per function that asserts the private API
still exists and behaves as relied on, so an upgrade that changes it fails in one named test instead
of silently changing a run.

Nothing here imports Lightning at module import time (the pure-torch modules may import this one);
each function imports what it needs when called, so a vanished private name breaks only its own
function. See docs/design.md, "Validation and private APIs".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    import argparse

    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

__all__ = [
    "launched_by_cli",
    "loss_scale",
    "running_stat_buffers",
    "attached_trainer",
    "logging_step",
    "logged_metric_names",
    "sequential_schedulers",
    "state_key",
    "checkpoint_filepath",
    "save_checkpoint",
    "last_global_step_saved",
    "tensorboard_file_writer",
    "parser_actions",
    "subcommand_parsers",
]


# ---------------------------------------------------------------------------------------- LightningModule
def launched_by_cli() -> bool:
    """Whether LightningCLI is instantiating a module right now (it hands the config over as hparams).

    Private API: ``lightning.pytorch.core.mixins.hparams_mixin._given_hyperparameters``, a ContextVar
    LightningCLI sets while it instantiates the model and data (Lightning 2.6.6). Falls back to False
    (not launched by the CLI) when the name is gone.
    """
    try:
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # pragma: no cover - older/newer Lightning; tests/test_compat.py fails then
        return False
    return _given_hyperparameters.get() is not None


def attached_trainer(module: pl.LightningModule) -> pl.Trainer | None:
    """The trainer ``module`` is attached to, or None (``module.trainer`` raises instead when there is none).

    Private API: ``LightningModule._trainer`` (Lightning 2.6.6).
    """
    return module._trainer


def loss_scale(trainer: Any) -> Tensor | None:
    """The AMP loss scale of ``trainer``'s precision plugin as a tensor (no host sync), or None without scaling.

    None when the plugin has no ``scaler`` or it is disabled. Private API: ``GradScaler._get_scale_async``
    (torch 2.14.1), the scale tensor itself, which is None until the scaler has scaled a loss. The one
    fallback, when that method is gone or has no scale yet: ``torch.tensor(scaler.get_scale())``
    (public, but a host sync).
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    get_async = getattr(scaler, "_get_scale_async", None)
    scale = get_async() if get_async is not None else None
    return scale if scale is not None else torch.tensor(scaler.get_scale())


def running_stat_buffers(net: nn.Module) -> list[Tensor]:
    """The running statistics of every normalisation layer of ``net`` that tracks them, in module order.

    ``running_mean``, ``running_var`` and ``num_batches_tracked`` (those that are not None) of each
    BatchNorm*/InstanceNorm*/SyncBatchNorm with ``track_running_stats=True``. Private API:
    ``torch.nn.modules.batchnorm._NormBase``, their common base class (torch 2.14.1).
    """
    from torch.nn.modules.batchnorm import _NormBase

    return [
        b
        for m in net.modules()
        if isinstance(m, _NormBase) and m.track_running_stats
        for b in (m.running_mean, m.running_var, m.num_batches_tracked)
        if b is not None
    ]


def sequential_schedulers(scheduler: torch.optim.lr_scheduler.SequentialLR) -> list[Any]:
    """The schedulers a ``SequentialLR`` runs one after the other.

    Private API: ``SequentialLR._schedulers`` (torch 2.14.1).
    """
    return list(scheduler._schedulers)


# ---------------------------------------------------------------------------------------- Trainer
def logging_step(trainer: pl.Trainer) -> int:
    """The step Lightning's own logging uses (batches that stepped an optimizer), as ``self.log`` would.

    Private API: ``trainer.fit_loop.epoch_loop._batches_that_stepped`` (Lightning 2.6.6).
    """
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def logged_metric_names(trainer: pl.Trainer) -> set[str]:
    """Metric names logged so far in this fit, including epoch-level ones not yet in ``callback_metrics``.

    Private API: ``trainer._results``, the result collection of the running loop, whose values carry
    ``meta.name`` (Lightning 2.6.6). Without it, only ``trainer.callback_metrics`` is read.
    """
    names = set(trainer.callback_metrics)
    results = getattr(trainer, "_results", None)
    if results is not None:
        names |= {r.meta.name for r in results.values() if hasattr(r, "meta")}
    return names


# ---------------------------------------------------------------------------------------- callbacks
def state_key(callback: Callback, **identity: Any) -> str:
    """The key a callback's state is saved under in a checkpoint: ``ClassName{identity}``.

    Private API: ``Callback._generate_state_key`` (Lightning 2.6.6), the helper Lightning's
    ``Callback.state_key`` documentation recommends.
    """
    return callback._generate_state_key(**identity)


def checkpoint_filepath(callback: ModelCheckpoint, trainer: pl.Trainer, epoch: int, step: int) -> str:
    """The file a ``ModelCheckpoint`` would write for ``epoch``/``step`` (its ``filename`` template filled in).

    Private API: ``ModelCheckpoint._monitor_candidates`` and
    ``ModelCheckpoint._get_metric_interpolated_filepath_name`` (Lightning 2.6.6).
    """
    candidates = callback._monitor_candidates(trainer)
    candidates.update(epoch=torch.tensor(epoch), step=torch.tensor(step))
    return callback._get_metric_interpolated_filepath_name(candidates, trainer)


def save_checkpoint(callback: ModelCheckpoint, trainer: pl.Trainer, filepath: str) -> None:
    """Save a checkpoint through ``callback`` (records the step saved and tells the loggers).

    Private API: ``ModelCheckpoint._save_checkpoint`` (Lightning 2.6.6).
    """
    callback._save_checkpoint(trainer, filepath)


def last_global_step_saved(callback: ModelCheckpoint) -> int:
    """The ``global_step`` at which ``callback`` last saved (0 before any save).

    Private API: ``ModelCheckpoint._last_global_step_saved`` (Lightning 2.6.6).
    """
    return callback._last_global_step_saved


# ---------------------------------------------------------------------------------------- loggers, CLI
def tensorboard_file_writer(writer: Any) -> Any:
    """The event-file writer behind a ``torch.utils.tensorboard.SummaryWriter`` (``add_summary``, ``flush``).

    Private API: ``SummaryWriter._get_file_writer`` (torch 2.14.1).
    """
    return writer._get_file_writer()


def parser_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every action (option or positional) of an argparse/jsonargparse parser.

    Private API: ``argparse.ArgumentParser._actions`` (Python 3.11).
    """
    return list(parser._actions)


def subcommand_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parsers of a jsonargparse parser's subcommands by name (empty when it has none).

    Private API: jsonargparse's ``ArgumentParser._subcommands_action`` (4.53) and argparse's
    ``_SubParsersAction._name_parser_map`` (Python 3.11).
    """
    action = getattr(parser, "_subcommands_action", None)
    return dict(getattr(action, "_name_parser_map", {}))
