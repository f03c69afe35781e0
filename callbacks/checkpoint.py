"""Checkpoints at the first epoch whose training loss reaches a threshold, then periodically.

The protocol of Bejan et al. (minimum sharpness across optimizers), after Jiang et al. 2019
("Fantastic generalization measures and where to find them"): save the first time the training loss
reaches 0.01, then every 50 epochs, and measure sharpness at each save.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from flatminima.lightning_modules import compat
from flatminima.lightning_modules.validation import check_choice, check_int, invalid, is_real

from ._epoch_end import EpochEndTracker
from ._monitor import check_monitor, check_monitor_name
from .base import SharpnessCallback, checkpoint_measures, measure_on_save

Anchor = Literal["threshold", "zero"]

_RECORD = ("reason", "epoch", "step", "threshold_epoch", "monitor", "value", "path")
"""The fields of one save record (the measured values are the measures' own, see ``saved``)."""


class LossThresholdCheckpoint(EpochEndTracker, ModelCheckpoint):
    """Save at the first epoch with training loss ≤ ``threshold``, then every ``every_n_epochs``, and at the end.

    Bejan et al. (after Jiang et al. 2019, "Fantastic generalization measures") save models the first
    time the training loss reaches 0.01 and then periodically. At each save the measures of every
    :class:`~flatminima.callbacks.base.SharpnessCallback` with ``on_checkpoint=True`` run first (on every rank), so
    they measure exactly the saved weights, log ``sharpness/<name>`` and land inside the checkpoint
    (``checkpoint["sharpness"]``). The decision is taken at the end of each training epoch on the
    monitored epoch value averaged over ranks, so every rank decides the same (and it is reduced with
    ``strategy.reduce_boolean_decision``); the schedule (threshold epoch, saves) is callback state and
    survives a resume. Every file is kept (``save_top_k=-1``); ``checkpoint["loss_threshold"]`` records
    why it was saved.

    **Not ModelCheckpoint's** ``monitor`` **and** ``every_n_epochs``. The two arguments keep their
    parent's names but mean something else here:

    * ``monitor`` is the training metric compared with ``threshold`` (the trigger), not a quantity
      ranked to keep the top-k files. It is stored in :attr:`loss_monitor`; the inherited
      ``self.monitor`` stays None (no ranking: every file is kept).
    * ``every_n_epochs`` is the period of the saves *after the threshold epoch* (see ``anchor``); before
      the threshold is reached nothing is saved periodically. It is stored in :attr:`period`; the
      inherited ``self.every_n_epochs`` stays 0 (this callback schedules its own saves, at the end of
      training epochs only: no step-, time- or validation-based saving).

    **Values.** :attr:`saved` lists every save: ``reason`` (``"threshold"``, ``"periodic"`` or
    ``"end"``), ``epoch``, ``step``, ``threshold_epoch``, ``monitor``, ``value`` (the monitored value),
    ``path``, and the values of the ``on_checkpoint`` measures taken for it. Those values are stored once,
    in each measure's ``history``: ``saved`` is a read-only view joining this callback's save records
    with them. (Checkpoints written before that split kept the values in this callback's state too; they
    are dropped on load and read from the measures' restored histories.)

    **The trigger capability.** The class sets ``triggers_measures = True``
    (:func:`flatminima.callbacks.base.triggers_measures`): a measure with ``on_checkpoint=True`` knows it will be run
    by this callback and does not warn that it never measures.

    A ``monitor`` the module does not log is refused before training: at setup when the module declares
    its epoch-level metrics (``epoch_metric_names``, as :class:`~flatminima.lightning_modules.TwoPassModule` does),
    else after the first training batch when nothing logged later could provide it. A resume from a
    checkpoint written after an epoch's last batch and before that epoch's end takes the decision
    Lightning skips for that epoch (a periodic or final save, with its measurements); whether that epoch
    reached the threshold cannot be known then (its epoch mean is not in the checkpoint): a warning says so.

    Args:
        threshold: Training-loss threshold (Bejan et al.: 0.01); ``float("inf")`` starts at the first epoch.
        monitor: The epoch-level training metric compared with the threshold (default ``train/loss``); not
            ModelCheckpoint's ranking ``monitor`` (see above).
        every_n_epochs: Period of the saves after the threshold epoch (Bejan et al.: 50); 0 disables
            periodic saves. Not ModelCheckpoint's ``every_n_epochs`` (see above).
        anchor: ``"threshold"`` saves at threshold_epoch + k·every_n_epochs; ``"zero"`` saves when the
            number of completed epochs is a multiple of every_n_epochs (Bejan et al.'s "every epoch
            divisible by 50" after the threshold).
        save_at_end: Also save (and measure) at the end of fit.
        dirpath: Directory (default: the logger's ``<log_dir>/checkpoints``).
        filename: File name template (``ModelCheckpoint`` syntax), default ``"{epoch}-{step}"``.
        save_weights_only: Save the weights only.
        verbose: Print a line per save.
    """

    triggers_measures: ClassVar[bool] = True

    def __init__(
        self,
        threshold: float = 0.01,
        monitor: str = "train/loss",
        every_n_epochs: int = 50,
        anchor: Anchor = "threshold",
        save_at_end: bool = True,
        dirpath: str | None = None,
        filename: str | None = None,
        save_weights_only: bool = False,
        verbose: bool = False,
    ) -> None:
        if not is_real(threshold) or math.isnan(threshold):
            raise invalid("threshold", threshold, "a number (float('inf') to start at once)")
        check_monitor_name(monitor)
        every_n_epochs = check_int("every_n_epochs", every_n_epochs, 0)
        check_choice("anchor", anchor, ("threshold", "zero"))
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=None,
            verbose=verbose,
            save_top_k=-1,
            save_weights_only=save_weights_only,
            every_n_epochs=0,
            save_on_train_epoch_end=True,
        )
        self.threshold = float(threshold)
        self.loss_monitor = monitor  #: the metric compared with the threshold (ModelCheckpoint's monitor is None)
        self.period = every_n_epochs  #: saves after the threshold epoch (ModelCheckpoint's every_n_epochs is 0)
        self.anchor = anchor
        self.save_at_end = save_at_end
        self.threshold_epoch: int | None = None
        self._records: list[dict[str, Any]] = []  # one per save, without the measured values
        self._measures: list[SharpnessCallback] = []  # the on_checkpoint measures whose values ``saved`` shows
        self._saving: dict[str, Any] | None = None
        self._monitor_checked = False

    @property
    def saved(self) -> list[dict[str, Any]]:
        """Every save: its record and the values its ``on_checkpoint`` measures took (a read-only view, fresh dicts)."""
        out = []
        for record in self._records:
            values: dict[str, Any] = {}
            for measure in self._measures:
                values.update(measure.measurement_at(record["epoch"], record["step"]))
            out.append({**record, **values})
        return out

    @property
    def state_key(self) -> str:
        return compat.state_key(
            self, threshold=self.threshold, monitor=self.loss_monitor, every_n_epochs=self.period, anchor=self.anchor
        )

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            threshold_epoch=self.threshold_epoch, saved=[dict(r) for r in self._records], pending=self._pending_now()
        )
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.threshold_epoch = state_dict.get("threshold_epoch")
        # Earlier checkpoints also hold the measured values here: the measures' own state has them.
        self._records = [{k: s[k] for k in _RECORD if k in s} for s in state_dict.get("saved", [])]
        self._restore_pending(state_dict)

    # ------------------------------------------------------------------ triggers
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._start_tracking(trainer)
        self._measures = checkpoint_measures(trainer.callbacks)
        self._monitor_checked = False
        if stage == "fit":
            self._monitor_checked = check_monitor(trainer, pl_module, self.loss_monitor, first_batch=False)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._catch_up(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._catch_up(trainer, pl_module)  # a resume at the very end runs no training hook at all

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        """No step-based saving; after the first batch, check that the monitored metric is logged."""
        if not self._monitor_checked:
            self._monitor_checked = check_monitor(trainer, pl_module, self.loss_monitor, first_batch=True)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """No validation-based saving (the schedule follows training epochs)."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        replayed = self._epoch_ended(trainer)
        if self._skip(trainer):
            return
        if replayed:  # Lightning replays the end of the epoch a checkpoint was written in, without its metrics
            self._decide_blind(trainer, pl_module, trainer.current_epoch, trainer.global_step, via_logger=False)
            return
        loss = self._monitored(trainer, pl_module)
        reason = self._reason(trainer, trainer.current_epoch, loss)
        if trainer.strategy.reduce_boolean_decision(reason is not None, all=False):
            self._save(trainer, pl_module, reason or "end", loss)

    def _reason(self, trainer: pl.Trainer, epoch: int, loss: float) -> str | None:
        """Why the end of ``epoch`` (monitored value ``loss``) is saved, or None."""
        if self.threshold_epoch is None:
            if loss <= self.threshold:
                self.threshold_epoch = epoch
                return "threshold"
        elif self.period > 0:
            since = epoch - self.threshold_epoch if self.anchor == "threshold" else epoch + 1
            if since % self.period == 0:
                return "periodic"
        if self.save_at_end and self._final_epoch(trainer, epoch):
            return "end"
        return None

    def _catch_up(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Take the decision for the epoch a resumed checkpoint was written in, when Lightning went past its end.

        (When Lightning replays that epoch's end instead, ``on_train_epoch_end`` takes it.)
        """
        overdue = self._overdue(trainer)
        if overdue is not None:
            self._decide_blind(trainer, pl_module, *overdue, via_logger=True)

    def _decide_blind(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int, step: int, *, via_logger: bool
    ) -> None:
        """The decision for an epoch whose monitored value is gone: periodic and final saves only, with a warning."""
        if self.threshold_epoch is None:
            rank_zero_warn(
                f"LossThresholdCheckpoint: resumed from a checkpoint written after the last batch of epoch {epoch} "
                f"and before its end; whether epoch {epoch} reached the threshold cannot be known "
                f"({self.loss_monitor!r} of that epoch is not in the checkpoint), so it is not saved; the threshold "
                f"is checked from epoch {epoch + 1} on"
            )
        reason = self._reason(trainer, epoch, math.nan)  # nan: the threshold branch never fires
        if reason is not None:
            self._save(trainer, pl_module, reason, math.nan, via_logger=via_logger, at=(epoch, step))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Save (and measure) at the end of fit when the last epoch did not already."""
        if self.save_at_end and not self._skip(trainer):
            self._save(trainer, pl_module, "end", math.nan, via_logger=True)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._saving is not None:
            checkpoint["loss_threshold"] = dict(self._saving)

    # ------------------------------------------------------------------ helpers
    def _skip(self, trainer: pl.Trainer) -> bool:
        return (
            bool(trainer.fast_dev_run)
            or trainer.state.fn != TrainerFn.FITTING
            or trainer.sanity_checking
            or compat.last_global_step_saved(self) == trainer.global_step
        )

    def _monitored(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        value = trainer.callback_metrics.get(self.loss_monitor)
        if value is None:
            raise ValueError(
                f"Invalid monitor: {self.loss_monitor!r} was not logged as an epoch-level metric; logged metrics: "
                f"{sorted(trainer.callback_metrics)}"
            )
        value = torch.as_tensor(value, dtype=torch.float64, device=pl_module.device).detach().clone()
        if trainer.world_size > 1:
            value = trainer.strategy.reduce(value, reduce_op="mean")
        return float(value)

    @staticmethod
    def _final_epoch(trainer: pl.Trainer, epoch: int) -> bool:
        loop = trainer.fit_loop
        if trainer.should_stop:
            return True
        if loop.max_epochs is not None and loop.max_epochs >= 0 and epoch + 1 >= loop.max_epochs:
            return True
        return loop.max_steps is not None and loop.max_steps >= 0 and trainer.global_step >= loop.max_steps

    def _save(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        reason: str,
        loss: float,
        *,
        via_logger: bool = False,
        at: tuple[int, int] | None = None,
    ) -> None:
        """Run the on_checkpoint measures, then save the file with this save's record in the callback state."""
        epoch, step = at if at is not None else (trainer.current_epoch, trainer.global_step)
        self._measures = measure_on_save(trainer, pl_module, via_logger=via_logger, at=at)
        filepath = compat.checkpoint_filepath(self, trainer, epoch, step)
        self._saving = {
            "reason": reason,
            "epoch": epoch,
            "step": step,
            "threshold_epoch": self.threshold_epoch,
            "monitor": self.loss_monitor,
            "value": loss,
        }
        self._records.append({**self._saving, "path": filepath})  # part of the state being saved
        try:
            compat.save_checkpoint(self, trainer, filepath)
        except BaseException:
            self._records.pop()
            raise
        finally:
            self._saving = None
        self.best_model_path = self.last_model_path = filepath
        if self.verbose and trainer.is_global_zero:
            print(f"LossThresholdCheckpoint: epoch {epoch} ({reason}) saved to {filepath}")
