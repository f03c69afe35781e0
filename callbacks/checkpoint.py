"""Checkpoints at the first epoch whose training loss reaches a threshold, then periodically (seed 000)."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from ._core import check_choice, check_int
from .sharpness import SharpnessCallback

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

    @property
    def state_key(self) -> str:
        return self._generate_state_key(threshold=self.threshold, monitor=self.loss_monitor,
                                        every_n_epochs=self.period, anchor=self.anchor)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(threshold_epoch=self.threshold_epoch, saved=[dict(s) for s in self.saved])
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.threshold_epoch = state_dict.get("threshold_epoch")
        self.saved = [dict(s) for s in state_dict.get("saved", [])]

    # ------------------------------------------------------------------ triggers
    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        """No step-based saving."""

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """No validation-based saving (the schedule follows training epochs)."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._skip(trainer):
            return
        epoch = trainer.current_epoch
        loss = self._monitored(trainer, pl_module)
        reason = None
        if self.threshold_epoch is None:
            if loss <= self.threshold:
                self.threshold_epoch = epoch
                reason = "threshold"
        elif self.period > 0:
            since = epoch - self.threshold_epoch if self.anchor == "threshold" else epoch + 1
            if since % self.period == 0:
                reason = "periodic"
        if reason is None and self.save_at_end and self._final_epoch(trainer):
            reason = "end"
        if trainer.strategy.reduce_boolean_decision(reason is not None, all=False):
            self._save(trainer, pl_module, reason or "end", loss)

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
    def _final_epoch(trainer: pl.Trainer) -> bool:
        loop = trainer.fit_loop
        if trainer.should_stop:
            return True
        if loop.max_epochs is not None and loop.max_epochs >= 0 and trainer.current_epoch + 1 >= loop.max_epochs:
            return True
        return loop.max_steps is not None and loop.max_steps >= 0 and trainer.global_step >= loop.max_steps

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, reason: str, loss: float, *,
              via_logger: bool = False) -> None:
        values: dict[str, float] = {}
        for callback in trainer.callbacks:
            if isinstance(callback, SharpnessCallback) and callback.on_checkpoint:
                values.update(callback.measure_now(trainer, pl_module, via_logger=via_logger))
        candidates = self._monitor_candidates(trainer)
        filepath = self._get_metric_interpolated_filepath_name(candidates, trainer)
        self._saving = {"reason": reason, "epoch": trainer.current_epoch, "step": trainer.global_step,
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
            print(f"LossThresholdCheckpoint: epoch {trainer.current_epoch} ({reason}) saved to {filepath}")
