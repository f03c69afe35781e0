"""One concise line per training epoch, for logs and terminals without a progress bar."""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

import lightning.pytorch as pl

ORDER = ("train/", "val/", "sharpness/")


class EpochLines(pl.Callback):
    """Print one line per epoch: ``epoch 3/50  train/loss 0.2312  train/acc 0.9070  val/loss ...  (0.8 s)``.

    The line shows the epoch's logged values (``trainer.callback_metrics`` keys with a ``/``, without
    per-step ``*_step`` and ``train_step/*`` keys), train, val and sharpness first. An epoch's values are
    complete once the LightningModule's own ``on_train_epoch_end`` has logged them, which runs after the
    callbacks' hook: the line is printed when the next epoch starts, or when training ends. Rank 0 only.

    Args:
        stream: Where to write (default: ``sys.stdout`` at the time of writing).
        digits: Decimals of each value.
    """

    def __init__(self, stream: TextIO | None = None, digits: int = 4) -> None:
        self.stream = stream
        self.digits = digits
        self._pending: tuple[int, float] | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer)
        self._pending = (trainer.current_epoch, time.perf_counter())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._pending = None

    def line(self, trainer: pl.Trainer, epoch: int, seconds: float) -> str:
        """The line of ``epoch`` (0-based) from the trainer's current metrics."""
        total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        parts = [f"epoch {epoch + 1}/{total}" if total else f"epoch {epoch + 1}"]
        values = {}
        for key, value in trainer.callback_metrics.items():
            if "/" not in key or key.endswith("_step") or key.startswith("train_step/"):
                continue
            try:
                values[key] = float(value)
            except (TypeError, ValueError, RuntimeError):
                continue
        rank = {p: i for i, p in enumerate(ORDER)}
        for key in sorted(values, key=lambda k: (rank.get(k.split("/")[0] + "/", len(ORDER)), k)):
            parts.append(f"{key} {self._number(values[key])}")
        parts.append(f"({seconds:.1f} s)")
        return "  ".join(parts)

    def _number(self, value: float) -> str:
        if value != 0 and math.isfinite(value) and not 1e-3 <= abs(value) < 1e5:
            return f"{value:.{self.digits - 1}e}"
        return f"{value:.{self.digits}f}"

    def _flush(self, trainer: pl.Trainer) -> None:
        pending, self._pending = self._pending, None
        if pending is None or not trainer.is_global_zero or trainer.sanity_checking:
            return
        epoch, start = pending
        stream = self.stream or sys.stdout
        print(self.line(trainer, epoch, time.perf_counter() - start), file=stream, flush=True)
