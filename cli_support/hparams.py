"""TensorBoard's HParams tab: each run's hyperparameters under readable flat names.

:func:`readable_hparams` flattens a parsed config into ``task``, ``net``, ``net.hidden``, ``optimizer``,
``optimizer.lr``, ``rule``, ``rule.rho``, ``data.batch_size``, ``max_epochs``, ``seed``, ...
:class:`HParamsWriter` writes them as the run's HParams session when fit starts (and closes the
session when it ends). No experiment summary is written: TensorBoard then builds the table from all
the runs under ``--logdir`` (the union of their hyperparameters) and takes each run's metrics from its
scalars, so ``test/acc``, ``val/loss``, ``sharpness/*`` show their final values beside the values above.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from flatminima.lightning_modules import compat

#: Arguments that are implementation switches or paths, not hyperparameters.
SKIPPED = frozenset(
    {"foreach", "fused", "differentiable", "capturable", "maximize", "data_dir", "download", "num_workers", "eps"}
)
#: The task's objects and the names they take in the table.
OBJECTS = (("net", "net"), ("optimizer", "optimizer"), ("minimizer", "rule"), ("lr_scheduler", "lr_scheduler"))

Scalar = int | float | str | bool


def readable_hparams(config: dict[str, Any]) -> dict[str, Scalar]:
    """Flat, readable hyperparameters of a parsed ``cli.py`` config (a plain dict)."""
    out: dict[str, Scalar] = {}
    model = config.get("model") or {}
    init = (model.get("init_args") or {}) if isinstance(model, dict) else {}
    if isinstance(model, dict) and model.get("class_path"):
        out["task"] = _short(model["class_path"])
    for key, label in OBJECTS:
        _add_object(out, label, init.get(key), none="none" if key == "minimizer" else None)
    for key, value in init.items():
        if key not in dict(OBJECTS) and key not in SKIPPED and _scalar(value) is not None:
            out[f"model.{key}"] = _scalar(value)
    _add_object(out, "data", config.get("data"))
    trainer = config.get("trainer") or {}
    for key in ("max_epochs", "max_steps", "precision", "devices", "strategy"):
        value = _scalar(trainer.get(key))
        if value is not None and not (key == "max_steps" and value == -1):
            out[key] = value
    if _scalar(config.get("seed_everything")) is not None:
        out["seed"] = _scalar(config["seed_everything"])
    return out


def _add_object(out: dict[str, Scalar], label: str, obj: Any, none: str | None = None) -> None:
    if obj is None:
        if none is not None:
            out[label] = none
        return
    if isinstance(obj, str):
        out[label] = _short(obj)
        return
    if not isinstance(obj, dict) or "class_path" not in obj:
        return
    out[label] = _short(obj["class_path"])
    for key, value in (obj.get("init_args") or {}).items():
        if key not in SKIPPED and _scalar(value) is not None:
            out[f"{label}.{key}"] = _scalar(value)


def _short(class_path: str) -> str:
    return class_path.rpartition(".")[2]


def _scalar(value: Any) -> Scalar | None:
    """A value TensorBoard's HParams accepts: numbers, strings, booleans; short lists as text; else None."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
        text = "[" + ", ".join(str(v) for v in value) + "]"
        return text if len(text) <= 80 else None
    return None


class HParamsWriter(pl.Callback):
    """Write ``hparams`` as the TensorBoard HParams session of the run (rank 0, TensorBoard loggers only).

    Args:
        hparams: Flat name → value (numbers, strings, booleans), e.g. from :func:`readable_hparams`.
    """

    def __init__(self, hparams: dict[str, Scalar]) -> None:
        self.hparams = dict(hparams)

    @rank_zero_only
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from torch.utils.tensorboard.summary import hparams

        _, start, _ = hparams(self.hparams, {})
        self._write(trainer, start)

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from torch.utils.tensorboard.summary import hparams

        _, _, end = hparams({}, {})
        self._write(trainer, end)

    @staticmethod
    def _write(trainer: pl.Trainer, summary: Any) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                writer = compat.tensorboard_file_writer(logger.experiment)
                writer.add_summary(summary)
                writer.flush()
