"""The two-pass SAM-family step, written once (manual optimization); tasks subclass it."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torchmetrics
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.optim.lr_scheduler import ReduceLROnPlateau

from .minimizers import Minimizer, global_norm

NonFinitePolicy = Literal["raise", "stop", "skip", "ignore"]


class TwoPassModule(pl.LightningModule):
    """Base LightningModule that trains ``net`` with a SAM-family rule on top of any base optimizer.

    One training step (DESIGN.md §3), manual optimization::

        pass 1: g = ∇L_B(w)                 (logged: train/loss, train/grad_norm = ‖g‖₂)
                ε = minimizer.perturbation(w, g);  w ← w + ε   (a backup of w is kept)
        pass 2: g_p = ∇L_B(w + ε)           (logged: train/loss_perturbed; BatchNorm stats restored)
                w ← backup (exact copy);  d = minimizer.descent(g, g_p)
                optimizer.step() with gradient d   (exactly once per batch)

    ``minimizer=None`` trains with the base optimizer alone: one forward-backward pass, same module.

    Under DDP, ``ascent="replica"`` (default, the SAM paper's m-sharpness) computes ε from each
    replica's own sub-batch gradient (pass 1 without gradient all-reduce) and averages the final
    directions; rules whose descent uses g (GSAM) form d on each replica before averaging it.
    ``ascent="global"`` takes ε from the all-reduced gradient instead.

    Rules whose radius follows the lr (GSAM with ``rho_min``) get the lr of this step and the peak of
    the schedule (:func:`schedule_peak_lr`), both of the optimizer's first param group.

    During a step ``self.pass_index`` is 1 in pass 1 and 2 in pass 2 (0 outside), for callbacks
    that read gradients in ``on_after_backward`` (the pass-1 gradient is the clean one). With gradient
    accumulation it is 1 (2) during the backward that completes the pass's gradient and -1 (-2) during
    the micro-batches before it, whose gradient is still partial.

    Subclasses implement :meth:`forward_loss` (and may override :meth:`update_metrics`).

    Args:
        net: The network (a plain ``nn.Module``).
        optimizer: Base optimizer factory, called with the parameters (any ``torch.optim`` class).
        minimizer: The SAM-family rule; None for the base optimizer alone.
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
            both are the same.
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
        if not isinstance(net, nn.Module):
            raise TypeError(f"Invalid net: {type(net).__name__}; expected a torch.nn.Module")
        if not callable(optimizer):
            raise TypeError(f"Invalid optimizer: {optimizer!r}; expected a callable that takes the parameters")
        if minimizer is not None and not isinstance(minimizer, Minimizer):
            raise TypeError(
                f"Invalid minimizer: {type(minimizer).__name__}; expected a lightning_modules.minimizers.Minimizer "
                "(SAM, USAM, ASAM, GSAM, AdaptiveGSAM) or None"
            )
        _choice("lr_scheduler_interval", lr_scheduler_interval, ("epoch", "step"))
        _choice("ascent", ascent, ("replica", "global"))
        _choice("gradient_clip_algorithm", gradient_clip_algorithm, ("norm", "value"))
        _choice("on_nonfinite", on_nonfinite, ("raise", "stop", "skip", "ignore"))
        _choice("accumulate_ascent", accumulate_ascent, ("accumulated", "micro"))
        _choice("train_metrics_at", train_metrics_at, ("clean", "perturbed"))
        if isinstance(accumulate_grad_batches, bool) or not isinstance(accumulate_grad_batches, int) \
                or accumulate_grad_batches < 1:
            raise ValueError(f"Invalid accumulate_grad_batches: {accumulate_grad_batches!r}; expected an integer >= 1")
        if gradient_clip_val is not None and not (math.isfinite(gradient_clip_val) and gradient_clip_val > 0):
            raise ValueError(f"Invalid gradient_clip_val: {gradient_clip_val!r}; expected None or a finite value > 0")
        # Under LightningCLI the hparams are the parsed config (net and optimizer as class paths), so
        # load_from_checkpoint rebuilds everything. Python-built objects would make checkpoints
        # unloadable with torch.load(weights_only=True): keep them out; pass net= to load_from_checkpoint.
        self.save_hyperparameters(ignore=None if _launched_by_cli() else list(_OBJECT_ARGS))
        self.net = net
        self.optimizer_factory = optimizer
        self.minimizer = minimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.lr_scheduler_monitor = lr_scheduler_monitor
        self.ascent = ascent
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.on_nonfinite = on_nonfinite
        self.share_dropout_rng = share_dropout_rng
        self.log_train_steps = log_train_steps
        self.accumulate_grad_batches = accumulate_grad_batches
        self.accumulate_ascent = accumulate_ascent
        self.train_metrics_at = train_metrics_at
        self.automatic_optimization = False
        self.pass_index = 0
        self.skipped_steps = 0
        self._params: list[Tensor] = []
        self._names: list[str] = []
        self._scratch: dict[str, tuple[tuple[int, ...], list[Tensor]]] = {}
        self._bn_buffers: list[Tensor] = []
        self._bn_backup: list[Tensor] = []
        self._sums: dict[str, tuple[tuple[str, ...], Tensor]] = {}
        self._lr_peak: float | None = None

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

    def epoch_metric_names(self, stage: str) -> set[str]:
        """The epoch-level keys this module logs for ``stage`` (``train/loss``, ``train/acc``, ...).

        Callbacks check the metrics they monitor against it before training (LossThresholdCheckpoint).
        A subclass that logs more at the end of an epoch extends it.
        """
        keys = {"loss", *self.stage_metrics(stage)}
        if stage == "train":
            keys |= {"grad_norm"} | ({"loss_perturbed"} if self.minimizer is not None else set())
        return {f"{stage}/{key}" for key in keys}

    # ------------------------------------------------------------------ optimizers
    def configure_optimizers(self) -> Any:
        """Build the base optimizer (and the lr scheduler, which this module steps itself)."""
        optimizer = self.optimizer_factory(self.parameters())
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Invalid optimizer: the factory returned {type(optimizer).__name__}, not a torch Optimizer")
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)  # stepped by this module, ReduceLROnPlateau included
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.lr_scheduler_interval}}

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
        """Refuse strategies whose parameters are sharded (the rules need whole local tensors)."""
        strategy = type(self.trainer.strategy).__name__
        if "FSDP" in strategy or "DeepSpeed" in strategy or "ModelParallel" in strategy:
            raise ValueError(
                f"Invalid strategy: {strategy}; the two-pass step supports single-device and DDP strategies "
                "(ddp, ddp_spawn, ddp_find_unused_parameters_true)"
            )

    def on_fit_start(self) -> None:
        self._lr_peak = None  # found at the first step, after a resume has restored the optimizer
        opt = self.trainer.optimizers[0]
        names = {id(p): n for n, p in self.named_parameters()}
        self._params = [p for group in opt.param_groups for p in group["params"]]
        self._names = [names.get(id(p), "") for p in self._params]
        self._bn_buffers = [
            b
            for m in self.net.modules()
            if isinstance(m, _NormBase) and m.track_running_stats
            for b in (m.running_mean, m.running_var, m.num_batches_tracked)
            if b is not None
        ]
        self._bn_backup = [b.clone() for b in self._bn_buffers]

    # ------------------------------------------------------------------ the step
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        parts = self._micro_batches(batch)
        if self.minimizer is not None and self.accumulate_ascent == "micro" and len(parts) > 1:
            logs, final, batch_size = self._micro_ascent_step(opt, parts)
        else:
            logs, _, final, batch_size = self._step_direction(opt, parts)
        self.pass_index = 0

        self._check_finite(logs["loss"], final, self._loss_scale(), opt)
        opt.step()
        self._sync_lr_schedulers(epoch=self.current_epoch)
        self._accumulate("train", logs, batch_size)
        self.log("loss", logs["loss"], prog_bar=True, logger=False, on_step=True, on_epoch=False, batch_size=batch_size)
        if self.log_train_steps:
            self._log_every_step({f"train_step/{k}": v for k, v in logs.items()}, batch_size)
        return logs["loss"]

    def _log_every_step(self, values: dict[str, Tensor], batch_size: int) -> None:
        """Log ``train_step/*`` at every step, whatever ``Trainer(log_every_n_steps)`` says.

        Lightning writes ``self.log(on_step=True)`` values to the loggers only every ``log_every_n_steps``
        steps (50), so they go to the loggers directly (one host sync per step, only when asked) and to
        ``callback_metrics`` through ``self.log``.
        """
        self.log_dict(values, on_step=True, on_epoch=False, logger=False, batch_size=batch_size)
        if self._trainer is None or not self.trainer.is_global_zero or not self.loggers:
            return
        step = self.trainer.fit_loop.epoch_loop._batches_that_stepped  # the step Lightning's own logs use
        metrics = {k: float(v) for k, v in values.items()}
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)

    def _step_direction(self, opt: Any, parts: list[tuple[Any, float]], *,
                        micro: bool = False) -> tuple[dict[str, Tensor], list[Tensor], list[Tensor], int]:
        """Pass 1 (and, with a rule, the ascent and pass 2) over ``parts``: ``(logs, params, d, batch size)``.

        ``parts`` is the batch, or its micro-batches whose gradients accumulate (weighted by size) into
        one clean gradient g and one perturbed gradient g_p. ``micro``: one micro-batch of the per-micro-
        batch ascent (pass 2 without DDP sync, no averaging here: the caller averages the sum of the d).
        """
        rule = self.minimizer
        rngs: list[dict[str, Any]] | None = [] if rule is not None and self.share_dropout_rng else None
        loss, batch_size = self._accumulated_pass(parts, 1, rule is not None and self.ascent == "replica", rngs)
        params, grads, names = self._with_grads()
        scale = self._loss_scale()
        grad_norm = global_norm(grads)
        logs = {"loss": loss, "grad_norm": grad_norm if scale is None else grad_norm / scale}
        if rule is None:
            return logs, params, grads, batch_size
        with torch.no_grad():
            eps = rule.perturbation(
                params, grads, names=names if rule.uses_names else None, grad_norm=grad_norm,
                lr=float(opt.optimizer.param_groups[0]["lr"]), lr_max=self._schedule_peak(),
            )
            if scale is not None and not rule.scale_invariant:
                torch._foreach_div_(eps, scale)
            backup = self._scratch_buffers("_backup", params)
            torch._foreach_copy_(backup, params)
            torch._foreach_add_(params, eps)
            del eps
            if self._bn_buffers:
                torch._foreach_copy_(self._bn_backup, self._bn_buffers)
        clean = grads if rule.uses_clean_grad else None
        del grads
        opt.zero_grad(set_to_none=True)
        manual_average = not micro and self.ascent == "replica" and rule.uses_clean_grad and self._world_size() > 1
        try:
            logs["loss_perturbed"], _ = self._accumulated_pass(parts, 2, micro or manual_average, rngs)
        finally:  # also when pass 2 raises (out of memory, ...): never leave the weights at w + ε
            with torch.no_grad():
                if self._bn_buffers:
                    torch._foreach_copy_(self._bn_buffers, self._bn_backup)
                torch._foreach_copy_(params, backup)
            self.pass_index = 0
        with torch.no_grad():
            grads_p = self._perturbed_grads(params)
            if clean is not None:
                rule.descent(clean, grads_p)
                del clean
            if manual_average:
                _all_reduce_mean(grads_p)
        return logs, params, grads_p, batch_size

    def _accumulated_pass(self, parts: list[tuple[Any, float]], index: int, block_sync: bool,
                          rngs: list[dict[str, Any]] | None) -> tuple[Tensor, int]:
        """Forward-backward of each part, gradients summed in ``.grad`` with the parts' weights.

        Returns the weighted loss (detached) and the total batch size. ``pass_index`` is ``index``
        during the backward that completes the pass's gradient, ``-index`` during earlier micro-batches.
        Under DDP the gradients are all-reduced once, at the last part, unless ``block_sync``. With
        ``rngs`` (shared dropout masks) pass 1 records the RNG state before each part and pass 2 replays it.
        """
        total: Tensor | None = None
        batch_size = 0
        last = len(parts) - 1
        for i, (part, weight) in enumerate(parts):
            if rngs is not None and index == 1:
                rngs.append(_rng_state())
            elif rngs is not None:
                _set_rng_state(rngs[i])
            self.pass_index = index if i == last else -index
            with self._no_sync(block_sync or i < last):
                loss, output, target, size = self.forward_loss(part, "train")
                self.manual_backward(loss if last == 0 else loss * weight)
            if index == (2 if self.train_metrics_at == "perturbed" and self.minimizer is not None else 1):
                self.update_metrics("train", output.detach(), target)
            loss = loss.detach() if last == 0 else loss.detach() * weight
            total = loss if total is None else total + loss
            batch_size += size
        assert total is not None
        return total, batch_size

    def _micro_ascent_step(self, opt: Any,
                           parts: list[tuple[Any, float]]) -> tuple[dict[str, Tensor], list[Tensor], int]:
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
            part_logs, params, final, size = self._step_direction(opt, [(part, 1.0)], micro=True)
            if not acc:
                key = tuple(map(id, params))
                acc = self._scratch_buffers("_accumulated", params)
                torch._foreach_zero_(acc)
            elif tuple(map(id, params)) != key:
                raise RuntimeError(
                    "accumulate_ascent='micro' needs every micro-batch to give gradients to the same parameters; "
                    "use accumulate_ascent='accumulated'"
                )
            torch._foreach_add_(acc, final, alpha=weight)
            logs = {k: v * weight + logs[k] if k in logs else v * weight for k, v in part_logs.items()}
            batch_size += size
        torch._foreach_copy_(final, acc)  # the last micro-batch's .grad tensors hold d
        if self._world_size() > 1:
            _all_reduce_mean(final)
        return logs, final, batch_size

    def _micro_batches(self, batch: Any) -> list[tuple[Any, float]]:
        """The batch as ``accumulate_grad_batches`` micro-batches with weights nᵢ/N (the batch alone when 1)."""
        k = self.accumulate_grad_batches
        if k == 1:
            return [(batch, 1.0)]
        n = _leading_size(batch, k)
        k = min(k, n)
        sizes = [n // k + (i < n % k) for i in range(k)]  # torch.tensor_split's chunk sizes
        return [(part, size / n) for part, size in zip(self.split_batch(batch, k), sizes)]

    def split_batch(self, batch: Any, k: int) -> list[Any]:
        """Split a training batch into ``k`` micro-batches along the first dimension of its tensors.

        Handles tensors and (named) tuples, lists and dicts of them; override for other batch types.
        """
        return _split(batch, k)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip the final direction d (after AMP unscaling), never the ascent."""
        if self.gradient_clip_val is not None:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm=self.gradient_clip_algorithm
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
        checkpoint["flatminima"] = {"rng": _rng_state(), "skipped_steps": self.skipped_steps}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("flatminima")
        if state is None:
            return
        self.skipped_steps = state.get("skipped_steps", 0)
        if self._trainer is not None and "rng" in state:
            _set_rng_state(state["rng"])

    # ------------------------------------------------------------------ helpers
    def _eval_step(self, batch: Any, stage: str) -> Tensor:
        loss, output, target, batch_size = self.forward_loss(batch, stage)
        self._accumulate(stage, {"loss": loss}, batch_size)
        self.update_metrics(stage, output, target)
        return loss

    def _accumulate(self, stage: str, values: dict[str, Tensor], batch_size: int) -> None:
        """Add batch-size-weighted values to the stage's running sums, on the device (no host sync)."""
        keys = tuple(values)
        sums = self._sums.get(stage)
        if sums is None or sums[0] != keys:
            sums = self._sums[stage] = (keys, torch.zeros(len(keys) + 1, dtype=torch.float64, device=self.device))
        row = torch.stack([v.detach().to(torch.float64) for v in values.values()]) * batch_size
        sums[1][:-1] += row
        sums[1][-1] += batch_size

    def _log_epoch(self, stage: str) -> dict[str, Tensor]:
        """Log the stage's epoch means (weighted by batch size, over all ranks) and its metrics; return them."""
        distributed = self._world_size() > 1
        logged: dict[str, Tensor] = {}
        if stage in self._sums:
            keys, sums = self._sums.pop(stage)
            if distributed:
                sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
            means = sums[:-1] / sums[-1]
            means = means if self.dtype == torch.float64 else means.float()  # float64 runs keep 1e65 finite
            logged.update({f"{stage}/{key}": means[i] for i, key in enumerate(keys)})
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

    @staticmethod
    def _perturbed_grads(params: list[Tensor]) -> list[Tensor]:
        for p in params:
            if p.grad is None:  # used in pass 1 but not in pass 2
                p.grad = torch.zeros_like(p)
        return [p.grad for p in params]

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
            configs = self.trainer.lr_scheduler_configs if self._trainer is not None else []
            self._lr_peak = schedule_peak_lr(self.trainer.optimizers[0], [c.scheduler for c in configs])
        return self._lr_peak

    def _world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def _loss_scale(self) -> Tensor | None:
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return None
        return scaler._get_scale_async()

    def _check_finite(self, loss: Tensor, final: list[Tensor], scale: Tensor | None, opt: Any) -> bool:
        """The step's one host sync: is the loss (and, without loss scaling, d) finite on every rank?"""
        if self.on_nonfinite == "ignore":
            return True
        finite = torch.isfinite(loss.detach())
        if scale is None and final:
            finite = finite & torch.isfinite(global_norm(final))
        ok = bool(finite)
        if self._world_size() > 1:
            ok = not self.trainer.strategy.reduce_boolean_decision(not ok, all=False)
        if ok:
            return True
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
        return False

    def _sync_lr_schedulers(self, epoch: int) -> None:
        """Step every scheduler up to its counter: the optimizer steps taken, or ``epoch`` epochs.

        Called after each optimizer step and at each epoch end; on resume Lightning replays the
        epoch-end hooks of a checkpoint written at validation end, so the count stays exact.
        """
        if self._trainer is None:
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


def _launched_by_cli() -> bool:
    """Whether LightningCLI is instantiating this module (it hands over the config as hparams)."""
    try:
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # pragma: no cover - older/newer Lightning
        return False
    return _given_hyperparameters.get() is not None


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r}; expected one of {', '.join(map(repr, choices))}")


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
        peaks = [_scheduler_peak(s, initial) for s in scheduler._schedulers]
        return max(initial if p is None else p for p in peaks)
    return None


def _leading_size(batch: Any, k: int) -> int:
    """The common first dimension of the batch's tensors, or a ValueError saying why it cannot be split."""
    sizes: set[int] = set()

    def visit(obj: Any) -> bool:
        if isinstance(obj, Tensor):
            if obj.ndim > 0:
                sizes.add(obj.shape[0])
            return obj.ndim > 0
        if isinstance(obj, (tuple, list)):
            return all(visit(o) for o in obj)
        if isinstance(obj, dict):
            return all(visit(o) for o in obj.values())
        return False

    if not visit(batch) or len(sizes) != 1:
        what = type(batch).__name__ if len(sizes) <= 1 else f"tensors with first dimensions {sorted(sizes)}"
        raise ValueError(
            f"Invalid accumulate_grad_batches: {k}; it splits each batch along the first dimension of its tensors, "
            f"and this batch ({what}) cannot be split that way. Use accumulate_grad_batches=1 (a larger batch "
            "needs more memory) or override split_batch"
        )
    return sizes.pop()


def _split(obj: Any, k: int) -> list[Any]:
    if isinstance(obj, Tensor):
        return list(obj.tensor_split(k))
    if isinstance(obj, dict):
        columns = {key: _split(v, k) for key, v in obj.items()}
        return [type(obj)({key: c[i] for key, c in columns.items()}) for i in range(k)]
    rows = zip(*(_split(o, k) for o in obj))
    if hasattr(obj, "_fields"):  # namedtuple
        return [type(obj)(*row) for row in rows]
    return [type(obj)(row) for row in rows]


def _all_reduce_mean(tensors: list[Tensor]) -> None:
    """Average a list of tensors over the process group with one flat all-reduce."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    torch._foreach_copy_(tensors, [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in tensors]), tensors)])


def _rng_state() -> dict[str, Any]:
    """torch's CPU and CUDA generator states (what dropout draws from), as tensors."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

