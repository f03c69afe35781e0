"""Stop training once the epoch training loss stops changing by more than a relative threshold."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from flatminima.lightning_modules import compat
from flatminima.lightning_modules.validation import check_choice, check_int, invalid, is_real

from ._monitor import check_monitor_name

ChangeMode = Literal["abs", "decrease"]


def relative_change(previous: float, current: float, mode: ChangeMode = "abs") -> float:
    """The relative change r of an epoch loss from ``previous`` to ``current``.

    ``"abs"``: r = |L_e − L_{e−1}| / |L_{e−1}|; ``"decrease"``: r = (L_{e−1} − L_e) / |L_{e−1}| (negative when
    the loss rose). A previous value of 0 gives r = 0 when the loss stays 0, else ±inf; a non-finite
    value gives NaN (never below a threshold).
    """
    if not (math.isfinite(previous) and math.isfinite(current)):
        return math.nan
    diff = current - previous if mode == "abs" else previous - current
    if mode == "abs":
        diff = abs(diff)
    if previous == 0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff / abs(previous)


class RelativeLossStopping(EarlyStopping):
    """Stop at the end of the first epoch whose training loss changed by less than ``threshold`` (relative).

    Hammoud et al. 2023 (adaptive sharpness and generalization) train every pool member "until the
    relative difference of training loss dips below 5% or until 10 epochs have been reached" (Cora:
    "a minimum of 10 epochs"). With L_e the epoch value of ``monitor`` after e completed epochs
    (e = 1, 2, …) and r_e its :func:`relative_change` from L_{e−1}, the run stops at the end of the
    first epoch e ≥ max(2, ``min_epochs``) with r_e < ``threshold`` (strictly); the maximum number of
    epochs is the Trainer's ``max_epochs``. Their FashionMNIST and Cora notebooks use ``mode="abs"``
    (Cora: it may stop once e ≥ 11, ``min_epochs: 11``); the Abalone notebook stops when the loss
    decreased by less than 5 %, or rose (``mode="decrease"``).

    The decision is taken in ``on_train_epoch_end`` after the LightningModule logged its epoch values
    (Lightning runs ``EarlyStopping`` subclasses there), so a
    :class:`~flatminima.callbacks.checkpoint.LossThresholdCheckpoint` with ``save_at_end`` sees the stop and
    saves (and measures) that epoch. The decision is reduced over DDP ranks; the previous epoch value
    and the stop are callback state (a resumed run decides as the uninterrupted one). Nothing is
    logged: ``relative_changes`` holds ``(epoch, r)`` pairs and ``stopped_epoch`` the number of
    epochs trained when it stopped (0 if it did not).

    Args:
        monitor: Epoch-level training metric (default ``train/loss``).
        threshold: Stop once the relative change is below this value (0.05 in the study).
        min_epochs: Do not stop before this many epochs are completed.
        mode: ``"abs"`` (|change|) or ``"decrease"`` (signed decrease; a rising loss stops too).
        verbose: Print a line when it stops.
    """

    def __init__(
        self,
        monitor: str = "train/loss",
        threshold: float = 0.05,
        min_epochs: int = 1,
        mode: ChangeMode = "abs",
        verbose: bool = False,
    ) -> None:
        check_monitor_name(monitor)
        if not is_real(threshold) or not (math.isfinite(threshold) and threshold > 0):
            raise invalid("threshold", threshold, "a finite threshold > 0 (0.05: 5%)")
        min_epochs = check_int("min_epochs", min_epochs, 1)
        check_choice("mode", mode, ("abs", "decrease"))
        super().__init__(monitor=monitor, mode="min", verbose=verbose, check_on_train_epoch_end=True)
        self.threshold = float(threshold)
        self.min_epochs = min_epochs
        self.change_mode = mode
        self.previous: float | None = None
        self.relative_changes: list[tuple[int, float]] = []

    @property
    def state_key(self) -> str:
        return compat.state_key(
            self, monitor=self.monitor, threshold=self.threshold, min_epochs=self.min_epochs, mode=self.change_mode
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "previous": self.previous,
            "stopped_epoch": self.stopped_epoch,
            "relative_changes": [list(c) for c in self.relative_changes],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.previous = state_dict.get("previous")
        self.stopped_epoch = state_dict.get("stopped_epoch", 0)
        self.relative_changes = [(int(e), float(r)) for e, r in state_dict.get("relative_changes", [])]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Nothing to set up (the check always runs at the end of a training epoch)."""

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """No check after validation: the rule follows training epochs."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise ValueError(
                f"Invalid monitor: {self.monitor!r} was not logged as an epoch-level metric; logged metrics: "
                f"{sorted(trainer.callback_metrics)}"
            )
        current = float(torch.as_tensor(value, dtype=torch.float64))
        epoch = trainer.current_epoch + 1  # epochs completed
        stop, r = False, math.nan
        if self.previous is not None:
            r = relative_change(self.previous, current, self.change_mode)
            self.relative_changes.append((epoch, r))
            stop = epoch >= self.min_epochs and r < self.threshold
        self.previous = current
        stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            trainer.should_stop = True
            self.stopped_epoch = epoch
            if self.verbose:
                rank_zero_info(
                    f"RelativeLossStopping: {self.monitor} changed by {r:.4g} < {self.threshold} "
                    f"(relative) after epoch {epoch}; stopping."
                )
