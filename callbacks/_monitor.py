"""Whether a monitored training metric will be logged: refuse a ``monitor`` nothing logs, before training.

Used by :class:`~flatminima.callbacks.checkpoint.LossThresholdCheckpoint`. Certain at setup when the module declares
its epoch-level metrics (``epoch_metric_names``, as :class:`~flatminima.lightning_modules.TwoPassModule` does), else
after the first training batch when nothing that could log later (an epoch-end hook of the module, or
a callback from outside Lightning and this package) could provide it.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from flatminima.lightning_modules import compat
from flatminima.lightning_modules.validation import invalid


def check_monitor_name(monitor: Any) -> str:
    """Return ``monitor`` if it is a non-empty metric name, else raise ``ValueError`` naming it."""
    if not isinstance(monitor, str) or not monitor:
        raise invalid("monitor", monitor, "a logged metric name such as 'train/loss'")
    return monitor


def check_monitor(trainer: pl.Trainer, pl_module: pl.LightningModule, monitor: str, *, first_batch: bool) -> bool:
    """Raise ``ValueError`` when ``monitor`` is certainly never logged; return whether the check is final."""
    declared = getattr(pl_module, "epoch_metric_names", None)
    names = set(declared("train")) if callable(declared) else set()
    if first_batch:
        names |= compat.logged_metric_names(trainer)
    if monitor in names or monitor.startswith("sharpness/"):  # measures log at epoch end
        return True
    module_known = _epoch_end_logging_is_declared(pl_module) or (
        first_batch and not any(_overrides(pl_module, h) for h in ("on_train_batch_end", "on_train_epoch_end"))
    )
    if module_known and not _callbacks_may_log(trainer):
        raise ValueError(
            f"Invalid monitor: {monitor!r} is not logged by {type(pl_module).__name__} as a training "
            f"metric (it logs {sorted(names)}); set LossThresholdCheckpoint(monitor=...) to one of them"
        )
    return first_batch  # not certain yet at setup: checked again at the first batch and epoch end


def _overrides(obj: Any, hook: str, base: type = pl.LightningModule) -> bool:
    return getattr(type(obj), hook) is not getattr(base, hook)


def _callbacks_may_log(trainer: pl.Trainer) -> bool:
    """Whether a callback from outside Lightning and this package logs in a hook after the first batch."""
    return any(
        not type(c).__module__.startswith(("lightning.", __package__ + "."))
        and any(_overrides(c, h, pl.Callback) for h in ("on_train_batch_end", "on_train_epoch_end"))
        for c in trainer.callbacks
    )


def _epoch_end_logging_is_declared(module: pl.LightningModule) -> bool:
    """Whether ``epoch_metric_names`` covers the module's epoch-end logging: it is defined by the class that
    defines ``on_train_epoch_end`` or by a subclass of it."""
    if not callable(getattr(module, "epoch_metric_names", None)):
        return False
    mro = type(module).__mro__
    owner = {
        name: next(i for i, c in enumerate(mro) if name in vars(c))
        for name in ("epoch_metric_names", "on_train_epoch_end")
    }
    return owner["epoch_metric_names"] <= owner["on_train_epoch_end"]
