"""The two-pass SAM-family step, written once (manual optimization); tasks subclass it."""

from __future__ import annotations

import contextlib
import math
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
import torchmetrics
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.optim.lr_scheduler import ReduceLROnPlateau

from ._epoch_means import EpochMeans
from ._micro_batches import leading_size, split, split_sizes, take
from ._rule import RuleSetup, StepContext
from ._step import FrozenParameters, PerturbedWeights, all_reduce_mean, grads_or_zeros, rng_state, set_rng_state
from .compat import (
    attached_trainer,
    launched_by_cli,
    logging_step,
    loss_scale,
    running_stat_buffers,
    sequential_schedulers,
)
from .minimizers import Minimizer, global_norm
from .validation import check_choice, check_float, check_int

NonFinitePolicy = Literal["raise", "stop", "skip", "ignore"]


class TwoPassModule(pl.LightningModule):
    """Base LightningModule that trains ``net`` with a SAM-family rule on top of any base optimizer.

    One training step (docs/design.md, "The two-pass step"), manual optimization::

        pass 1: g = ∇L_B(w)                 (logged: train/loss, train/grad_norm = ‖g‖₂)
                ε = minimizer.perturbation(w, g)
        pass 2: with PerturbedWeights(w, ε):   w ← w + ε; on exit, also on an error, w ← backup
                    g_p = ∇L_B(w + ε)          (an exact copy) and the BatchNorm stats restored
                                            (logged: train/loss_perturbed)
                d = minimizer.descent_(g, g_p), written over g_p in .grad
                optimizer.step() with gradient d   (exactly once per batch; without d if it is not finite)

    ``minimizer=None`` trains with the base optimizer alone: one forward-backward pass, same module.

    The cheaper variants (LookSAM, EveryK, RandomSteps, AdaptiveSteps, MomentumSAM, ESAM, SAF, MESA) are rules
    too: each step the module asks the rule whether to run pass 2 (``plan``, or ``second_pass`` after pass 1),
    where to take a one-pass step's gradient (``evaluation_offset``: at w + ε inside ``PerturbedWeights``,
    restored before anything else can look), how to form d from one gradient (``one_pass_descent_``), and
    whether to add a term to the loss (``extra_loss``); a one-pass step is this same step with pass 2
    skipped (docs/design.md, "One step, one or two passes"). The rule's state is in the checkpoint.

    Under DDP, ``ascent="replica"`` (default, the SAM paper's m-sharpness) computes ε from each
    replica's own sub-batch gradient (pass 1 without gradient all-reduce) and averages the final
    directions; rules whose descent uses g (GSAM) form d on each replica before averaging it.
    ``ascent="global"`` takes ε from the all-reduced gradient instead.

    Rules whose radius follows the lr (GSAM with ``rho_min``) get the lr of this step and the peak of
    the schedule (:func:`schedule_peak_lr`), both of the optimizer's first param group.

    During a step ``self.pass_index`` is 1 in pass 1 and 2 in pass 2 (0 outside), for callbacks
    that read gradients in ``on_after_backward``: 1 only while the pass yields the clean gradient
    ∇L_B(w) of every parameter, 2 for a gradient at perturbed weights (SAM's pass 2, Momentum-SAM's one
    pass), 3 for another gradient at w (SAF's and MESA's loss with its extra term, ESAM's pass 1 on a
    subset of the tensors). With gradient accumulation it is 1 (2, 3) during the backward that completes
    the pass's gradient and -1 (-2, -3) during the micro-batches before it, whose gradient is still partial.

    Subclasses implement :meth:`forward_loss` (and may override :meth:`update_metrics`).

    Args:
        net: The network (a plain ``nn.Module``).
        optimizer: Base optimizer factory, called with the parameters (any ``torch.optim`` class).
        minimizer: The SAM-family rule or a cheaper variant; None for the base optimizer alone.
        lr_scheduler: Optional lr scheduler factory, called with the optimizer; the module steps it.
        lr_scheduler_interval: Step the scheduler every ``"epoch"`` or every optimizer ``"step"``.
        lr_scheduler_monitor: Metric that a ``ReduceLROnPlateau`` scheduler watches.
        ascent: ``"replica"`` (per-replica ε under DDP) or ``"global"`` (ε from the averaged gradient).
        gradient_clip_val: Clip the final direction d to this norm (or value); None = no clipping.
        gradient_clip_algorithm: ``"norm"`` or ``"value"``.
        on_nonfinite: What a non-finite loss or descent direction does: ``"raise"`` an error,
            ``"stop"`` the run, ``"skip"`` the update, or ``"ignore"`` it (no check, no host sync).
            The update is never applied in the first three cases, so no NaN reaches the weights.
        share_dropout_rng: Draw the same dropout masks in both passes (default: fresh masks, as the
            PyTorch reference implementations do).
        log_train_steps: Also log the training values of every step under ``train_step/*`` (every step,
            whatever ``Trainer(log_every_n_steps)`` says).
        accumulate_grad_batches: Split each loader batch into this many micro-batches (along the first
            dimension; sizes nᵢ differing by at most one) and accumulate their gradients, weighted by
            nᵢ/N, into one optimizer step: the memory of a micro-batch, the step of the whole batch.
            Lightning's own ``Trainer(accumulate_grad_batches=...)`` is refused (manual optimization).
        accumulate_ascent: With accumulation, where the ascent is taken. ``"accumulated"``: ε from the
            accumulated gradient of the whole batch, then the perturbed gradient accumulated likewise,
            so the step equals the step on the whole batch (m-sharpness with m = the loader batch;
            BatchNorm statistics aside, which see micro-batches). ``"micro"``: each micro-batch takes
            its own two-pass direction dᵢ (εᵢ from its own gradient, m = the micro-batch size) and
            d = Σ nᵢ/N·dᵢ.
        train_metrics_at: Where the training metrics (``train/acc``, ``train/mae``, ...) are measured:
            ``"clean"`` at w (the pass-1 outputs), or ``"perturbed"`` at w + ε (the pass-2 outputs), as
            the Keras GSAM code of the Adaptive-GSAM moons study plots its training accuracy. ``train/loss``
            stays the clean loss (``train/loss_perturbed`` is the loss at w + ε). Without a rule ε = 0 and
            both are the same; so are they on a variant's one-pass step at w (``"perturbed"`` then takes the
            outputs of that pass), and ESAM's pass 2 measures them on the samples it selected.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerCallable = torch.optim.SGD,
        minimizer: Minimizer | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        lr_scheduler_monitor: str = "val/loss",
        ascent: Literal["replica", "global"] = "replica",
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: Literal["norm", "value"] = "norm",
        on_nonfinite: NonFinitePolicy = "raise",
        share_dropout_rng: bool = False,
        log_train_steps: bool = False,
        accumulate_grad_batches: int = 1,
        accumulate_ascent: Literal["accumulated", "micro"] = "accumulated",
        train_metrics_at: Literal["clean", "perturbed"] = "clean",
    ) -> None:
        super().__init__()
        accumulate, clip = _check_arguments(  # (new names: save_hyperparameters reads the arguments as given)
            net,
            optimizer,
            minimizer,
            accumulate_grad_batches,
            gradient_clip_val,
            lr_scheduler_interval=lr_scheduler_interval,
            ascent=ascent,
            gradient_clip_algorithm=gradient_clip_algorithm,
            on_nonfinite=on_nonfinite,
            accumulate_ascent=accumulate_ascent,
            train_metrics_at=train_metrics_at,
        )
        # Under LightningCLI the hparams are the parsed config (net and optimizer as class paths), so
        # load_from_checkpoint rebuilds everything. Python-built objects would make checkpoints
        # unloadable with torch.load(weights_only=True): keep them out; pass net= to load_from_checkpoint.
        self.save_hyperparameters(ignore=None if launched_by_cli() else list(_OBJECT_ARGS))
        self.net = net
        self.optimizer_factory = optimizer
        self.minimizer = minimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.lr_scheduler_monitor = lr_scheduler_monitor
        self.ascent = ascent
        self.gradient_clip_val = clip
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.on_nonfinite = on_nonfinite
        self.share_dropout_rng = share_dropout_rng
        self.log_train_steps = log_train_steps
        self.accumulate_grad_batches = accumulate
        self.accumulate_ascent = accumulate_ascent
        self.train_metrics_at = train_metrics_at
        self.automatic_optimization = False
        self._init_step_state()

    def _init_step_state(self) -> None:
        """The state the step keeps between calls: counters, parameter lists, buffers, epoch means."""
        self.pass_index = 0
        self.skipped_steps = 0
        self._params: list[Tensor] = []
        self._names: list[str] = []
        self._scratch: dict[str, tuple[tuple[int, ...], list[Tensor]]] = {}
        self._bn_buffers: list[Tensor] = []
        self._bn_backup: list[Tensor] = []
        self._lr_peak: float | None = None
        self._bound_rule: Minimizer | None = None  # the rule that rule.setup() bound to this run
        self._total_steps: int | None = None
        # Outside the module tree (a plain dict), so the model summary and the state_dict are as without them.
        # A mean is logged when updated: loss_perturbed with a rule only (which may be set between steps).
        self._means = {
            "train": EpochMeans(("loss", "grad_norm", "loss_perturbed")),
            "val": EpochMeans(("loss",)),
            "test": EpochMeans(("loss",)),
        }

    # ------------------------------------------------------------------ task interface
    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """Run the network."""
        return self.net(*args, **kwargs)

    def forward_loss(self, batch: Any, stage: str) -> tuple[Tensor, Tensor, Tensor, int]:
        """Return ``(loss, output, target, batch_size)`` for a batch; ``stage`` is train/val/test."""
        raise NotImplementedError

    def update_metrics(self, stage: str, output: Tensor, target: Tensor) -> None:
        """Update the stage's torchmetrics objects with one batch (default: none besides the loss)."""

    def stage_metrics(self, stage: str) -> dict[str, torchmetrics.Metric]:
        """The stage's torchmetrics objects by name, logged as ``{stage}/{name}`` at the epoch end."""
        return {}

    #: The task's ``sample_losses`` and ``select_batch`` work (ESAM's data selection needs them).
    supports_sample_losses: ClassVar[bool] = False
    #: The task's outputs are class logits, one per class (SAF and MESA compare their softmax).
    softmax_outputs: ClassVar[bool] = False

    def sample_losses(self, output: Tensor, target: Tensor) -> Tensor:
        """Per-sample training losses (their mean is the batch loss), from ``forward_loss``'s outputs and targets."""
        raise NotImplementedError(f"{type(self).__name__} does not provide per-sample losses")

    def select_batch(self, batch: Any, index: Tensor) -> Any:
        """The samples ``index`` of a training batch (rows of its tensors); override for other batch types."""
        return take(batch, index)

    def sample_ids(self, batch: Any) -> Tensor | None:
        """The samples' dataset indices: the integer tensor ``idx`` of an ``(x, y, idx)`` batch, else None.

        The tasks read ``batch[0]`` and ``batch[1]`` only, so a trailing ``idx`` changes nothing else (SAF needs it).
        """
        if isinstance(batch, (tuple, list)) and len(batch) >= 3:
            ids = batch[2]
            if isinstance(ids, Tensor) and not ids.is_floating_point() and not ids.is_complex():
                return ids
        return None

    def net_inputs(self, batch: Any) -> tuple[Any, ...]:
        """The network's arguments for a batch (``(x,)`` of ``(x, y, ...)``): MESA runs its copy of the net on them."""
        return (batch[0],)

    def epoch_metric_names(self, stage: str) -> set[str]:
        """The epoch-level keys this module logs for ``stage`` (``train/loss``, ``train/acc``, ...).

        Callbacks check the metrics they monitor against it before training (LossThresholdCheckpoint).
        A subclass that logs more at the end of an epoch extends it.
        """
        keys = {"loss", *self.stage_metrics(stage)}
        rule = self.minimizer
        if stage == "train" and rule is not None:
            if not rule.clean_loss:  # a one-pass Momentum-SAM: no loss at w, metrics only at w + ε
                keys = set(self.stage_metrics(stage)) if self.train_metrics_at == "perturbed" else set()
            keys |= ({"grad_norm"} if rule.clean_gradient else set()) | ({"loss_perturbed"} if rule.perturbs else set())
        elif stage == "train":
            keys.add("grad_norm")
        return {f"{stage}/{key}" for key in keys}

    # ------------------------------------------------------------------ optimizers
    def configure_optimizers(self) -> Any:
        """Build the base optimizer (and the lr scheduler, which this module steps itself)."""
        optimizer = self.optimizer_factory(self.parameters())
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"Invalid optimizer: the factory returned {type(optimizer).__name__}, not a torch Optimizer"
            )
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)  # stepped by this module, ReduceLROnPlateau included
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.lr_scheduler_interval},
        }

    def configure_callbacks(self) -> list[pl.Callback]:
        """Refuse the Trainer options that manual optimization cannot honour, naming this module's own.

        Lightning calls this hook before it checks the Trainer against manual optimization, whose own
        message ("switch to automatic optimization") does not apply to the two-pass step. A subclass
        that returns callbacks here calls ``super().configure_callbacks()`` first.
        """
        trainer = self.trainer
        if trainer.state.fn == "fit":
            if trainer.accumulate_grad_batches != 1:
                raise ValueError(
                    f"Invalid Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}): the two-pass step "
                    f"uses manual optimization; pass accumulate_grad_batches={trainer.accumulate_grad_batches} to "
                    f"{type(self).__name__} instead (model.init_args.accumulate_grad_batches) and leave the "
                    "Trainer's at 1"
                )
            if trainer.gradient_clip_val is not None:
                raise ValueError(
                    f"Invalid Trainer(gradient_clip_val={trainer.gradient_clip_val}): the two-pass step uses manual "
                    f"optimization; pass gradient_clip_val to {type(self).__name__} instead "
                    "(model.init_args.gradient_clip_val), which clips the final direction d"
                )
        return []

    def setup(self, stage: str) -> None:
        """Refuse strategies whose parameters are sharded (the rules need whole local tensors); reset the rule."""
        strategy = type(self.trainer.strategy).__name__
        if "FSDP" in strategy or "DeepSpeed" in strategy or "ModelParallel" in strategy:
            raise ValueError(
                f"Invalid strategy: {strategy}; the two-pass step supports single-device and DDP strategies "
                "(ddp, ddp_spawn, ddp_find_unused_parameters_true)"
            )
        rule = self.minimizer
        if stage == "fit" and rule is not None:
            if self.accumulate_ascent == "micro" and self.accumulate_grad_batches > 1 and not rule.plain_two_pass:
                raise ValueError(
                    f"Invalid accumulate_ascent: 'micro' with {rule!r}; the per-micro-batch ascent "
                    "combines with the two-pass rules only; use accumulate_ascent='accumulated'"
                )
            rule.reset()  # a fresh fit; a resume then restores the rule's state (on_load_checkpoint)
            self._bound_rule = None

    def on_train_start(self) -> None:
        """Bind the rule to this run (after a resume restored the optimizer and the rule); it refuses what won't work."""
        if self.minimizer is not None:
            self._bind_rule()

    def _bind_rule(self) -> None:
        """``rule.setup`` with what the run knows: the net, the optimizer, the training set's size, the step count."""
        trainer = self.trainer
        dataset = getattr(trainer.train_dataloader, "dataset", None)
        try:
            size = len(dataset) if dataset is not None else None
        except TypeError:  # an iterable dataset
            size = None
        total = trainer.estimated_stepping_batches
        self._total_steps = int(total) if isinstance(total, (int, float)) and math.isfinite(total) else None
        self.minimizer.setup(
            RuleSetup(
                net=self.net,
                optimizer=trainer.optimizers[0],
                params=self._params,
                dataset_size=size,
                total_steps=self._total_steps,
                task=type(self).__name__,
                sample_losses=self.supports_sample_losses,
                softmax_outputs=self.softmax_outputs,
                ascent=self.ascent,
                world_size=self._world_size(),
            )
        )
        self._bound_rule = self.minimizer

    def _step_context(self, opt: Any) -> StepContext | None:
        """What the rule learns about this step (None without a rule); binds a rule set since the last step."""
        rule = self.minimizer
        if rule is None:
            return None
        if self._bound_rule is not rule:
            self._bind_rule()
        per_replica = self._world_size() > 1 and self.ascent == "replica"
        return StepContext(
            step=self.global_step,
            epoch=self.current_epoch,
            total_steps=self._total_steps,
            lr=float(opt.optimizer.param_groups[0]["lr"]),
            lr_max=self._schedule_peak(),
            optimizer=opt.optimizer,
            params=self._params,
            reduce_mean=all_reduce_mean if per_replica else StepContext.reduce_mean,
            gather=self._gather if self._world_size() > 1 else StepContext.gather,
        )

    def _gather(self, tensor: Tensor) -> Tensor:
        """Every process's rows of ``tensor``, concatenated along dim 0 (equal shapes on every rank)."""
        return self.all_gather(tensor).reshape(-1, *tensor.shape[1:])

    def on_fit_start(self) -> None:
        self._lr_peak = None  # found at the first step, after a resume has restored the optimizer
        opt = self.trainer.optimizers[0]
        names = {id(p): n for n, p in self.named_parameters()}
        self._params = [p for group in opt.param_groups for p in group["params"]]
        self._names = [names.get(id(p), "") for p in self._params]
        self._bn_buffers = running_stat_buffers(self.net)
        self._bn_backup = [b.clone() for b in self._bn_buffers]

    # ------------------------------------------------------------------ the step
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One step: the direction d (one or two passes, as the rule decides), then one optimizer step with d."""
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        ctx = self._step_context(opt)
        parts = self._micro_batches(batch)
        if self.minimizer is not None and self.accumulate_ascent == "micro" and len(parts) > 1:
            logs, direction, batch_size = self._micro_ascent_step(opt, parts, ctx)
        else:
            logs, _, direction, batch_size = self._step_direction(opt, parts, ctx)
        loss = logs["loss"] if "loss" in logs else logs["loss_perturbed"]  # the latter for a one-pass MSAM
        scale = self._loss_scale()
        if not self._update_is_finite(loss, direction, scale):  # the step's one host sync
            self._refuse_update(opt, loss, scale)
        opt.step()  # also after a refused update, without gradients: Lightning counts every step
        if ctx is not None:
            self.minimizer.after_step(self._params, ctx)
        self._sync_lr_schedulers(epoch=self.current_epoch)
        self._record_step(logs, loss, batch_size)
        return loss

    def _record_step(self, logs: dict[str, Tensor], loss: Tensor, batch_size: int) -> None:
        """Add the step's values to the epoch means and log the progress-bar loss (and ``train_step/*``).

        The progress-bar loss is logged only when a progress bar shows it: ``self.log`` moves Lightning's
        whole result collection to the value's device at every call, about a millisecond per step on the
        CPU, which a run without a bar (studies, output redirected to a file) does not pay.
        """
        self._epoch_means("train").update(logs, batch_size)
        trainer = attached_trainer(self)
        if trainer is None or trainer.progress_bar_callback is not None:
            self.log("loss", loss, prog_bar=True, logger=False, on_step=True, on_epoch=False, batch_size=batch_size)
        if self.log_train_steps:
            self._log_every_step({f"train_step/{k}": v for k, v in logs.items()}, batch_size)

    def _log_every_step(self, values: dict[str, Tensor], batch_size: int) -> None:
        """Log ``train_step/*`` at every step, whatever ``Trainer(log_every_n_steps)`` says.

        Lightning writes ``self.log(on_step=True)`` values to the loggers only every ``log_every_n_steps``
        steps (50), so they go to the loggers directly (one host sync per step, only when asked) and to
        ``callback_metrics`` through ``self.log``.
        """
        self.log_dict(values, on_step=True, on_epoch=False, logger=False, batch_size=batch_size)
        if attached_trainer(self) is None or not self.trainer.is_global_zero or not self.loggers:
            return
        step = logging_step(self.trainer)  # the step Lightning's own logs use
        metrics = {k: float(v) for k, v in values.items()}
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)

    def _step_direction(
        self, opt: Any, parts: list[tuple[Any, float]], ctx: StepContext | None, *, micro: bool = False
    ) -> tuple[dict[str, Tensor], list[Tensor], list[Tensor], int]:
        """The step's passes over ``parts`` as the rule plans them: ``(logs, params, d, batch size)``.

        ``parts`` is the batch, or its micro-batches whose gradients accumulate (weighted by size) into
        one gradient per pass. ``micro``: one micro-batch of the per-micro-batch ascent (every pass without
        DDP sync, no averaging here: the caller averages the sum of the d). d is returned in the
        parameters' ``.grad`` tensors, where ``optimizer.step()`` reads it.
        """
        rule = self.minimizer
        plan = "two" if rule is None or ctx is None else rule.plan(ctx)
        if rule is not None and plan == "one":
            return self._one_pass_direction(parts, ctx, micro)
        rngs: list[dict[str, Any]] | None = [] if rule is not None and self.share_dropout_rng else None
        clean_losses: list[Tensor] | None = [] if rule is not None and rule.selects_data else None
        deferred: list[tuple[Tensor, Tensor]] | None = [] if plan == "decide" and self._metrics_at_w_eps() else None
        frozen = rule.frozen_in_pass_one(self._params, ctx) if rule is not None else None
        metrics = deferred if deferred is not None else not self._metrics_at_w_eps()
        with FrozenParameters(self._params, frozen):
            loss, batch_size = self._accumulated_pass(
                parts,
                1 if frozen is None else 3,
                rule is not None and self.ascent == "replica",
                rngs,
                metrics=metrics,
                losses=clean_losses,
            )
        params, grads, names = self._with_grads()
        scale = self._loss_scale()
        grad_norm = global_norm(grads)
        unscaled = grad_norm if scale is None else grad_norm / scale
        logs = {"loss": loss} if frozen is not None else {"loss": loss, "grad_norm": unscaled}
        if rule is None:
            return logs, params, grads, batch_size
        if plan == "decide" and not rule.second_pass(grads, unscaled**2, ctx):
            return self._first_pass_only(logs, params, grads, batch_size, ctx, deferred, micro)
        perturbed = self._perturbed_weights(opt, params, grads, names, grad_norm, scale)
        clean = grads if rule.uses_clean_grad else None
        del grads  # the other rules' pass 2 does not keep g
        opt.zero_grad(set_to_none=True)
        average = not micro and self.ascent == "replica" and rule.uses_clean_grad and self._world_size() > 1
        with perturbed:  # w + ε; w and the BatchNorm statistics restored on exit, also when pass 2 raises
            if clean_losses is not None:
                parts = self._selected_parts(parts, clean_losses)
            logs["loss_perturbed"], _ = self._accumulated_pass(
                parts, 2, micro or average, rngs, metrics=self._metrics_at_w_eps()
            )
        if frozen is not None:  # every parameter has its pass-2 gradient, the frozen ones included
            params = self._with_grads()[0]
        direction = self._write_descent_direction(params, clean, ctx)
        del clean
        if average:  # GSAM's d formed on each replica from its own g, then averaged
            with torch.no_grad():
                all_reduce_mean(direction)
        return logs, params, direction, batch_size

    def _first_pass_only(
        self,
        logs: dict[str, Tensor],
        params: list[Tensor],
        grads: list[Tensor],
        batch_size: int,
        ctx: StepContext,
        deferred: list[tuple[Tensor, Tensor]] | None,
        micro: bool,
    ) -> tuple[dict[str, Tensor], list[Tensor], list[Tensor], int]:
        """The rule decided against pass 2 after pass 1 (AE-SAM): d from g alone (all-reduced if pass 1 was not)."""
        for output, target in deferred or ():
            self.update_metrics("train", output, target)
        with torch.no_grad():
            if not micro and self.ascent == "replica" and self._world_size() > 1:
                all_reduce_mean(grads)  # pass 1 ran without the DDP all-reduce, for an ascent that did not come
            direction = self.minimizer.one_pass_descent_(params, grads, ctx)
        return logs, params, direction, batch_size

    def _one_pass_direction(
        self, parts: list[tuple[Any, float]], ctx: StepContext, micro: bool
    ) -> tuple[dict[str, Tensor], list[Tensor], list[Tensor], int]:
        """A one-pass step: the gradient at w (plus the rule's extra loss) or at w + offset (Momentum-SAM)."""
        rule = self.minimizer
        with torch.no_grad():
            offset = rule.evaluation_offset(self._params, ctx)
        if offset is not None:
            return self._offset_direction(parts, ctx, micro, offset)
        active = rule.extra_loss_active(ctx)
        loss, batch_size = self._accumulated_pass(
            parts, 3 if active else 1, micro, None, metrics=True, extra=rule if rule.uses_outputs else None, ctx=ctx
        )
        params, grads, _ = self._with_grads()
        logs = {"loss": loss}
        if not active:
            scale = self._loss_scale()
            logs["grad_norm"] = global_norm(grads) if scale is None else global_norm(grads) / scale
        with torch.no_grad():
            direction = rule.one_pass_descent_(params, grads, ctx)
        return logs, params, direction, batch_size

    def _offset_direction(
        self, parts: list[tuple[Any, float]], ctx: StepContext, micro: bool, offset: list[Tensor]
    ) -> tuple[dict[str, Tensor], list[Tensor], list[Tensor], int]:
        """Momentum-SAM's step: d = ∇L_B(w + offset), the weights at w + offset only inside that pass.

        With the rule's ``clean_loss`` one forward pass at w (no gradient) first gives ``loss`` and the
        BatchNorm statistics, which the pass at w + offset then leaves as they were.
        """
        rule = self.minimizer
        logs: dict[str, Tensor] = {}
        if rule.clean_loss:
            logs["loss"] = self._forward_only(parts, metrics=not self._metrics_at_w_eps())
        params = self._params
        buffers = (self._bn_buffers, self._bn_backup) if rule.clean_loss else ((), ())
        with PerturbedWeights(params, offset, self._scratch_buffers("_backup", params), *buffers):
            logs["loss_perturbed"], batch_size = self._accumulated_pass(
                parts, 2, micro, None, metrics=self._metrics_at_w_eps()
            )
        params, grads, _ = self._with_grads()
        return logs, params, grads, batch_size

    def _metrics_at_w_eps(self) -> bool:
        """Whether the training metrics come from the perturbed pass (``train_metrics_at="perturbed"`` with a rule)."""
        return self.train_metrics_at == "perturbed" and self.minimizer is not None

    def _perturbed_weights(
        self,
        opt: Any,
        params: list[Tensor],
        grads: list[Tensor],
        names: list[str],
        grad_norm: Tensor,
        scale: Tensor | None,
    ) -> PerturbedWeights:
        """The ascent ε = rule.perturbation(w, g), as the context manager that puts the weights at w + ε."""
        rule = self.minimizer
        assert rule is not None
        with torch.no_grad():
            eps = rule.perturbation(
                params,
                grads,
                names=names if rule.uses_names else None,
                grad_norm=grad_norm,
                lr=float(opt.optimizer.param_groups[0]["lr"]),
                lr_max=self._schedule_peak(),
            )
            if scale is not None and not rule.scale_invariant:
                torch._foreach_div_(eps, scale)  # ε from the unscaled gradient
        return PerturbedWeights(
            params, eps, self._scratch_buffers("_backup", params), self._bn_buffers, self._bn_backup
        )

    def _write_descent_direction(
        self, params: list[Tensor], clean: list[Tensor] | None, ctx: StepContext | None
    ) -> list[Tensor]:
        """Overwrite the pass-2 gradients g_p in ``.grad`` with the descent direction d; return the ``.grad`` tensors.

        d = g_p, except for rules whose descent uses the clean gradient g (GSAM): their ``descent_(g, g_p)``
        overwrites its second argument in place, here the ``.grad`` tensors themselves, and returns it.
        Such a rule first sees g and g_p (``after_second_pass``: LookSAM keeps its g_v).
        """
        with torch.no_grad():
            grads_p = grads_or_zeros(params)  # g_p = 0 for a parameter that pass 2 did not use
            if clean is None:
                return grads_p
            if ctx is not None:
                self.minimizer.after_second_pass(params, clean, grads_p, ctx)
            return self.minimizer.descent_(clean, grads_p)

    def _selected_parts(self, parts: list[tuple[Any, float]], clean_losses: list[Tensor]) -> list[tuple[Any, float]]:
        """ESAM's data selection: each part cut to the samples the rule picks from their losses at w and at w + ε.

        One forward pass without gradient at w + ε per part (the BatchNorm statistics it moves are restored
        with the weights).
        """
        selected = []
        with torch.no_grad():
            for (part, weight), before in zip(parts, clean_losses):
                _, output, target, _ = self.forward_loss(part, "train")
                index = self.minimizer.select(before, self.sample_losses(output, target))
                selected.append((self.select_batch(part, index), weight))
        return selected

    def _forward_only(self, parts: list[tuple[Any, float]], metrics: bool) -> Tensor:
        """The weighted training loss of ``parts`` at the current weights, without gradient (train mode)."""
        total: Tensor | None = None
        last = len(parts) - 1
        with torch.no_grad():
            for part, weight in parts:
                loss, output, target, _ = self.forward_loss(part, "train")
                if metrics:
                    self.update_metrics("train", output, target)
                weighted = loss if last == 0 else loss * weight
                total = weighted if total is None else total + weighted
        assert total is not None
        return total.detach()

    def _accumulated_pass(
        self,
        parts: list[tuple[Any, float]],
        index: int,
        block_sync: bool,
        rngs: list[dict[str, Any]] | None,
        *,
        metrics: bool | list[tuple[Tensor, Tensor]],
        losses: list[Tensor] | None = None,
        extra: Minimizer | None = None,
        ctx: StepContext | None = None,
    ) -> tuple[Tensor, int]:
        """Forward-backward of each part, gradients summed in ``.grad`` with the parts' weights.

        Returns the weighted loss (detached) and the total batch size. ``pass_index`` is ``index``
        during the backward that completes the pass's gradient, ``-index`` during earlier micro-batches,
        and 0 again when the pass returns or raises. Under DDP the gradients are all-reduced once, at the
        last part, unless ``block_sync``. With ``rngs`` (shared dropout masks) pass 1 records the RNG state
        before each part and pass 2 replays it. ``metrics``: update the training metrics with the outputs
        (True), or keep the outputs in this list for later. ``losses``: collect each part's per-sample
        losses. ``extra``: a rule whose ``extra_loss`` is added to the loss that is differentiated (not to
        the loss returned).
        """
        total: Tensor | None = None
        batch_size = 0
        last = len(parts) - 1
        try:
            for i, (part, weight) in enumerate(parts):
                if rngs is not None and index == 1:
                    rngs.append(rng_state())
                elif rngs is not None:
                    set_rng_state(rngs[i])
                self.pass_index = index if i == last else -index
                with self._no_sync(block_sync or i < last):
                    loss, output, target, size = self.forward_loss(part, "train")
                    objective = loss if extra is None else self._with_extra_loss(loss, output, part, extra, ctx)
                    self.manual_backward(objective if last == 0 else objective * weight)
                if isinstance(metrics, list):
                    metrics.append((output.detach(), target))
                elif metrics:
                    self.update_metrics("train", output.detach(), target)
                if losses is not None:
                    losses.append(self.sample_losses(output.detach(), target))
                loss = loss.detach() if last == 0 else loss.detach() * weight
                total = loss if total is None else total + loss
                batch_size += size
        finally:
            self.pass_index = 0
        assert total is not None
        return total, batch_size

    def _with_extra_loss(
        self, loss: Tensor, output: Tensor, part: Any, rule: Minimizer, ctx: StepContext | None
    ) -> Tensor:
        """The loss plus the rule's extra term for this part (SAF, MESA), if it adds one in this step."""
        term = rule.extra_loss(output, self.sample_ids(part), self.net_inputs(part), ctx or StepContext())
        return loss if term is None else loss + term

    def _micro_ascent_step(
        self, opt: Any, parts: list[tuple[Any, float]], ctx: StepContext | None
    ) -> tuple[dict[str, Tensor], list[Tensor], int]:
        """The ascent per micro-batch: d = Σᵢ wᵢ·dᵢ, each dᵢ a whole two-pass direction of micro-batch i.

        m-sharpness with m the micro-batch size (as DDP's per-replica ascent): εᵢ from the micro-batch's
        own gradient gᵢ. The logs are the weighted means over micro-batches (``grad_norm``: of the ‖gᵢ‖).
        """
        acc: list[Tensor] = []
        key: tuple[int, ...] = ()
        logs: dict[str, Tensor] = {}
        batch_size = 0
        for part, weight in parts:
            opt.zero_grad(set_to_none=True)
            part_logs, params, direction, size = self._step_direction(opt, [(part, 1.0)], ctx, micro=True)
            if not acc:
                key = tuple(map(id, params))
                acc = self._scratch_buffers("_accumulated", params)
                torch._foreach_zero_(acc)
            elif tuple(map(id, params)) != key:
                raise RuntimeError(
                    "accumulate_ascent='micro' needs every micro-batch to give gradients to the same parameters; "
                    "use accumulate_ascent='accumulated'"
                )
            torch._foreach_add_(acc, direction, alpha=weight)
            logs = {k: v * weight + logs[k] if k in logs else v * weight for k, v in part_logs.items()}
            batch_size += size
        torch._foreach_copy_(direction, acc)  # the last micro-batch's .grad tensors hold d
        if self._world_size() > 1:
            all_reduce_mean(direction)
        return logs, direction, batch_size

    def _micro_batches(self, batch: Any) -> list[tuple[Any, float]]:
        """The batch as ``accumulate_grad_batches`` micro-batches with weights nᵢ/N (the batch alone when 1)."""
        k = self.accumulate_grad_batches
        if k == 1:
            return [(batch, 1.0)]
        n = leading_size(batch, k)
        k = min(k, n)
        sizes = split_sizes(n, k)
        return [(part, size / n) for part, size in zip(self.split_batch(batch, k), sizes)]

    def split_batch(self, batch: Any, k: int) -> list[Any]:
        """Split a training batch into ``k`` micro-batches along the first dimension of its tensors.

        Handles tensors and (named) tuples, lists and dicts of them; override for other batch types.
        """
        return split(batch, k)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip the final direction d (after AMP unscaling), never the ascent."""
        if self.gradient_clip_val is not None:
            self.clip_gradients(
                optimizer,
                gradient_clip_val=self.gradient_clip_val,
                gradient_clip_algorithm=self.gradient_clip_algorithm,
            )

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")
        if self.skipped_steps:
            self.log("train/skipped_steps", float(self.skipped_steps), on_step=False, on_epoch=True)
        self._sync_lr_schedulers(epoch=self.current_epoch + 1)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def on_validation_epoch_end(self) -> None:
        logged = self._log_epoch("val")
        if self.trainer.sanity_checking or self.trainer.state.fn != "fit":
            return
        for config in self.trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, ReduceLROnPlateau):
                monitor = self.lr_scheduler_monitor
                value = logged.get(monitor, self.trainer.callback_metrics.get(monitor))
                if value is None:
                    raise ValueError(
                        f"Invalid lr_scheduler_monitor: {monitor!r} was not logged; logged metrics: "
                        f"{sorted(set(logged) | set(self.trainer.callback_metrics))}"
                    )
                config.scheduler.step(float(value))

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test")

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["flatminima"] = {"rng": rng_state(), "skipped_steps": self.skipped_steps}
        if self.minimizer is not None:
            checkpoint["flatminima"]["minimizer"] = self.minimizer.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("flatminima")
        if state is None:
            return
        self.skipped_steps = state.get("skipped_steps", 0)
        if self.minimizer is not None and state.get("minimizer"):
            self.minimizer.load_state_dict(state["minimizer"])
            self._bound_rule = None  # bound again (to the restored state) when training starts
        if attached_trainer(self) is not None and "rng" in state:
            set_rng_state(state["rng"])

    # ------------------------------------------------------------------ helpers
    def _eval_step(self, batch: Any, stage: str) -> Tensor:
        loss, output, target, batch_size = self.forward_loss(batch, stage)
        self._epoch_means(stage).update({"loss": loss}, batch_size)
        self.update_metrics(stage, output, target)
        return loss

    def _epoch_means(self, stage: str) -> EpochMeans:
        """The stage's batch-size-weighted epoch means of its step values (``loss``, ...), on this module's device."""
        means = self._means[stage]
        if means.device != self.device:
            means.to(self.device)
        return means

    def _log_epoch(self, stage: str) -> dict[str, Tensor]:
        """Log the stage's epoch means (weighted by batch size, over all ranks) and its metrics; return them."""
        distributed = self._world_size() > 1
        means = self._epoch_means(stage)
        keep = self.dtype == torch.float64  # float64 runs keep 1e65 finite
        logged = {f"{stage}/{key}": mean if keep else mean.float() for key, mean in means.compute().items()}
        means.reset()
        for name, metric in self.stage_metrics(stage).items():
            if metric.update_called:
                logged[f"{stage}/{name}"] = metric.compute()
            metric.reset()
        for key, value in logged.items():
            self.log(key, value, on_step=False, on_epoch=True, sync_dist=distributed, prog_bar=key == "val/loss")
        return logged

    def _with_grads(self) -> tuple[list[Tensor], list[Tensor], list[str]]:
        params, names = self._params, self._names
        grads = [p.grad for p in params]
        if any(g is None for g in grads):
            keep = [i for i, g in enumerate(grads) if g is not None]
            params, names, grads = [params[i] for i in keep], [names[i] for i in keep], [grads[i] for i in keep]
        return params, grads, names

    def _scratch_buffers(self, name: str, params: list[Tensor]) -> list[Tensor]:
        """Per-step scratch tensors shaped like ``params`` (``_backup``, ``_accumulated``), kept while they match."""
        key = tuple(map(id, params))
        cached = self._scratch.get(name)
        if cached is None or cached[0] != key:
            cached = self._scratch[name] = (key, [torch.empty_like(p) for p in params])
        return cached[1]

    def _no_sync(self, block: bool) -> contextlib.AbstractContextManager:
        strategy = self.trainer.strategy
        if block and hasattr(strategy, "block_backward_sync"):
            return strategy.block_backward_sync()
        return contextlib.nullcontext()

    def _schedule_peak(self) -> float:
        """The peak lr of the first param group over the run (cached per fit; Python floats only)."""
        if self._lr_peak is None:
            configs = self.trainer.lr_scheduler_configs if attached_trainer(self) is not None else []
            self._lr_peak = schedule_peak_lr(self.trainer.optimizers[0], [c.scheduler for c in configs])
        return self._lr_peak

    def _world_size(self) -> int:
        return self.trainer.world_size if attached_trainer(self) is not None else 1

    def _loss_scale(self) -> Tensor | None:
        return loss_scale(self.trainer)

    def _update_is_finite(self, loss: Tensor, direction: list[Tensor], scale: Tensor | None) -> bool:
        """Is the loss (and, without loss scaling, d) finite on every rank? One host sync; none with "ignore".

        Under AMP loss scaling the scaler checks d itself (and skips a non-finite one, lowering the scale).
        """
        if self.on_nonfinite == "ignore":
            return True
        finite = torch.isfinite(loss.detach())
        if scale is None and direction:
            finite = finite & torch.isfinite(global_norm(direction))
        ok = bool(finite)
        if self._world_size() > 1:
            ok = not self.trainer.strategy.reduce_boolean_decision(not ok, all=False)
        return ok

    def _refuse_update(self, opt: Any, loss: Tensor, scale: Tensor | None) -> None:
        """A non-finite step, by ``on_nonfinite``: raise, or drop d and count it (warn; ``"stop"`` ends the run).

        Dropping d (``.grad`` set to None) makes the ``optimizer.step()`` that follows leave every parameter and
        its optimizer state as they are; under AMP loss scaling the scaler skips the non-finite d itself.
        """
        where = f"epoch {self.current_epoch}, step {self.global_step}, batch loss {float(loss.detach()):.6g}"
        if self.on_nonfinite == "raise":
            raise FloatingPointError(
                f"Non-finite training loss or gradient at {where}: training diverged. The weights are those "
                "before this step. Lower the learning rate or rho, clip gradients (gradient_clip_val), or set "
                "on_nonfinite='skip' to skip such steps or 'stop' to end the run cleanly."
            )
        self.skipped_steps += 1
        if scale is None:
            opt.zero_grad(set_to_none=True)  # the base optimizer skips parameters without gradient
        if self.on_nonfinite == "stop":
            rank_zero_warn(f"Non-finite training loss or gradient at {where}: stopping the run (on_nonfinite='stop').")
            self.trainer.should_stop = True
        else:
            rank_zero_warn(f"Non-finite training loss or gradient at {where}: update skipped (on_nonfinite='skip').")

    def _sync_lr_schedulers(self, epoch: int) -> None:
        """Step every scheduler up to its counter: the optimizer steps taken, or ``epoch`` epochs.

        Called after each optimizer step and at each epoch end; on resume Lightning replays the
        epoch-end hooks of a checkpoint written at validation end, so the count stays exact.
        """
        if attached_trainer(self) is None:
            return
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, ReduceLROnPlateau):
                continue
            count = self.trainer.global_step if config.interval == "step" else epoch
            target = count // max(config.frequency, 1)
            while scheduler.last_epoch < target:
                scheduler.step()


_OBJECT_ARGS = ("net", "optimizer", "minimizer", "lr_scheduler")


_CHOICES: dict[str, tuple[str, ...]] = {
    "lr_scheduler_interval": ("epoch", "step"),
    "ascent": ("replica", "global"),
    "gradient_clip_algorithm": ("norm", "value"),
    "on_nonfinite": ("raise", "stop", "skip", "ignore"),
    "accumulate_ascent": ("accumulated", "micro"),
    "train_metrics_at": ("clean", "perturbed"),
}


def _check_arguments(
    net: Any, optimizer: Any, minimizer: Any, accumulate_grad_batches: Any, gradient_clip_val: Any, **choices: str
) -> tuple[int, float | None]:
    """Refuse a bad :class:`TwoPassModule` argument in one line naming it (the ``choices`` by ``_CHOICES``).

    Returns ``accumulate_grad_batches`` and ``gradient_clip_val`` as plain Python numbers.
    """
    if not isinstance(net, nn.Module):
        raise TypeError(f"Invalid net: {type(net).__name__}; expected a torch.nn.Module")
    if not callable(optimizer):
        raise TypeError(f"Invalid optimizer: {optimizer!r}; expected a callable that takes the parameters")
    if minimizer is not None and not isinstance(minimizer, Minimizer):
        raise TypeError(
            f"Invalid minimizer: {type(minimizer).__name__}; expected a flatminima.lightning_modules.minimizers.Minimizer "
            "(SAM, USAM, ASAM, GSAM, AdaptiveGSAM, LookSAM, EveryK, RandomSteps, AdaptiveSteps, MomentumSAM, ESAM, "
            "SAF, MESA) or None"
        )
    for name, value in choices.items():
        check_choice(name, value, _CHOICES[name])
    return (
        check_int("accumulate_grad_batches", accumulate_grad_batches, 1),
        check_float("gradient_clip_val", gradient_clip_val, minimum=0.0, strict=True, optional=True),
    )


def schedule_peak_lr(optimizer: torch.optim.Optimizer, schedulers: list[Any]) -> float:
    """The highest lr the first param group reaches under ``schedulers``, where it can be known.

    OneCycleLR and CyclicLR: their ``max_lr``; SequentialLR: the highest of its schedulers' peaks; any
    other scheduler (and no scheduler): the initial lr, which warmups such as LinearLR climb back to (a
    LambdaLR whose factor exceeds 1 goes above it: GSAM then clamps and warns).
    """
    group = optimizer.param_groups[0]
    initial = float(group.get("initial_lr", group["lr"]))
    peaks = [_scheduler_peak(s, initial) for s in schedulers]
    return max([initial] + [p for p in peaks if p is not None])


def _scheduler_peak(scheduler: Any, initial: float) -> float | None:
    sched = torch.optim.lr_scheduler
    if isinstance(scheduler, sched.OneCycleLR):
        return float(scheduler.optimizer.param_groups[0]["max_lr"])
    if isinstance(scheduler, sched.CyclicLR):
        return float(scheduler.max_lrs[0])
    if isinstance(scheduler, sched.SequentialLR):
        peaks = [_scheduler_peak(s, initial) for s in sequential_schedulers(scheduler)]
        return max(initial if p is None else p for p in peaks)
    return None
