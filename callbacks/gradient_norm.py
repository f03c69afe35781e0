"""Gradient-norm sharpness of every training batch (Khalid et al.'s Algorithm 1) as a Lightning callback."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from flatminima.lightning_modules import compat
from flatminima.lightning_modules.validation import check_float, check_p

from . import measures
from .base import SharpnessCallback, Values


class GradientNormSharpness(SharpnessCallback):
    """Gradient-norm sharpness ρ‖∇L_B(w) ⊙ c‖_q of every training batch, at no extra cost (Khalid et al.).

    Khalid, Ponraj & Mukherjee's Algorithm 1: the first-order SAM sharpness ρ‖∇L_B(w)‖ of each training
    batch, averaged per epoch. The gradient is the one the training step already computed — no extra
    forward or backward: for a module exposing ``pass_index`` (the two-pass SAM module) the clean pass-1
    gradient (read in ``on_after_backward`` while ``pass_index == 1``), for other modules in automatic
    optimization the step's gradient in ``on_before_optimizer_step`` (after AMP unscaling and gradient
    accumulation, before clipping), in manual optimization the gradient after each backward. Scaled
    16-mixed gradients are unscaled. Under DDP each rank logs its own per-batch value (the gradient it
    holds: per replica for the SAM module's per-replica ascent, all-reduced otherwise); the epoch mean is
    over all ranks' batches. (Their listing divides the epoch sum by the last batch index; this is the
    mean over batches.) The epoch's running sum is on the device (no host sync per batch) and in the
    callback state, so a resume within an epoch keeps the batches before the checkpoint. With the SAM
    module's gradient accumulation the value is read once the pass-1 gradient is complete (per
    micro-batch with ``accumulate_ascent="micro"``).

    With ``on_checkpoint``/``every_n_epochs`` it also measures ρ‖∇L_B ⊙ c‖_q on the fixed subset
    (:func:`flatminima.callbacks.measures.gradient_norm_sharpness`, one extra forward/backward per subset batch).

    Logs:
        ``sharpness/<name>``: the epoch mean of the per-batch training values.
        ``sharpness/<name>_step``: the per-batch training value (``log_every_step``).
        ``sharpness/<name>_subset``: the value on the fixed subset (at checkpoints / every N epochs).

    Args:
        rho: ρ ≥ 0 (the SAM radius).
        p: Norm of the perturbation ball (2 in Khalid et al.); the gradient norm is its dual q.
        adaptive: c = |w| instead of 1.
        log_every_step: Also log the per-batch value.
        name: Metric name (default ``"gradient_norm"``).
        on_checkpoint: Measure on the fixed subset when a LossThresholdCheckpoint saves (default off:
            the training-time values cost nothing, the subset one does).
        **kwargs: The other :class:`~flatminima.callbacks.base.SharpnessCallback` options.
    """

    identity_args = ("rho", "p", "adaptive") + SharpnessCallback.identity_args

    def __init__(
        self,
        rho: float = 0.05,
        p: float = 2.0,
        adaptive: bool = False,
        log_every_step: bool = True,
        name: str = "gradient_norm",
        on_checkpoint: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, on_checkpoint=on_checkpoint, sampling="subset", **kwargs)
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
            rank_zero_warn(
                f"{type(self).__name__}({self.name!r}): resumed within an epoch under DDP; only rank 0's "
                "values before the checkpoint are in the checkpoint, so that epoch's mean omits the "
                "other ranks' values before it"
            )
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

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if getattr(pl_module, "pass_index", None) is None and pl_module.automatic_optimization:
            self._record(trainer, pl_module, unscale=False)

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, unscale: bool) -> None:
        params = [p for p in (self._params or pl_module.parameters()) if p.grad is not None]
        if not params:
            return
        value = measures.gradient_norm([p.grad for p in params], params, rho=self.rho, p=self.p, adaptive=self.adaptive)
        scale = compat.loss_scale(trainer) if unscale else None
        if scale is not None:
            value = value / scale
        if self.log_every_step:
            pl_module.log(f"sharpness/{self.metric_name}_step", value, on_step=True, on_epoch=False, batch_size=1)
        value = value.detach().to(torch.float64)
        self._sum = value if self._sum is None else self._sum.to(value.device) + value
        self._count += 1

    def epoch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int, step: int, *, via_logger: bool = False
    ) -> None:
        """Log the epoch's mean of the per-batch values (over all ranks), then measure the subset if due."""
        mean = self._epoch_mean(trainer, pl_module)
        if mean is not None:
            key = f"sharpness/{self.metric_name}"
            if via_logger:
                for logger in trainer.loggers:
                    logger.log_metrics({key: float(mean)}, step=step)
            else:
                pl_module.log(key, mean, on_step=False, on_epoch=True, sync_dist=True, batch_size=1)
        super().epoch_end(trainer, pl_module, epoch, step, via_logger=via_logger)

    def _epoch_mean(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor | None:
        """The mean of this epoch's per-batch values over all ranks (None without any); starts the next epoch."""
        total = torch.zeros((), dtype=torch.float64) if self._sum is None else self._sum
        total = total.to(pl_module.device)
        packed = torch.stack([total, total.new_tensor(float(self._count))])
        if trainer.world_size > 1:
            packed = trainer.strategy.reduce(packed, reduce_op="sum")
        self._sum, self._count = None, 0
        return (packed[0] / packed[1]).float() if float(packed[1]) > 0 else None

    def compute(
        self, network: nn.Module, batches: list[Any], reduce: measures.Reduce | None, trainer: pl.Trainer
    ) -> Values:
        value = measures.gradient_norm_sharpness(
            network, batches, self.rho, p=self.p, adaptive=self.adaptive, loss_fn=self.loss_fn, reduce=reduce
        )
        return {f"sharpness/{self.metric_name}_subset": value}
