"""The base class of the sharpness callbacks: when to measure, on what data, where the values go.

Each measure is a thin subclass implementing :meth:`SharpnessCallback.compute` (the math is in
:mod:`flatminima.callbacks.measures`). The base decides *on what data* (a fixed, seeded subset of the training
set, chosen once and kept across resumes: :mod:`flatminima.callbacks._subset`), *where* (the unwrapped network,
each DDP rank taking a share of the batches, sums all-reduced so every rank gets the single-device
value: :mod:`flatminima.callbacks._distributed`), *when* (every N epochs and/or whenever a callback with the
:func:`triggers_measures` capability saves) and *where the values go* (logged as ``sharpness/<name>``
and kept, once, in :attr:`SharpnessCallback.history`). None of it imports this project's LightningModules.

**Shared options.** The options every measure has (schedule, subset, loss, network) are the explicit,
typed keyword arguments of :class:`SharpnessCallback`'s constructor, documented there once. A measure's
constructor declares its own arguments, re-declares only a shared option whose default differs (e.g.
``batch_size=256``) and passes the rest on as ``**kwargs``; an option a measure does not offer is passed
to the base with a fixed value. jsonargparse (LightningCLI) follows ``super().__init__(..., **kwargs)``
into the base's signature, so YAML configs and ``--help`` see every option with its type, default and
description, as with a full signature.

**The trigger capability.** A callback whose class sets ``triggers_measures = True`` promises to call
:func:`measure_on_save` before each of its saves (:class:`~flatminima.callbacks.checkpoint.LossThresholdCheckpoint`
does); a measure with ``on_checkpoint=True`` then measures the saved weights. The measures find such a
callback through that attribute, without importing it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import move_data_to_device, rank_zero_warn
from torch import Tensor, nn

from flatminima.lightning_modules import compat
from flatminima.lightning_modules.validation import ArgumentTypeError, check_choice, check_int, invalid

from . import measures
from ._distributed import rank_zero_buffers, reducer
from ._epoch_end import EpochEndTracker, Pending
from ._names import constructor_defaults, metric_names
from ._subset import (
    BatchToInputs,
    Sampling,
    check_indices,
    collate_subset,
    convert_batches,
    draw_indices,
    training_loader,
)

Values = dict[str, float]
"""``{metric key: value}`` of one measurement."""


def triggers_measures(callback: Any) -> bool:
    """Whether ``callback`` runs the ``on_checkpoint`` measures at its saves (``triggers_measures = True``)."""
    return getattr(callback, "triggers_measures", False) is True


def measure_on_save(
    trainer: pl.Trainer, pl_module: pl.LightningModule, *, via_logger: bool = False, at: Pending | None = None
) -> list[SharpnessCallback]:
    """Run every ``on_checkpoint`` measure now, before a save at ``at`` (on every rank); return those measures.

    Called by a callback with the :func:`triggers_measures` capability. Each measure logs its values,
    keeps them in its :attr:`~SharpnessCallback.history` and writes them into the checkpoint saved at
    this step; :meth:`SharpnessCallback.measurement_at` reads them back.
    """
    measured = checkpoint_measures(trainer.callbacks)
    for callback in measured:
        callback.measure_now(trainer, pl_module, via_logger=via_logger, at=at)
    return measured


def checkpoint_measures(callbacks: list[Any]) -> list[SharpnessCallback]:
    """The measures among ``callbacks`` that run at the saves of a trigger (``on_checkpoint=True``), in order."""
    return [c for c in callbacks if isinstance(c, SharpnessCallback) and c.on_checkpoint]


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name or "/" in name:
        raise invalid("name", name, "a non-empty string without '/'")
    return name


def _check_callables(loss_fn: Any, batch_to_inputs: Any) -> None:
    if not callable(loss_fn):
        raise invalid("loss_fn", loss_fn, "a callable loss_fn(outputs, targets)", error=ArgumentTypeError)
    if batch_to_inputs is not None and not callable(batch_to_inputs):
        raise invalid("batch_to_inputs", batch_to_inputs, "a callable or None", error=ArgumentTypeError)


class SharpnessCallback(EpochEndTracker, Callback):
    """Base class: a sharpness measure on a fixed, seeded subset of the training set.

    Subclasses implement :meth:`compute`. A measurement runs every ``every_n_epochs`` epochs (at the end
    of the training epoch), whenever a callback with the :func:`triggers_measures` capability
    (:class:`~flatminima.callbacks.checkpoint.LossThresholdCheckpoint`) saves (``on_checkpoint``) and/or at the end of
    fit (``at_end``), at most once per (epoch, step). Values are logged with ``pl_module.log`` (or to the
    loggers directly from hooks that forbid logging) and kept in :attr:`history` — the one store of the
    measured values: it is saved in the callback state (so it survives a resume); the checkpoint saved at
    the same step also gets a copy under ``checkpoint["sharpness"][key]`` for readers of the file (never
    read back), and ``LossThresholdCheckpoint.saved`` reads the values from it (:meth:`measurement_at`).

    Several instances of one measure (a sweep over ρ, ...) may share a Trainer: the callback state is
    keyed on the arguments, and instances of one class with the same ``name`` log under
    ``sharpness/<name>_<tokens>``, one token per argument whose value differs among them (``l2``/``linf``
    for p, ``rho0.001``, ``n_iters5``, ``pga``, ``noadaptive``, ...), e.g. ``sharpness/adaptive_rho0.001``
    and ``sharpness/adaptive_rho0.01``; a single instance keeps ``sharpness/<name>``. Pass distinct
    ``name`` values to choose the names yourself. Two instances that would measure the same thing are
    refused (``ValueError`` naming ``name``).

    Before the first training batch the subset is drawn and one of its batches goes through
    ``batch_to_inputs``, the network and the loss, so a batch the measure cannot use is reported then.
    A resume from a checkpoint written after an epoch's last batch but before that epoch's end (a
    step-based ``ModelCheckpoint``, or one saved at validation end) runs the epoch-end measurement
    Lightning skips, on the restored (identical) weights, so the history equals the uninterrupted run's.

    Args:
        name: Metric name: the callback logs ``sharpness/<name>`` (and derived keys).
        every_n_epochs: Measure at the end of every N-th training epoch (None: only at checkpoints).
        on_checkpoint: Measure whenever a LossThresholdCheckpoint saves.
        at_end: Measure the final weights at the end of fit (in ``on_train_end``, logged through the loggers
            and kept in ``trainer.callback_metrics``), unless they were already measured at that step; a
            run resumed from a checkpoint written after its last epoch measures them in ``on_fit_end``.
        num_samples: Size of the fixed random subset of the training set (None: all of it), drawn once
            with ``seed`` and stored in the callback state.
        batch_size: Batch size of the subset's batches (the m of m-sharpness).
        seed: Seed of the subset (and of random probes where the measure uses them, and of the dataset's
            random transforms while the subset is drawn).
        loss_fn: ``loss_fn(outputs, targets)``, a mean-reduced scalar loss.
        batch_to_inputs: Converts a collated training batch into ``(inputs, targets)``; inputs given as a
            tuple are passed as ``network(*inputs)``. For a PyG ``Data`` graph with masks use
            :func:`flatminima.callbacks.inputs.node_inputs` with ``loss_fn=flatminima.callbacks.inputs.masked_cross_entropy``.
        network: Dotted attribute path of the network inside the LightningModule (default: ``net`` when
            the module has an ``nn.Module`` attribute of that name, else the LightningModule itself).
        sampling: How the subset is drawn: ``"subset"`` (distinct examples, without replacement) or
            ``"replacement"`` (``num_samples`` independent uniform draws, with replacement: each batch a
            sample S ~ P^m, so a small training set still gives many fresh batches). Offered by the
            subclasses that pass it on (:class:`~flatminima.callbacks.AdaptiveSharpness`).
    """

    #: The arguments that define what is measured (besides ``name``): the state key and the metric-name
    #: tokens come from them. Subclasses prepend their own.
    identity_args: tuple[str, ...] = ("num_samples", "batch_size", "seed")

    def __init__(
        self,
        name: str,
        *,
        every_n_epochs: int | None = None,
        on_checkpoint: bool = True,
        at_end: bool = False,
        num_samples: int | None = 1024,
        batch_size: int = 128,
        seed: int = 0,
        loss_fn: Callable[[Any, Any], Tensor] = F.cross_entropy,
        batch_to_inputs: BatchToInputs | None = None,
        network: str | None = None,
        sampling: Sampling = "subset",
    ) -> None:
        super().__init__()
        self.sampling = check_choice("sampling", sampling, ("subset", "replacement"))
        self.name = _check_name(name)
        self.metric_name = name  # sharpness/<metric_name>; told apart from same-named instances at setup
        self.every_n_epochs = None if every_n_epochs is None else check_int("every_n_epochs", every_n_epochs, 1)
        self.on_checkpoint = on_checkpoint
        self.at_end = bool(at_end)
        self._ended = False  # the at_end measurement ran in this fit
        self.num_samples = None if num_samples is None else check_int("num_samples", num_samples, 1)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.seed = check_int("seed", seed, 0)
        _check_callables(loss_fn, batch_to_inputs)
        self.loss_fn = loss_fn
        self.batch_to_inputs = batch_to_inputs
        self.network = network
        self.history: list[dict[str, float]] = []  # the one store: {"epoch", "step", **values} per measurement
        self._last_key: Pending | None = None  # (epoch, step) of history[-1] when measured in this fit
        self._indices: list[int] | None = None
        self._batches: list[Any] | None = None
        self._warn_without_trigger = True
        self._state_key: str | None = None  # set once setup has checked this instance against its siblings
        self._measures_subset = False

    # ------------------------------------------------------------------ to implement
    def compute(
        self, network: nn.Module, batches: list[Any], reduce: measures.Reduce | None, trainer: pl.Trainer
    ) -> Values:
        """Run the measure on this rank's share of the batches; return ``{metric key: value}``."""
        raise NotImplementedError

    def check_batch(self, network: nn.Module, batch: Any) -> None:
        """Take one prepared ``(inputs, targets)`` batch through what :meth:`compute` uses (the loss)."""
        measures.check_batch(network, batch, self.loss_fn)

    # ------------------------------------------------------------------ identity and state
    def identity(self) -> dict[str, Any]:
        """The values of :attr:`identity_args`, in order."""
        return {field: getattr(self, field) for field in self.identity_args}

    @property
    def state_key(self) -> str:
        # Until setup has compared the instances itself, the object's id keeps Lightning's constructor check
        # (one state per key) from refusing identical twins with a message that does not say what to change.
        return self._state_key if self._state_key is not None else f"{self._arguments_key()}#{id(self):x}"

    def _arguments_key(self) -> str:
        """``Class{'name': ..., <identity arguments that differ from the defaults>}``."""
        defaults = constructor_defaults(type(self))
        fields = {f: v for f, v in self.identity().items() if f not in defaults or repr(defaults[f]) != repr(v)}
        return compat.state_key(self, name=self.name, **fields)

    def state_dict(self) -> dict[str, Any]:
        return {"indices": self._indices, "history": [dict(h) for h in self.history], "pending": self._pending_now()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._indices = state_dict.get("indices")
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self._last_key = None
        self._restore_pending(state_dict)
        self._batches = None

    def measurement_at(self, epoch: int, step: int) -> Values:
        """The values measured at ``(epoch, step)``, read from :attr:`history` (empty when none)."""
        for entry in reversed(self.history):
            if entry["epoch"] == epoch and entry["step"] == step:
                return {k: v for k, v in entry.items() if k not in ("epoch", "step")}
        return {}

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.metric_name = metric_names([c for c in trainer.callbacks if isinstance(c, SharpnessCallback)])[id(self)]
        self._state_key = self._arguments_key()
        self._start_tracking(trainer)
        self._ended = False
        triggered = self.on_checkpoint and any(triggers_measures(c) for c in trainer.callbacks)
        self._measures_subset = self.every_n_epochs is not None or triggered or self.at_end
        if stage == "fit" and not self._measures_subset and self._warn_without_trigger:
            rank_zero_warn(
                f"{type(self).__name__}({self.name!r}) will not measure: it has every_n_epochs=None, at_end=False "
                "and "
                + ("no LossThresholdCheckpoint among the callbacks" if self.on_checkpoint else "on_checkpoint=False")
                + "; add flatminima.callbacks.LossThresholdCheckpoint or set every_n_epochs or at_end"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._catch_up(trainer, pl_module)
        if self._measures_subset:
            self._check_first_batch(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._catch_up(trainer, pl_module)  # a resume at the very end runs no training hook at all
        if not self._ended:
            self._measure_at_end(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._measure_at_end(trainer, pl_module)

    def _measure_at_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The ``at_end`` measurement of the final weights, unless these weights (this step) were measured."""
        self._ended = True
        measured = any(h["step"] == trainer.global_step for h in self.history)
        if not self.at_end or trainer.sanity_checking or measured:
            return
        self.measure_now(trainer, pl_module, via_logger=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_ended(trainer)
        self.epoch_end(trainer, pl_module, trainer.current_epoch, trainer.global_step)

    def epoch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int, step: int, *, via_logger: bool = False
    ) -> None:
        """The work at the end of training epoch ``epoch`` (at ``step``): measure every N epochs."""
        if self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0:
            self.measure_now(trainer, pl_module, via_logger=via_logger, at=(epoch, step))

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._last_key is not None and self._last_key[1] == trainer.global_step:  # measured on these weights
            checkpoint.setdefault("sharpness", {}).update(self.measurement_at(*self._last_key))

    def _catch_up(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run the end of the epoch a resumed checkpoint was written in, when Lightning went past it."""
        overdue = self._overdue(trainer)
        if overdue is not None:
            self.epoch_end(trainer, pl_module, *overdue, via_logger=True)

    def _check_first_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Draw the subset and take one batch through the measure now, before training: one clear line if not."""
        batches = self.local_batches(trainer, pl_module)
        if not batches:
            return
        try:
            self.check_batch(self.resolve_network(pl_module), batches[0])
        except (TypeError, ValueError, RuntimeError, IndexError, KeyError) as err:
            hint = (
                "pass batch_to_inputs, a callable turning a training batch into (inputs, targets)"
                if self.batch_to_inputs is None
                else "check batch_to_inputs, loss_fn and network"
            )
            raise ValueError(
                f"{type(self).__name__}({self.name!r}) cannot measure on the training batches: "
                f"{str(err).splitlines()[0] if str(err) else type(err).__name__}; {hint}"
            ) from err

    # ------------------------------------------------------------------ measuring
    def measure_now(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, via_logger: bool = False, at: Pending | None = None
    ) -> Values:
        """Measure now on every rank (collective under DDP), log, record; once per (epoch, step).

        Args:
            trainer: The trainer.
            pl_module: The (unwrapped) LightningModule.
            via_logger: Log through ``trainer.loggers`` directly (for hooks where ``self.log`` is
                forbidden, e.g. ``on_train_end``) instead of ``pl_module.log``.
            at: The (epoch, step) the measurement belongs to (default: the trainer's current ones).
        """
        key = at if at is not None else (trainer.current_epoch, trainer.global_step)
        if self._last_key == key:
            return self.measurement_at(*key)
        network = self.resolve_network(pl_module)
        batches = self.local_batches(trainer, pl_module)
        with rank_zero_buffers(network, trainer):
            values = self.compute(network, batches, reducer(trainer), trainer)
        self.history.append({"epoch": key[0], "step": key[1], **values})
        self._last_key = key
        if via_logger:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=key[1])
            trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})
        else:
            for metric, value in values.items():
                pl_module.log(
                    metric, value, on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max", batch_size=1
                )
        return values

    def resolve_network(self, pl_module: pl.LightningModule) -> nn.Module:
        """The network to measure: ``network`` attribute path, else ``pl_module.net``, else ``pl_module``."""
        if not self.network:
            net = getattr(pl_module, "net", None)
            return net if isinstance(net, nn.Module) else pl_module
        obj: Any = pl_module
        for part in self.network.split("."):
            if not hasattr(obj, part):
                raise ValueError(f"Invalid network: {self.network!r}; {type(obj).__name__} has no attribute {part!r}")
            obj = getattr(obj, part)
        if not isinstance(obj, nn.Module):
            raise ValueError(f"Invalid network: {self.network!r} is a {type(obj).__name__}, not an nn.Module")
        return obj

    def local_batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Any]:
        """This rank's share (every world_size-th batch) of the fixed subset, on the module's device."""
        if self._batches is None:
            self._batches = self._load(trainer)
        share = self._batches[trainer.global_rank :: trainer.world_size]
        return [move_data_to_device(batch, pl_module.device) for batch in share]

    def all_batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Any]:
        """Every batch of the fixed subset on the module's device (the same on every rank; for cheap measures)."""
        if self._batches is None:
            self._batches = self._load(trainer)
        return [move_data_to_device(batch, pl_module.device) for batch in self._batches]

    def source_loader(self, trainer: pl.Trainer) -> Any:
        """The loader whose dataset the subset is drawn from (``trainer.train_dataloader``)."""
        return trainer.train_dataloader

    def _load(self, trainer: pl.Trainer) -> list[Any]:
        """The fixed subset's batches (through ``batch_to_inputs``), its indices drawn on first use."""
        kind = type(self).__name__
        loader = training_loader(self.source_loader(trainer), kind)
        n = len(loader.dataset)
        if self._indices is None:
            self._indices = draw_indices(n, self.num_samples, self.sampling, self.seed)
        else:
            check_indices(self._indices, n, kind)
        batches = collate_subset(loader, self._indices, self.batch_size, self.seed)
        return convert_batches(batches, self.batch_to_inputs, f"{kind}({self.name!r})")
