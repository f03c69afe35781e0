"""Checkpoints at the first epoch whose training loss reaches a threshold, then periodically (seed 000)."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from ._core import check_choice, check_int
from .sharpness import SharpnessCallback, pending_epoch_end

Anchor = Literal["threshold", "zero"]


class LossThresholdCheckpoint(ModelCheckpoint):
    """Save at the first epoch with training loss ≤ ``threshold``, then every ``every_n_epochs``, and at the end.

    Seed 000 (after Jiang et al. 2019, "Fantastic generalization measures"): models are saved the first
    time the training loss reaches 0.01 and then periodically. At each save the measures of every
    :class:`~callbacks.sharpness.SharpnessCallback` with ``on_checkpoint=True`` run first (on every rank),
    so they measure exactly the saved weights, log ``sharpness/<name>`` and land inside the checkpoint
    (``checkpoint["sharpness"]``). The decision is taken at the end of each training epoch on the
    monitored epoch value averaged over ranks, so every rank decides the same (and it is reduced with
    ``strategy.reduce_boolean_decision``); the schedule (threshold epoch, saved epochs) is callback state
    and survives a resume. Every file is kept (``save_top_k=-1``); ``checkpoint["loss_threshold"]``
    records why it was saved.

    A ``monitor`` the module does not log is refused before training: at setup when the module declares
    its epoch-level metrics (``epoch_metric_names``, as :class:`~lightning_modules.TwoPassModule` does),
    else after the first training batch when nothing logged later could provide it. A resume from a
    checkpoint written after an epoch's last batch and before that epoch's end takes the decision
    Lightning skips for that epoch (a periodic or final save, with its measurements); whether that epoch
    reached the threshold cannot be known then (its epoch mean is not in the checkpoint): a warning says so.

    Args:
        threshold: Training-loss threshold (seed 000: 0.01); ``float("inf")`` starts at the first epoch.
        monitor: The epoch-level training metric compared with the threshold (default ``train/loss``).
        every_n_epochs: Period after the threshold epoch (seed 000: 50); 0 disables periodic saves.
        anchor: ``"threshold"`` saves at threshold_epoch + k·every_n_epochs; ``"zero"`` saves when the
            number of completed epochs is a multiple of every_n_epochs (seed 000's "every epoch divisible
            by 50" after the threshold).
        save_at_end: Also save (and measure) at the end of fit.
        dirpath: Directory (default: the logger's ``<log_dir>/checkpoints``).
        filename: File name template (``ModelCheckpoint`` syntax), default ``"{epoch}-{step}"``.
        save_weights_only: Save the weights only.
        verbose: Print a line per save.
    """

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
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
            raise ValueError(f"Invalid threshold: {threshold!r}; expected a number (float('inf') to start at once)")
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"Invalid monitor: {monitor!r}; expected a logged metric name such as 'train/loss'")
        check_int("every_n_epochs", every_n_epochs, 0)
        check_choice("anchor", anchor, ("threshold", "zero"))
        super().__init__(dirpath=dirpath, filename=filename, monitor=None, verbose=verbose, save_top_k=-1,
                         save_weights_only=save_weights_only, every_n_epochs=0, save_on_train_epoch_end=True)
        self.threshold = float(threshold)
        self.loss_monitor = monitor
        self.period = every_n_epochs
        self.anchor = anchor
        self.save_at_end = save_at_end
        self.threshold_epoch: int | None = None
        self.saved: list[dict[str, Any]] = []
        self._saving: dict[str, Any] | None = None
        self._trainer_ref: Callable[[], pl.Trainer | None] = lambda: None
        self._batch_epoch = -1  # the epoch whose batches this process last ran
        self._ended_epoch = -1  # the last epoch whose end this callback has handled
        self._pending: tuple[int, int] | None = None  # restored: (epoch, step) whose end is still due
        self._monitor_checked = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(threshold=self.threshold, monitor=self.loss_monitor,
                                        every_n_epochs=self.period, anchor=self.anchor)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(threshold_epoch=self.threshold_epoch, saved=[dict(s) for s in self.saved],
                     pending=self._pending_now())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.threshold_epoch = state_dict.get("threshold_epoch")
        self.saved = [dict(s) for s in state_dict.get("saved", [])]
        pending = state_dict.get("pending")
        self._pending = None if pending is None else (int(pending[0]), int(pending[1]))

    def _pending_now(self) -> tuple[int, int] | None:
        return pending_epoch_end(self._trainer_ref(), self._batch_epoch, self._ended_epoch, self._pending)

    # ------------------------------------------------------------------ triggers
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._trainer_ref = weakref.ref(trainer)
        self._batch_epoch, self._ended_epoch, self._pending, self._monitor_checked = -1, -1, None, False
        if stage == "fit":
            self._check_monitor(trainer, pl_module, first_batch=False)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._catch_up(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._catch_up(trainer, pl_module)  # a resume at the very end runs no training hook at all

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any,
                             **kwargs: Any) -> None:
        self._batch_epoch = trainer.current_epoch

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any,
                           **kwargs: Any) -> None:
        """No step-based saving; after the first batch, check that the monitored metric is logged."""
        if not self._monitor_checked:
            self._check_monitor(trainer, pl_module, first_batch=True)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """No validation-based saving (the schedule follows training epochs)."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        replayed = self._pending is not None and self._pending[0] == trainer.current_epoch
        self._ended_epoch, self._pending = trainer.current_epoch, None
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
        pending = self._pending
        if pending is None or trainer.current_epoch <= pending[0]:
            return
        self._pending, self._ended_epoch = None, pending[0]
        self._decide_blind(trainer, pl_module, *pending, via_logger=True)

    def _decide_blind(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int, step: int, *,
                      via_logger: bool) -> None:
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

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self._saving is not None:
            checkpoint["loss_threshold"] = dict(self._saving)

    # ------------------------------------------------------------------ helpers
    def _skip(self, trainer: pl.Trainer) -> bool:
        return (
            bool(trainer.fast_dev_run)
            or trainer.state.fn != TrainerFn.FITTING
            or trainer.sanity_checking
            or self._last_global_step_saved == trainer.global_step
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

    def _check_monitor(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, first_batch: bool) -> None:
        """Refuse a ``monitor`` that nothing will log, as soon as that is certain (setup or the first batch)."""
        declared = getattr(pl_module, "epoch_metric_names", None)
        names = set(declared("train")) if callable(declared) else set()
        if first_batch:
            names |= _logged_names(trainer)
        if self.loss_monitor in names or self.loss_monitor.startswith("sharpness/"):  # measures log at epoch end
            self._monitor_checked = True
            return
        module_known = _epoch_end_logging_is_declared(pl_module) or (
            first_batch and not any(_overrides(pl_module, h) for h in ("on_train_batch_end", "on_train_epoch_end")))
        if module_known and not _callbacks_may_log(trainer):
            raise ValueError(
                f"Invalid monitor: {self.loss_monitor!r} is not logged by {type(pl_module).__name__} as a training "
                f"metric (it logs {sorted(names)}); set LossThresholdCheckpoint(monitor=...) to one of them"
            )
        self._monitor_checked = first_batch  # not certain yet: checked again at the first epoch end

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, reason: str, loss: float, *,
              via_logger: bool = False, at: tuple[int, int] | None = None) -> None:
        epoch, step = at if at is not None else (trainer.current_epoch, trainer.global_step)
        values: dict[str, float] = {}
        for callback in trainer.callbacks:
            if isinstance(callback, SharpnessCallback) and callback.on_checkpoint:
                values.update(callback.measure_now(trainer, pl_module, via_logger=via_logger, at=at))
        candidates = self._monitor_candidates(trainer)
        candidates.update(epoch=torch.tensor(epoch), step=torch.tensor(step))
        filepath = self._get_metric_interpolated_filepath_name(candidates, trainer)
        self._saving = {"reason": reason, "epoch": epoch, "step": step,
                        "threshold_epoch": self.threshold_epoch, "monitor": self.loss_monitor, "value": loss}
        self.saved.append({**self._saving, "path": filepath, **values})  # part of the state being saved
        try:
            self._save_checkpoint(trainer, filepath)
        except BaseException:
            self.saved.pop()
            raise
        finally:
            self._saving = None
        self.best_model_path = self.last_model_path = filepath
        if self.verbose and trainer.is_global_zero:
            print(f"LossThresholdCheckpoint: epoch {epoch} ({reason}) saved to {filepath}")


def _logged_names(trainer: pl.Trainer) -> set[str]:
    """Metric names logged so far in this fit, epoch-level ones included (from Lightning's result collection)."""
    names = set(trainer.callback_metrics)
    results = getattr(trainer, "_results", None)
    if results is not None:
        names |= {r.meta.name for r in results.values() if hasattr(r, "meta")}
    return names


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
    owner = {name: next(i for i, c in enumerate(mro) if name in vars(c))
             for name in ("epoch_metric_names", "on_train_epoch_end")}
    return owner["epoch_metric_names"] <= owner["on_train_epoch_end"]
