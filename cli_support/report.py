"""The table ``cli.py`` prints at the end of a run: final metrics, ``sharpness/*`` included, and where it went."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl

ORDER = ("train/", "val/", "test/", "sharpness/")


def final_metrics(trainer: pl.Trainer) -> dict[str, float]:
    """The run's last values: ``trainer.callback_metrics`` (epoch keys) and each measure's last ``history`` entry.

    Sharpness measured at the end of fit is written to the loggers directly (``self.log`` is forbidden
    there) and kept in the callback's ``history``; both sources are read, the history winning.
    """
    out: dict[str, float] = {}
    for key, value in trainer.callback_metrics.items():
        if "/" not in key or key.endswith("_step") or key.startswith("train_step/"):
            continue
        try:
            out[key] = float(value)
        except (TypeError, ValueError, RuntimeError):
            continue
    for callback in trainer.callbacks:
        history = getattr(callback, "history", None)
        if isinstance(history, list) and history and isinstance(history[-1], dict):
            for key, value in history[-1].items():
                if isinstance(key, str) and key.startswith("sharpness/") and isinstance(value, (int, float)):
                    out[key] = float(value)
    return out


def table(metrics: dict[str, float], *, title: str, notes: tuple[str, ...] = ()) -> str:
    """``title``, then one ``key  value`` line per metric (train, val, test, sharpness, others), then ``notes``."""

    def rank(key: str) -> tuple[int, str]:
        return next((i for i, p in enumerate(ORDER) if key.startswith(p)), len(ORDER)), key

    keys = sorted(metrics, key=rank)
    width = max((len(k) for k in keys), default=0)
    lines = [title]
    lines += [f"  {k.ljust(width)}  {_number(metrics[k])}" for k in keys]
    if not keys:
        lines.append("  (no metrics were logged)")
    lines += list(notes)
    return "\n".join(lines)


def _number(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.4e}"
    return f"{value:.4f}"


def run_folder(trainer: pl.Trainer) -> str | None:
    """Where the run's logs went (the first logger's ``log_dir``), or ``default_root_dir`` without a logger."""
    logger: Any = trainer.logger
    if logger is not None and getattr(logger, "log_dir", None):
        return str(logger.log_dir)
    return str(trainer.default_root_dir) if trainer.default_root_dir else None


class StepCounter(pl.Callback):
    """Counts the training batches this call of ``fit`` ran (0: nothing was trained)."""

    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.batches += 1
