"""A run's summary as one JSON file: status, final metrics, gaps and every sharpness value (any Lightning project)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerStatus

from flatminima.formats.summary import Status, Summary, write_json

FinishAfter = Literal["fit", "test"]
HIGHER_IS_BETTER = ("acc", "accuracy", "f1", "auroc", "precision", "recall")


class RunSummary(Callback):
    """Write ``summary.json``: status, final metrics, generalization gaps and every ``sharpness/*`` value.

    The file is the interface between training and the study analysis (``python cli.py study analyze``);
    its format is :mod:`flatminima.formats.summary` (the :class:`~flatminima.formats.summary.Summary` dictionary),
    and it is written atomically (temporary file, fsync, ``os.replace``) and only on global rank 0. It needs
    nothing from this project: the values are taken from what the run's loggers receive (so they equal
    what TensorBoard shows), or from ``trainer.callback_metrics`` when the trainer has no logger.

    Fields: ``id``, ``status`` (``"finished"`` | ``"failed"``), ``error`` (``"Type: message"`` or null),
    ``axes`` ({axis: value name}), ``seed``, ``config`` (the resolved ``config.yaml`` LightningCLI saved,
    relative to the summary's folder when inside it), ``wall_time_s`` (fit start to the end of the last
    stage), ``epochs``, ``global_step``, ``threshold_epoch`` (the epoch a ``LossThresholdCheckpoint``
    threshold was reached, else null), ``metrics`` ({key: float}), ``sharpness`` ([{key, value, epoch,
    step}] for every ``sharpness/*`` measurement) and ``history`` ({key: [[epoch, step, value], ...]},
    the last value of each epoch-level key per epoch).

    ``metrics`` holds the final value of every logged key (``train/*`` and ``val/*`` of the last epoch,
    ``test/*``, ``sharpness/*``, ...), the generalization gaps ``gap/<m>`` for every ``m`` logged as both
    ``train/<m>`` and ``test/<m>`` (``train − test`` for accuracy-like names — acc, f1, auroc, precision,
    recall — and ``test − train`` for losses and errors, so a larger gap always means worse
    generalization; the train side is ``train_final/<m>``, the final weights re-evaluated on the training
    set, when ``flatminima.callbacks.FinalTrainEvaluation`` logged it, else the last epoch's mean), and ``<key>@threshold``, the value of each per-epoch key at ``threshold_epoch``.
    Non-finite values are kept: a diverged loss is ``inf``, written as the string ``"inf"`` (``"-inf"``,
    ``"nan"``), since JSON has no infinity; :func:`flatminima.formats.summary.read_summary` reads them back as
    floats.

    Example::

        trainer = Trainer(callbacks=[RunSummary("runs/a/summary.json", axes={"optim": "adam"})])
        trainer.fit(model, datamodule=dm)
        trainer.test(model, datamodule=dm)   # adds test/* and the gaps

    Args:
        path: The file to write (default: ``<trainer.log_dir>/summary.json``).
        run_id: The run's id (default: the name of the summary's folder).
        axes: The study axes of this run, ``{axis: value name}``.
        seed: The run's seed (default: ``PL_GLOBAL_SEED``, set by ``seed_everything``).
        finish_after: ``"fit"`` writes ``finished`` at the end of fit (a later test rewrites it with the
            test metrics); ``"test"`` writes only after the test that follows fit, unless the data
            module has no test loader (then at the end of fit), so a run killed during its test is
            never marked finished.
    """

    def __init__(
        self,
        path: str | None = None,
        run_id: str | None = None,
        axes: dict[str, str] | None = None,
        seed: int | None = None,
        finish_after: FinishAfter = "fit",
    ) -> None:
        super().__init__()
        if finish_after not in ("fit", "test"):
            raise ValueError(f"Invalid finish_after: {finish_after!r}; expected 'fit' or 'test'")
        if axes is not None and not isinstance(axes, dict):
            raise TypeError(f"Invalid axes: {axes!r}; expected a mapping {{axis: value name}}")
        self.path = path
        self.run_id = run_id
        self.axes = {str(k): str(v) for k, v in (axes or {}).items()}
        self.seed = seed
        self.finish_after = finish_after
        self._reset()

    def _reset(self) -> None:
        self._start: float | None = None
        self._last: dict[str, float] = {}  # non-finite values included
        self._history: dict[str, dict[int, tuple[int, float]]] = {}
        self._tapped: list[tuple[Any, Any]] = []
        self._threshold_epoch: int | None = None
        self._fit_done = False

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._reset()
        if self._start is None:
            self._start = time.perf_counter()
        self._tap(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._untap()
        if trainer.state.status == TrainerStatus.INTERRUPTED or stage not in ("fit", "test"):
            return
        self._collect(trainer)
        if stage == "fit":
            self._fit_done = True
            if self.finish_after == "test" and _has_test_loader(trainer):
                return
        self.write(trainer, "finished")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._untap()
        self._collect(trainer)
        self.write(trainer, "failed", f"{type(exception).__name__}: {exception}")

    # ------------------------------------------------------------------ logging tap
    def _tap(self, trainer: pl.Trainer) -> None:
        """Record every ``log_metrics`` call each logger receives (the values TensorBoard gets)."""
        self._untap()
        for logger in trainer.loggers:
            original = logger.log_metrics

            def log_metrics(metrics: dict[str, Any], step: int | None = None, _original=original) -> Any:
                self._record(trainer, metrics, step)
                return _original(metrics, step)

            logger.log_metrics = log_metrics
            self._tapped.append((logger, original))
            break  # every logger receives the same dictionary: one tap is enough

    def _untap(self) -> None:
        for logger, _ in self._tapped:
            logger.__dict__.pop("log_metrics", None)
        self._tapped = []

    def _record(self, trainer: pl.Trainer, metrics: dict[str, Any], step: int | None) -> None:
        epoch = _float(metrics.get("epoch"))  # Lightning adds it to epoch-level logs; direct calls lack it
        epoch = trainer.current_epoch if epoch is None else int(epoch)
        step = trainer.global_step if step is None else int(step)
        for key, value in metrics.items():
            number = _float(value)
            if key in ("epoch", "step") or number is None:
                continue  # not a number: nothing to summarise
            self._last[key] = number  # inf and nan included (written as "inf", "nan")
            if not key.endswith("_step") and not key.startswith("train_step/"):
                self._history.setdefault(key, {})[epoch] = (step, number)

    # ------------------------------------------------------------------ the summary
    def _collect(self, trainer: pl.Trainer) -> None:
        if not trainer.loggers:  # nothing was tapped: the callback metrics are the final values
            for key, value in trainer.callback_metrics.items():
                number = _float(value)
                if number is not None:
                    self._last[key] = number
        for callback in trainer.callbacks:
            epoch = getattr(callback, "threshold_epoch", None)
            if isinstance(epoch, int) and not isinstance(epoch, bool):
                self._threshold_epoch = epoch
        self._epochs, self._global_step = trainer.current_epoch, trainer.global_step

    def summary(self, trainer: pl.Trainer, status: Status, error: str | None = None) -> Summary:
        """The summary dictionary of the run so far (what :meth:`write` writes; non-finite values as floats)."""
        path = self._path(trainer)
        metrics = dict(sorted(self._last.items()))
        metrics.update(gaps(metrics))
        history = {k: [[e, s, v] for e, (s, v) in sorted(h.items())] for k, h in sorted(self._history.items())}
        if self._threshold_epoch is not None:
            for key, rows in history.items():
                metrics.update({f"{key}@threshold": v for e, _, v in rows if e == self._threshold_epoch})
        return {
            "id": self.run_id or path.parent.name,
            "status": status,
            "error": error,
            "axes": dict(self.axes),
            "seed": self._seed(),
            "config": _config_path(trainer, path),
            "wall_time_s": None if self._start is None else time.perf_counter() - self._start,
            "epochs": getattr(self, "_epochs", trainer.current_epoch),
            "global_step": getattr(self, "_global_step", trainer.global_step),
            "threshold_epoch": self._threshold_epoch,
            "metrics": metrics,
            "sharpness": [
                {"key": k, "value": v, "epoch": e, "step": s}
                for k, rows in history.items()
                if k.startswith("sharpness/")
                for e, s, v in rows
            ],
            "history": history,
        }

    def write(self, trainer: pl.Trainer, status: Status, error: str | None = None) -> Path | None:
        """Write the summary atomically (rank 0 only); returns the path written."""
        if not trainer.is_global_zero:
            return None
        path = self._path(trainer)
        write_json(path, self.summary(trainer, status, error))
        return path

    def _path(self, trainer: pl.Trainer) -> Path:
        if self.path is not None:
            return Path(self.path)
        return Path(trainer.log_dir or trainer.default_root_dir) / "summary.json"

    def _seed(self) -> int | None:
        if self.seed is not None:
            return int(self.seed)
        value = os.environ.get("PL_GLOBAL_SEED")
        return int(value) if value not in (None, "") else None


def gaps(metrics: dict[str, float | None]) -> dict[str, float | None]:
    """Generalization gaps ``gap/<m>`` from ``train/<m>`` (or ``train_final/<m>``) and ``test/<m>``.

    Positive means worse on the test set: ``train − test`` for accuracy-like names (acc, accuracy, f1, auroc,
    precision, recall), ``test − train`` for the others (losses, errors). When the final weights were
    re-evaluated on the training set (``train_final/<m>``, ``flatminima.callbacks.FinalTrainEvaluation``), that value is
    the train side; otherwise the last epoch's mean ``train/<m>``. Non-finite values give what the arithmetic
    gives (∞ − 1 = ∞, ∞ − ∞ = NaN).
    """
    out: dict[str, float | None] = {}
    names = [k.split("/", 1)[1] for k in metrics if k.startswith(("train/", "train_final/")) and "@" not in k]
    for name in dict.fromkeys(names):
        if f"test/{name}" not in metrics:
            continue
        train = metrics.get(f"train_final/{name}", metrics.get(f"train/{name}"))
        test = metrics[f"test/{name}"]
        if train is None or test is None:
            out[f"gap/{name}"] = None
        elif name.split("_")[-1] in HIGHER_IS_BETTER:
            out[f"gap/{name}"] = train - test
        else:
            out[f"gap/{name}"] = test - train
    return out


def _has_test_loader(trainer: pl.Trainer) -> bool:
    datamodule = trainer.datamodule
    if datamodule is None:
        return False
    return type(datamodule).test_dataloader is not pl.LightningDataModule.test_dataloader


def _config_path(trainer: pl.Trainer, summary: Path) -> str | None:
    log_dir = trainer.log_dir
    if not log_dir or not (Path(log_dir) / "config.yaml").is_file():
        return None
    config = (Path(log_dir) / "config.yaml").resolve()
    try:
        return str(config.relative_to(summary.parent.resolve()))
    except ValueError:
        return str(config)


def _float(value: Any) -> float | None:
    """A Python float (inf and nan included) from a number or a one-element tensor, else None."""
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)
