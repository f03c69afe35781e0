"""Lightning callbacks that measure sharpness at checkpoints (or every N epochs), on one or many devices.

Each callback is thin: it decides *on what data* (a fixed, seeded subset of the training set, chosen
once and kept across resumes), *where* (the unwrapped network, each DDP rank taking a share of the
batches, sums all-reduced so every rank gets the single-device value), *when* (every N epochs and/or
when a :class:`~callbacks.checkpoint.LossThresholdCheckpoint` saves) and *where to log*
(``sharpness/<name>``, and inside the checkpoint under ``checkpoint["sharpness"]``). The math is in
:mod:`callbacks.measures`. None of them imports this project's LightningModules.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import random
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import move_data_to_device, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from . import measures
from ._core import check_choice, check_float, check_int, check_p

BatchToInputs = Callable[[Any], tuple[Any, Any]]


def _reducer(trainer: pl.Trainer) -> measures.Reduce | None:
    if trainer.world_size <= 1:
        return None
    return lambda t: trainer.strategy.reduce(t, reduce_op="sum")


@contextlib.contextmanager
def _rank_zero_buffers(network: nn.Module, trainer: pl.Trainer) -> Iterator[None]:
    """Under DDP, measure with rank 0's floating buffers (BatchNorm statistics), restored afterwards.

    DDP keeps parameters identical across ranks, but each rank's BatchNorm updates its own running
    statistics after the broadcast at the start of every forward; the checkpoint holds rank 0's. One
    broadcast makes every rank measure the same (saved) model.
    """
    buffers = [b for b in network.buffers() if b.is_floating_point()]
    if trainer.world_size <= 1 or not buffers or not (dist.is_available() and dist.is_initialized()):
        yield
        return
    local = [b.detach().clone() for b in buffers]
    flat = torch.cat([b.detach().reshape(-1) for b in buffers])
    dist.broadcast(flat, src=0)
    try:
        with torch.no_grad():
            for b, v in zip(buffers, flat.split([b.numel() for b in buffers])):
                b.copy_(v.view_as(b))
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(buffers, local)


@contextlib.contextmanager
def _seeded_rng(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG and Python's/NumPy's global RNGs (dataset transforms may draw from them), then restore.

    The subset's batches are then the same whenever they are drawn (first measurement, early check, resume).
    """
    python = random.getstate()
    numpy = sys.modules.get("numpy")
    numpy_state = numpy.random.get_state() if numpy is not None else None
    with torch.random.fork_rng(devices=[]):
        try:
            torch.manual_seed(seed)
            random.seed(seed)
            if numpy is not None:
                numpy.random.seed(seed)
            yield
        finally:
            random.setstate(python)
            if numpy_state is not None:
                numpy.random.set_state(numpy_state)


def pending_epoch_end(trainer: pl.Trainer | None, batch_epoch: int, ended_epoch: int,
                      restored: tuple[int, int] | None) -> tuple[int, int] | None:
    """The (epoch, step) whose epoch-end work a checkpoint written now would leave undone, or None.

    That is the case after the last batch of an epoch whose batches ran here (``batch_epoch``) and whose
    end the callback has not handled (``ended_epoch``): a step-based ModelCheckpoint at the last batch, or
    one saved at validation end. A ``restored`` pending epoch end not yet handled stays pending.
    """
    if restored is not None:
        return restored
    if trainer is None or trainer.state.fn != "fit" or trainer.sanity_checking:
        return None
    if batch_epoch == trainer.current_epoch and trainer.is_last_batch and ended_epoch < trainer.current_epoch:
        return trainer.current_epoch, trainer.global_step
    return None


def _label(field: str, value: Any) -> str:
    """A readable token for one argument value in a metric name: ``l2``/``linf`` for p, ``rho0.001``, ``pga``."""
    if field == "p":
        return "linf" if math.isinf(value) else f"l{value:g}"
    if isinstance(value, bool):
        return field if value else f"no{field}"
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return f"{field}{value:g}"
    return f"{field}{value}"


def _metric_names(callbacks: list[Any]) -> dict[int, str]:
    """The metric name of every SharpnessCallback (by ``id``), with same-named instances told apart.

    Instances of one class sharing a ``name`` get ``<name>_<token>_...`` from the arguments whose values
    differ among them (see :func:`_label`); a name shared across classes, or two instances whose names
    stay equal, is a ``ValueError``.
    """
    groups: dict[str, list[SharpnessCallback]] = {}
    for c in callbacks:
        if isinstance(c, SharpnessCallback):
            groups.setdefault(c.name, []).append(c)
    names: dict[int, str] = {}
    for name, group in groups.items():
        kinds = sorted({type(c).__name__ for c in group})
        if len(kinds) > 1:
            raise ValueError(f"Invalid name: {name!r} is used by {', '.join(kinds)}; give each callback its own name")
        values = [c.identity() for c in group]
        differ = [f for f in values[0] if len({repr(v[f]) for v in values}) > 1]
        for c, v in zip(group, values):
            names[id(c)] = "_".join([name] + [_label(f, v[f]) for f in differ])
    taken: dict[str, SharpnessCallback] = {}
    for c in callbacks:
        if isinstance(c, SharpnessCallback):
            other = taken.setdefault(names[id(c)], c)
            if other is not c:
                raise ValueError(
                    f"Invalid name: two {type(c).__name__} callbacks named {c.name!r} measure the same thing (same "
                    f"arguments, metric sharpness/{names[id(c)]}); remove one or pass distinct name=... values"
                )
    return names


class SharpnessCallback(Callback):
    """Base class: a sharpness measure on a fixed, seeded subset of the training set.

    Subclasses implement :meth:`compute`. A measurement runs every ``every_n_epochs`` epochs (at the end
    of the training epoch) and/or whenever a :class:`~callbacks.checkpoint.LossThresholdCheckpoint`
    saves (``on_checkpoint``), at most once per (epoch, step). Values are logged with ``pl_module.log``
    (or to the loggers directly from hooks that forbid logging), kept in :attr:`history` (saved in the
    callback state, so it survives a resume) and written into the checkpoint saved at the same step
    under ``checkpoint["sharpness"][key]``.

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
        num_samples: Size of the fixed random subset of the training set (None: all of it), drawn once
            with ``seed`` and stored in the callback state.
        sampling: How the subset is drawn: ``"subset"`` (distinct examples, without replacement) or
            ``"replacement"`` (``num_samples`` independent uniform draws, with replacement: each batch a
            sample S ~ P^m, so a small training set still gives many fresh batches). Exposed by the
            subclasses that offer it (:class:`AdaptiveSharpness`).
        batch_size: Batch size of the subset's batches (the m of m-sharpness).
        seed: Seed of the subset (and of random probes where the measure uses them, and of the dataset's
            random transforms while the subset is drawn).
        loss_fn: ``loss_fn(outputs, targets)``, a mean-reduced scalar loss.
        batch_to_inputs: Converts a collated training batch into ``(inputs, targets)``; inputs given as a
            tuple are passed as ``network(*inputs)``. For a PyG ``Data`` graph with masks use
            :func:`callbacks.inputs.node_inputs` with ``loss_fn=callbacks.inputs.masked_cross_entropy``.
        network: Dotted attribute path of the network inside the LightningModule (default: ``net`` when
            the module has an ``nn.Module`` attribute of that name, else the LightningModule itself).
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
        num_samples: int | None = 1024,
        batch_size: int = 128,
        seed: int = 0,
        loss_fn: Callable[[Any, Any], Tensor] = F.cross_entropy,
        batch_to_inputs: BatchToInputs | None = None,
        network: str | None = None,
        sampling: Literal["subset", "replacement"] = "subset",
    ) -> None:
        super().__init__()
        check_choice("sampling", sampling, ("subset", "replacement"))
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"Invalid name: {name!r}; expected a non-empty string without '/'")
        if every_n_epochs is not None:
            check_int("every_n_epochs", every_n_epochs, 1)
        if num_samples is not None:
            check_int("num_samples", num_samples, 1)
        check_int("batch_size", batch_size, 1)
        check_int("seed", seed, 0)
        if not callable(loss_fn):
            raise TypeError(f"Invalid loss_fn: {loss_fn!r}; expected a callable loss_fn(outputs, targets)")
        if batch_to_inputs is not None and not callable(batch_to_inputs):
            raise TypeError(f"Invalid batch_to_inputs: {batch_to_inputs!r}; expected a callable or None")
        self.name = name
        self.metric_name = name  # sharpness/<metric_name>; told apart from same-named instances at setup
        self.every_n_epochs = every_n_epochs
        self.on_checkpoint = on_checkpoint
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.loss_fn = loss_fn
        self.batch_to_inputs = batch_to_inputs
        self.network = network
        self.sampling = sampling
        self.history: list[dict[str, float]] = []
        self._indices: list[int] | None = None
        self._batches: list[Any] | None = None
        self._last: tuple[tuple[int, int], dict[str, float]] | None = None
        self._warn_without_trigger = True
        self._state_key: str | None = None  # set once setup has checked this instance against its siblings
        self._trainer_ref: Callable[[], pl.Trainer | None] = lambda: None
        self._measures_subset = False
        self._batch_epoch = -1  # the epoch whose batches this process last ran
        self._ended_epoch = -1  # the last epoch whose end this callback has handled
        self._pending: tuple[int, int] | None = None  # restored: (epoch, step) whose end is still due

    # ------------------------------------------------------------------ to implement
    def compute(self, network: nn.Module, batches: list[Any], reduce: measures.Reduce | None,
                trainer: pl.Trainer) -> dict[str, float]:
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
        defaults = _defaults(type(self))
        fields = {f: v for f, v in self.identity().items() if f not in defaults or repr(defaults[f]) != repr(v)}
        return self._generate_state_key(name=self.name, **fields)

    def state_dict(self) -> dict[str, Any]:
        return {"indices": self._indices, "history": [dict(h) for h in self.history], "pending": self._pending_now()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._indices = state_dict.get("indices")
        self.history = [dict(h) for h in state_dict.get("history", [])]
        pending = state_dict.get("pending")
        self._pending = None if pending is None else (int(pending[0]), int(pending[1]))
        self._batches = None

    def _pending_now(self) -> tuple[int, int] | None:
        return pending_epoch_end(self._trainer_ref(), self._batch_epoch, self._ended_epoch, self._pending)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from .checkpoint import LossThresholdCheckpoint

        self.metric_name = _metric_names(trainer.callbacks)[id(self)]
        self._state_key = self._arguments_key()
        self._trainer_ref = weakref.ref(trainer)
        self._batch_epoch, self._ended_epoch, self._pending = -1, -1, None
        triggered = self.on_checkpoint and any(isinstance(c, LossThresholdCheckpoint) for c in trainer.callbacks)
        self._measures_subset = self.every_n_epochs is not None or triggered
        if stage == "fit" and self.every_n_epochs is None and not triggered and self._warn_without_trigger:
            rank_zero_warn(
                f"{type(self).__name__}({self.name!r}) will not measure: it has every_n_epochs=None and "
                + ("no LossThresholdCheckpoint among the callbacks" if self.on_checkpoint else "on_checkpoint=False")
                + "; add callbacks.LossThresholdCheckpoint or set every_n_epochs"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._catch_up(trainer, pl_module)
        if self._measures_subset:
            self._check_first_batch(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._catch_up(trainer, pl_module)  # a resume at the very end runs no training hook at all

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch_epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ended_epoch, self._pending = trainer.current_epoch, None
        self.epoch_end(trainer, pl_module, trainer.current_epoch, trainer.global_step)

    def epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int, step: int, *,
                  via_logger: bool = False) -> None:
        """The work at the end of training epoch ``epoch`` (at ``step``): measure every N epochs."""
        if self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0:
            self.measure_now(trainer, pl_module, via_logger=via_logger, at=(epoch, step))

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self._last is not None and self._last[0][1] == trainer.global_step:  # measured on exactly these weights
            checkpoint.setdefault("sharpness", {}).update(self._last[1])

    def _catch_up(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run the end of the epoch a resumed checkpoint was written in, when Lightning went past it.

        (When Lightning replays that epoch's end instead, after a checkpoint saved at validation end,
        ``on_train_epoch_end`` does the work.)
        """
        pending = self._pending
        if pending is not None and trainer.current_epoch > pending[0]:
            self._pending, self._ended_epoch = None, pending[0]
            self.epoch_end(trainer, pl_module, *pending, via_logger=True)

    def _check_first_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Draw the subset and take one batch through the measure now, before training: one clear line if not."""
        batches = self.local_batches(trainer, pl_module)
        if not batches:
            return
        try:
            self.check_batch(self.resolve_network(pl_module), batches[0])
        except (TypeError, ValueError, RuntimeError, IndexError, KeyError) as err:
            hint = ("pass batch_to_inputs, a callable turning a training batch into (inputs, targets)"
                    if self.batch_to_inputs is None else "check batch_to_inputs, loss_fn and network")
            raise ValueError(f"{type(self).__name__}({self.name!r}) cannot measure on the training batches: "
                             f"{str(err).splitlines()[0] if str(err) else type(err).__name__}; {hint}") from err

    # ------------------------------------------------------------------ measuring
    def measure_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *,
                    via_logger: bool = False, at: tuple[int, int] | None = None) -> dict[str, float]:
        """Measure now on every rank (collective under DDP), log, record; cached per (epoch, step).

        Args:
            trainer: The trainer.
            pl_module: The (unwrapped) LightningModule.
            via_logger: Log through ``trainer.loggers`` directly (for hooks where ``self.log`` is
                forbidden, e.g. ``on_train_end``) instead of ``pl_module.log``.
            at: The (epoch, step) the measurement belongs to (default: the trainer's current ones).
        """
        key = at if at is not None else (trainer.current_epoch, trainer.global_step)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        network = self.resolve_network(pl_module)
        batches = self.local_batches(trainer, pl_module)
        with _rank_zero_buffers(network, trainer):
            values = self.compute(network, batches, _reducer(trainer), trainer)
        self._last = (key, values)
        self.history.append({"epoch": key[0], "step": key[1], **values})
        if via_logger:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=key[1])
        else:
            for metric, value in values.items():
                pl_module.log(metric, value, on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max",
                              batch_size=1)
        return values

    def resolve_network(self, pl_module: pl.LightningModule) -> nn.Module:
        """The network to measure: ``network`` attribute path, else ``pl_module.net``, else ``pl_module``."""
        if self.network:
            obj: Any = pl_module
            for part in self.network.split("."):
                if not hasattr(obj, part):
                    raise ValueError(
                        f"Invalid network: {self.network!r}; {type(obj).__name__} has no attribute {part!r}"
                    )
                obj = getattr(obj, part)
            if not isinstance(obj, nn.Module):
                raise ValueError(f"Invalid network: {self.network!r} is a {type(obj).__name__}, not an nn.Module")
            return obj
        net = getattr(pl_module, "net", None)
        return net if isinstance(net, nn.Module) else pl_module

    def local_batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Any]:
        """This rank's share (every world_size-th batch) of the fixed subset, on the module's device."""
        if self._batches is None:
            self._batches = self._load(trainer)
        share = self._batches[trainer.global_rank::trainer.world_size]
        return [move_data_to_device(batch, pl_module.device) for batch in share]

    def _load(self, trainer: pl.Trainer) -> list[Any]:
        loader = trainer.train_dataloader
        if not isinstance(loader, DataLoader):
            raise TypeError(
                f"{type(self).__name__} needs the training DataLoader to draw its fixed subset from; "
                f"trainer.train_dataloader is {type(loader).__name__}"
            )
        dataset = loader.dataset
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError(f"{type(self).__name__} needs a map-style training dataset (with len and indexing)")
        n = len(dataset)
        if self._indices is None:
            generator = torch.Generator().manual_seed(self.seed)
            if self.sampling == "replacement":
                count = n if self.num_samples is None else self.num_samples
                self._indices = torch.randint(n, (count,), generator=generator).tolist()
            else:
                count = n if self.num_samples is None else min(self.num_samples, n)
                self._indices = torch.randperm(n, generator=generator)[:count].tolist()
        elif self._indices and max(self._indices) >= n:
            raise ValueError(f"{type(self).__name__}: the stored subset indexes {max(self._indices)} but the training "
                             f"set has {n} examples (it changed since the subset was drawn)")
        with _seeded_rng(self.seed):
            subset = DataLoader(Subset(dataset, self._indices), batch_size=self.batch_size, shuffle=False,
                                collate_fn=loader.collate_fn, num_workers=0)
            batches = list(subset)
        if self.batch_to_inputs is not None:
            try:
                batches = [self.batch_to_inputs(b) for b in batches]
            except Exception as err:
                raise ValueError(f"Invalid batch_to_inputs: {self.batch_to_inputs!r} failed on a training batch of "
                                 f"{type(self).__name__}({self.name!r}): {type(err).__name__}: {err}") from err
        return batches


@functools.lru_cache(maxsize=None)
def _defaults(cls: type) -> dict[str, Any]:
    """The constructor's default argument values of a callback class."""
    return {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


class MinimumSharpness(SharpnessCallback):
    """Minimum sharpness (Ibayashi et al. 2021) of the network at checkpoints.

    MS = min over α-scale transformations of Tr H of the mean cross-entropy on the fixed subset, from the
    exact per-layer traces (:func:`callbacks.measures.minimum_sharpness`). The network must be a
    feed-forward ReLU chain (BatchNorm after a layer is folded); others raise ``ValueError``.

    Logs:
        ``sharpness/<name>``: MS.
        ``sharpness/<name>_trace``: Tr H at the current scaling (Σ_d T_d + B_d, exact).

    Example::

        trainer = Trainer(callbacks=[LossThresholdCheckpoint(threshold=0.01, every_n_epochs=50),
                                     MinimumSharpness(num_samples=1024)])

    Args:
        solver: ``"exact"`` (Newton) or ``"sgd"`` (the original code; ``lr``, ``steps``, ``decay``,
            ``retries`` apply to it only; seed 000: lr 0.1 FashionMNIST / 0.5 CIFAR-10, 100 000 steps).
        name: Metric name (default ``"minimum"``).
        **kwargs: :class:`SharpnessCallback` options (data, schedule, network).
    """

    identity_args = ("solver", "lr", "steps", "decay", "retries") + SharpnessCallback.identity_args

    def __init__(
        self,
        solver: Literal["exact", "sgd"] = "exact",
        lr: float = 0.1,
        steps: int = 10_000,
        decay: float = 1e-3,
        retries: int = 0,
        name: str = "minimum",
        every_n_epochs: int | None = None,
        on_checkpoint: bool = True,
        num_samples: int | None = 1024,
        batch_size: int = 256,
        seed: int = 0,
        batch_to_inputs: BatchToInputs | None = None,
        network: str | None = None,
    ) -> None:
        super().__init__(name, every_n_epochs=every_n_epochs, on_checkpoint=on_checkpoint, num_samples=num_samples,
                         batch_size=batch_size, seed=seed, batch_to_inputs=batch_to_inputs, network=network)
        check_choice("solver", solver, ("exact", "sgd"))
        self.solver = solver
        self.lr = check_float("lr", lr, strict=True)
        self.steps = check_int("steps", steps, 1)
        self.decay = check_float("decay", decay)
        self.retries = check_int("retries", retries, 0)

    def check_batch(self, network: nn.Module, batch: Any) -> None:
        """The network must be a supported feed-forward chain, and run on the batch's inputs."""
        measures.feed_forward_layers(network)
        measures.check_batch(network, batch, None)

    def compute(self, network: nn.Module, batches: list[Any], reduce: measures.Reduce | None,
                trainer: pl.Trainer) -> dict[str, float]:
        traces = measures.layer_traces(network, batches, reduce=reduce)
        value = measures.minimize_scaled_trace(traces.weight, traces.bias, solver=self.solver, lr=self.lr,
                                               steps=self.steps, decay=self.decay, retries=self.retries)
        return {f"sharpness/{self.metric_name}": value, f"sharpness/{self.metric_name}_trace": traces.total}


class AdaptiveSharpness(SharpnessCallback):
    """Adaptive worst-case m-sharpness (Andriushchenko et al. 2023; seed 002) at checkpoints.

    mean over the subset's batches of max_{‖δ ⊙ c⁻¹‖_p ≤ ρ} L_B(w + δ) − L_B(w), c = |w| if adaptive
    (:func:`callbacks.measures.adaptive_sharpness`). Seed 002: ``method="pga"``, ``n_iters=5``, p = ∞,
    ``batch_size=64``, ``num_samples=3200`` (50 batches), the step the training learning rate (taken
    from the first optimizer when ``step_size`` is None).

    Hammoud et al.'s notebooks measure differently; the options ``score``, ``box``, ``train_mode`` and
    ``sampling`` reproduce their choices (see :func:`callbacks.measures.adaptive_sharpness`).

    Logs:
        ``sharpness/<name>``: the sharpness.

    Args:
        rho: Radius ρ ≥ 0.
        p: 2 or ``float("inf")``.
        adaptive: c = |w| (scale-invariant) instead of 1.
        n_iters: Ascent steps per batch.
        method: ``"apgd"`` (the authors' estimator, as their code runs it), ``"apgd_reset"`` (the iterate
            restarts from the best point at each step halving; this project's earlier default) or ``"pga"``
            (seed 002).
        step_size: Initial (apgd, default 2ρ) or fixed (pga, default the current training lr) step.
        name: Metric name (default ``"adaptive"``).
        score: pga only. ``"batch"``: each iterate is scored by its ascent batch's loss (the definition);
            ``"train_set"``: by the loss over the whole training set, collated as one batch (their FCNN and
            GAT notebooks), the value being the best score minus the clean training-set loss.
        box: pga with p = ∞ only: ``"abs"`` (|δ| ≤ ρ|w|) or ``"signed"`` (their FCNN notebook's clamp
            with bounds ±ρ·w, which pins negative weights at w − ρ|w|).
        train_mode: Measure with the network in training mode (dropout on, as their GAT and LeNet-5
            notebooks do); the dropout masks are drawn from a generator seeded with ``seed`` at every
            measurement, and the global RNG is restored afterwards.
        sampling: ``"subset"`` (distinct examples) or ``"replacement"`` (independent draws; their GAT
            notebook draws its 64 nodes with replacement). See :class:`SharpnessCallback`.
        **kwargs: :class:`SharpnessCallback` options.
    """

    identity_args = ("rho", "p", "adaptive", "n_iters", "method", "step_size", "score", "box", "train_mode",
                     "sampling") + SharpnessCallback.identity_args

    def __init__(
        self,
        rho: float,
        p: float = math.inf,
        adaptive: bool = True,
        n_iters: int = 20,
        method: Literal["apgd", "apgd_reset", "pga"] = "apgd",
        step_size: float | None = None,
        name: str = "adaptive",
        every_n_epochs: int | None = None,
        on_checkpoint: bool = True,
        num_samples: int | None = 1024,
        batch_size: int = 128,
        seed: int = 0,
        loss_fn: Callable[[Any, Any], Tensor] = F.cross_entropy,
        batch_to_inputs: BatchToInputs | None = None,
        network: str | None = None,
        score: Literal["batch", "train_set"] = "batch",
        box: Literal["abs", "signed"] = "abs",
        train_mode: bool = False,
        sampling: Literal["subset", "replacement"] = "subset",
    ) -> None:
        super().__init__(name, every_n_epochs=every_n_epochs, on_checkpoint=on_checkpoint, num_samples=num_samples,
                         batch_size=batch_size, seed=seed, loss_fn=loss_fn, batch_to_inputs=batch_to_inputs,
                         network=network, sampling=sampling)
        self.rho = check_float("rho", rho)
        self.p = check_p(p, allowed=(2.0, math.inf))
        self.adaptive = adaptive
        self.n_iters = check_int("n_iters", n_iters, 1)
        self.method = check_choice("method", method, ("apgd", "apgd_reset", "pga"))
        self.step_size = None if step_size is None else check_float("step_size", step_size, strict=True)
        self.score = check_choice("score", score, ("batch", "train_set"))
        self.box = check_choice("box", box, ("abs", "signed"))
        self.train_mode = bool(train_mode)
        measures.check_pga_options(self.method, self.p, self.adaptive, self.box, self.score != "batch", "score")
        self._score_batches: list[Any] | None = None

    def compute(self, network: nn.Module, batches: list[Any], reduce: measures.Reduce | None,
                trainer: pl.Trainer) -> dict[str, float]:
        step_size = self.step_size
        if step_size is None and self.method == "pga":
            if not trainer.optimizers:
                raise ValueError("Invalid step_size: None with method='pga' and no optimizer to take the lr from")
            step_size = float(trainer.optimizers[0].param_groups[0]["lr"])
        score_batches = self.training_set_batch(trainer) if self.score == "train_set" else None
        with _seeded_rng(self.seed) if self.train_mode else contextlib.nullcontext():
            value = measures.adaptive_sharpness(
                network, batches, self.rho, p=self.p, adaptive=self.adaptive, n_iters=self.n_iters,
                method=self.method, step_size=step_size, loss_fn=self.loss_fn, reduce=reduce,
                score_batches=score_batches, box=self.box, train_mode=self.train_mode,
            )
        return {f"sharpness/{self.metric_name}": value}

    def training_set_batch(self, trainer: pl.Trainer) -> list[Any]:
        """The whole training set collated as one batch (through ``batch_to_inputs``), drawn once and kept."""
        if self._score_batches is None:
            loader = trainer.train_dataloader
            if not isinstance(loader, DataLoader):
                raise TypeError(f"{type(self).__name__}(score='train_set') needs the training DataLoader; "
                                f"trainer.train_dataloader is {type(loader).__name__}")
            dataset = loader.dataset
            batch = loader.collate_fn([dataset[i] for i in range(len(dataset))])
            self._score_batches = [self.batch_to_inputs(batch) if self.batch_to_inputs is not None else batch]
        return [move_data_to_device(b, trainer.lightning_module.device) for b in self._score_batches]


class HessianSpectrum(SharpnessCallback):
    """Top Hessian eigenvalues (Lanczos) and the Hessian trace (Hutchinson or exact) at checkpoints.

    On exact Hessian-vector products (double backward on the unwrapped network), H the Hessian of the
    mean batch loss on the fixed subset (:func:`callbacks.measures.hessian_eigenvalues`,
    :func:`callbacks.measures.hutchinson_trace`, :func:`callbacks.measures.hessian_trace`).

    Logs:
        ``sharpness/<name>_eig<i>`` for i = 1..k: the i-th largest eigenvalue.
        ``sharpness/<name>_trace``: Tr H (when ``trace`` is not ``"none"``).
        ``sharpness/<name>_trace_stderr``: Hutchinson's standard error (``trace="hutchinson"``).

    Args:
        k: Number of top eigenvalues (0: none).
        tol: Lanczos relative residual tolerance.
        max_iter: Maximum Hessian-vector products of Lanczos.
        trace: ``"hutchinson"``, ``"exact"`` (cross-entropy ReLU chains) or ``"none"``.
        n_probes: Rademacher probes of Hutchinson's estimator.
        cache_graphs: Keep the batches' gradient graphs between products (faster, more memory).
        name: Metric prefix (default ``"hessian"``).
        **kwargs: :class:`SharpnessCallback` options.
    """

    identity_args = ("k", "tol", "max_iter", "trace", "n_probes") + SharpnessCallback.identity_args

    def __init__(
        self,
        k: int = 1,
        tol: float = 1e-4,
        max_iter: int = 100,
        trace: Literal["hutchinson", "exact", "none"] = "hutchinson",
        n_probes: int = 100,
        cache_graphs: bool = True,
        name: str = "hessian",
        every_n_epochs: int | None = None,
        on_checkpoint: bool = True,
        num_samples: int | None = 1024,
        batch_size: int = 256,
        seed: int = 0,
        loss_fn: Callable[[Any, Any], Tensor] = F.cross_entropy,
        batch_to_inputs: BatchToInputs | None = None,
        network: str | None = None,
    ) -> None:
        super().__init__(name, every_n_epochs=every_n_epochs, on_checkpoint=on_checkpoint, num_samples=num_samples,
                         batch_size=batch_size, seed=seed, loss_fn=loss_fn, batch_to_inputs=batch_to_inputs,
                         network=network)
        self.k = check_int("k", k, 0)
        self.tol = check_float("tol", tol, strict=True)
        self.max_iter = check_int("max_iter", max_iter, max(k, 1))
        self.trace = check_choice("trace", trace, ("hutchinson", "exact", "none"))
        self.n_probes = check_int("n_probes", n_probes, 1)
        self.cache_graphs = cache_graphs
        if k == 0 and trace == "none":
            raise ValueError("Invalid k: 0 with trace='none'; HessianSpectrum would measure nothing")
        if trace == "exact" and loss_fn is not F.cross_entropy:
            raise ValueError("Invalid trace: 'exact' applies to the cross-entropy loss only; use 'hutchinson'")

    def compute(self, network: nn.Module, batches: list[Any], reduce: measures.Reduce | None,
                trainer: pl.Trainer) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.k:
            values = measures.hessian_eigenvalues(network, batches, self.k, loss_fn=self.loss_fn, tol=self.tol,
                                                  max_iter=self.max_iter, seed=self.seed,
                                                  cache_graphs=self.cache_graphs, reduce=reduce)
            out.update({f"sharpness/{self.metric_name}_eig{i + 1}": v for i, v in enumerate(values)})
        if self.trace == "hutchinson":
            estimate = measures.hutchinson_trace(network, batches, n_probes=self.n_probes, loss_fn=self.loss_fn,
                                                 seed=self.seed, cache_graphs=self.cache_graphs, reduce=reduce)
            out[f"sharpness/{self.metric_name}_trace"] = estimate.value
            out[f"sharpness/{self.metric_name}_trace_stderr"] = estimate.stderr
        elif self.trace == "exact":
            out[f"sharpness/{self.metric_name}_trace"] = measures.layer_traces(network, batches, reduce=reduce).total
        return out


class GradientNormSharpness(SharpnessCallback):
    """Gradient-norm sharpness ρ‖∇L_B(w) ⊙ c‖_q of every training batch, at no extra cost (seed 001).

    Seed 001's Algorithm 1: the first-order SAM sharpness ρ‖∇L_B(w)‖ of each training batch, averaged
    per epoch. The gradient is the one the training step already computed — no extra forward or
    backward: for a module exposing ``pass_index`` (the two-pass SAM module) the clean pass-1 gradient
    (read in ``on_after_backward`` while ``pass_index == 1``), for other modules in automatic
    optimization the step's gradient in ``on_before_optimizer_step`` (after AMP unscaling and gradient
    accumulation, before clipping), in manual optimization the gradient after each backward. Scaled
    16-mixed gradients are unscaled. Under DDP each rank logs its own per-batch value (the gradient it
    holds: per replica for the SAM module's per-replica ascent, all-reduced otherwise); the epoch mean is
    over all ranks' batches. (The listing of seed 001 divides the epoch sum by the last batch index; this
    is the mean over batches.) The epoch's running sum is on the device (no host sync per batch) and in
    the callback state, so a resume within an epoch keeps the batches before the checkpoint. With the
    SAM module's gradient accumulation the value is read once the pass-1 gradient is complete (per
    micro-batch with ``accumulate_ascent="micro"``).

    With ``on_checkpoint``/``every_n_epochs`` it also measures ρ‖∇L_B ⊙ c‖_q on the fixed subset
    (:func:`callbacks.measures.gradient_norm_sharpness`, one extra forward/backward per subset batch).

    Logs:
        ``sharpness/<name>``: the epoch mean of the per-batch training values.
        ``sharpness/<name>_step``: the per-batch training value (``log_every_step``).
        ``sharpness/<name>_subset``: the value on the fixed subset (at checkpoints / every N epochs).

    Args:
        rho: ρ ≥ 0 (the SAM radius).
        p: Norm of the perturbation ball (2 in seed 001); the gradient norm is its dual q.
        adaptive: c = |w| instead of 1.
        log_every_step: Also log the per-batch value.
        name: Metric name (default ``"gradient_norm"``).
        on_checkpoint: Measure on the fixed subset when a LossThresholdCheckpoint saves (default off:
            the training-time values cost nothing, the subset one does).
        **kwargs: :class:`SharpnessCallback` options.
    """

    identity_args = ("rho", "p", "adaptive") + SharpnessCallback.identity_args

    def __init__(
        self,
        rho: float = 0.05,
        p: float = 2.0,
        adaptive: bool = False,
        log_every_step: bool = True,
        name: str = "gradient_norm",
        every_n_epochs: int | None = None,
        on_checkpoint: bool = False,
        num_samples: int | None = 1024,
        batch_size: int = 128,
        seed: int = 0,
        loss_fn: Callable[[Any, Any], Tensor] = F.cross_entropy,
        batch_to_inputs: BatchToInputs | None = None,
        network: str | None = None,
    ) -> None:
        super().__init__(name, every_n_epochs=every_n_epochs, on_checkpoint=on_checkpoint, num_samples=num_samples,
                         batch_size=batch_size, seed=seed, loss_fn=loss_fn, batch_to_inputs=batch_to_inputs,
                         network=network)
        self.rho = check_float("rho", rho)
        self.p = check_p(p)
        self.adaptive = adaptive
        self.log_every_step = log_every_step
        self._warn_without_trigger = on_checkpoint  # the training-time values need no trigger
        self._params: list[Tensor] = []
        self._sum: Tensor | None = None  # this epoch's per-batch values, summed on the device
        self._count = 0

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(epoch_sum=0.0 if self._sum is None else float(self._sum), epoch_count=self._count)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        count = int(state_dict.get("epoch_count", 0))
        trainer = self._trainer_ref()
        rank = 0 if trainer is None else trainer.global_rank
        if count and trainer is not None and trainer.world_size > 1:
            rank_zero_warn(f"{type(self).__name__}({self.name!r}): resumed within an epoch under DDP; only rank 0's "
                           "values before the checkpoint are in the checkpoint, so that epoch's mean omits the "
                           "other ranks' values before it")
        self._count = count if rank == 0 else 0
        self._sum = torch.tensor(float(state_dict.get("epoch_sum", 0.0)), dtype=torch.float64) if self._count else None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._sum, self._count = None, 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._params = [p for p in pl_module.parameters() if p.requires_grad]

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        index = getattr(pl_module, "pass_index", None)
        if index is None and pl_module.automatic_optimization:
            return  # read once per optimizer step, in on_before_optimizer_step
        if index is not None and index != 1:
            return  # pass 2 of the SAM step holds the perturbed gradient
        self._record(trainer, pl_module, unscale=True)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if getattr(pl_module, "pass_index", None) is None and pl_module.automatic_optimization:
            self._record(trainer, pl_module, unscale=False)

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, unscale: bool) -> None:
        params = [p for p in (self._params or pl_module.parameters()) if p.grad is not None]
        if not params:
            return
        value = measures.gradient_norm([p.grad for p in params], params, rho=self.rho, p=self.p,
                                       adaptive=self.adaptive)
        if unscale:
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            if scaler is not None and scaler.is_enabled():
                scale = scaler._get_scale_async() if hasattr(scaler, "_get_scale_async") else scaler.get_scale()
                value = value / scale
        if self.log_every_step:
            pl_module.log(f"sharpness/{self.metric_name}_step", value, on_step=True, on_epoch=False, batch_size=1)
        value = value.detach().to(torch.float64)
        self._sum = value if self._sum is None else self._sum.to(value.device) + value
        self._count += 1

    def epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int, step: int, *,
                  via_logger: bool = False) -> None:
        """Log the epoch's mean of the per-batch values (over all ranks), then measure the subset if due."""
        total = torch.zeros((), dtype=torch.float64) if self._sum is None else self._sum
        total = total.to(pl_module.device)
        packed = torch.stack([total, total.new_tensor(float(self._count))])
        if trainer.world_size > 1:
            packed = trainer.strategy.reduce(packed, reduce_op="sum")
        self._sum, self._count = None, 0
        if float(packed[1]) > 0:
            key, mean = f"sharpness/{self.metric_name}", (packed[0] / packed[1]).float()
            if via_logger:
                for logger in trainer.loggers:
                    logger.log_metrics({key: float(mean)}, step=step)
            else:
                pl_module.log(key, mean, on_step=False, on_epoch=True, sync_dist=True, batch_size=1)
        super().epoch_end(trainer, pl_module, epoch, step, via_logger=via_logger)

    def compute(self, network: nn.Module, batches: list[Any], reduce: measures.Reduce | None,
                trainer: pl.Trainer) -> dict[str, float]:
        value = measures.gradient_norm_sharpness(network, batches, self.rho, p=self.p, adaptive=self.adaptive,
                                                 loss_fn=self.loss_fn, reduce=reduce)
        return {f"sharpness/{self.metric_name}_subset": value}
