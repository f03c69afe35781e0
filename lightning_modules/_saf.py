"""SAF and MESA (Du et al., 2022): one pass per step, the loss plus a KL term that keeps the outputs on course."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._rule import PUBLIC_MODULE, Minimizer, RuleSetup, StepContext
from .validation import check_float, check_fraction, check_int, invalid

__all__ = ["SAF", "MESA", "softened_kl"]


def softened_kl(outputs: Tensor, reference: Tensor, temperature: float) -> Tensor:
    """τ² · mean_i KL(softmax(r_i/τ) ‖ softmax(z_i/τ)): the outputs z pulled towards the reference logits r.

    As the authors' code writes it: ``F.kl_div(log softmax(z/τ), softmax(r/τ)).sum(-1).mean() · τ²``; the
    gradient flows through z only (r is detached).
    """
    log_q = F.log_softmax(outputs / temperature, dim=-1)
    p = F.softmax(reference.detach().to(outputs.dtype) / temperature, dim=-1)
    return F.kl_div(log_q, p, reduction="none").sum(-1).mean() * temperature**2


class _Trajectory(Minimizer):
    """One pass per step; from epoch ``start_epoch + 1`` on, the loss gains λ·KL against reference outputs."""

    plain_two_pass = False
    uses_outputs = True

    def __init__(self, lam: float, temperature: float, start_epoch: int, end_epoch: int | None) -> None:
        super().__init__(rho=0.0)
        self.lam = check_float("lam", lam)
        self.temperature = check_float("temperature", temperature, strict=True)
        self.start_epoch = check_int("start_epoch", start_epoch, 0)
        self.end_epoch = check_int("end_epoch", end_epoch, 0, optional=True)
        if self.end_epoch is not None and self.end_epoch <= self.start_epoch:
            raise invalid("end_epoch", end_epoch, f"None or end_epoch > start_epoch = {self.start_epoch}")

    @property
    def perturbs(self) -> bool:
        return False

    @property
    def clean_gradient(self) -> bool:
        return False

    def plan(self, ctx: StepContext) -> str:
        return "one"

    def extra_loss_active(self, ctx: StepContext) -> bool:
        """start_epoch < epoch < end_epoch, as the authors' ``epoch > kl_start_epoch and epoch < kl_end_epoch``."""
        return self.lam > 0 and ctx.epoch > self.start_epoch and (self.end_epoch is None or ctx.epoch < self.end_epoch)

    def setup(self, info: RuleSetup) -> None:
        if not info.softmax_outputs:
            raise ValueError(
                f"Invalid minimizer for {info.task or 'this task'}: {type(self).__name__} compares class "
                "probabilities (softmax of the logits) and needs a Classifier"
            )

    def _repr_common(self) -> str:
        return (
            f"lam={self.lam}, temperature={self.temperature}, start_epoch={self.start_epoch}, "
            f"end_epoch={self.end_epoch}"
        )


class SAF(_Trajectory):
    """Sharpness-Aware training for Free (SAF): the loss plus λ·KL to each sample's outputs Ẽ epochs earlier.

    Du, Zhou, Feng, Tan & Zhou (2022), "Sharpness-Aware Training for Free" (NeurIPS),
    https://arxiv.org/abs/2205.14083; code AngusDujw/SAF (``SAF_train.py``), which this follows. One
    forward-backward pass per step. A store holds each training sample's logits of the last Ẽ + 1 epochs
    (slot e mod (Ẽ + 1)); with z_i the logits of sample i now, at epoch e::

        store[i, e mod (Ẽ+1)] ← z_i (detached)                          (every step)
        loss = L_B(w) + λ · τ² · mean_i KL(softmax(store[i, (e−Ẽ) mod (Ẽ+1)]/τ) ‖ softmax(z_i/τ))
                                                                         (start_epoch < e < end_epoch)

    The samples are found by their dataset index: each training batch must be ``(x, y, idx)`` with idx a
    LongTensor of indices into the training set (``data.init_args.with_indices: true``); a batch without
    it is refused. The store has one row per training sample, its size taken from the training loader's
    dataset when the run starts; it lives on the model's device (N·(Ẽ+1)·C numbers) and in the
    checkpoint, and a checkpoint of another training set's size is refused. Under DDP every rank writes
    every rank's rows (one all-gather of indices and logits per step), so every rank holds the whole
    store. ``train/loss`` stays L_B(w) alone; while the KL term is on, ``train/grad_norm`` is not logged
    and ``pass_index`` is 3 (the gradient is that of the augmented loss).

    Defaults λ = 0.3, τ = 5, Ẽ = 3, E_start = 5 (kl_start_epoch), no end: the authors' README lists
    λ ∈ {0.3 (SAF), 0.8 (MESA)}, τ = 5 ("a very stable parameter"), E_start = 5, Ẽ ∈ {2, 3}; Ẽ = 3 is the
    default of their ``SAF_train.py`` (their ImageNet ``run.sh`` uses 2); their ``kl_end_epoch`` default,
    300, is beyond their runs.

    Args:
        lam: λ ≥ 0, the weight of the KL term.
        temperature: τ > 0 that softens both distributions.
        minus_epochs: Ẽ ≥ 1, how many epochs back the reference outputs are.
        start_epoch: The KL term is added from epoch start_epoch + 1 on (0-based epochs); ≥ Ẽ − 1, so
            that the reference slot has been written.
        end_epoch: ... and before this epoch; None: to the end.
    """

    __module__ = PUBLIC_MODULE

    def __init__(
        self,
        lam: float = 0.3,
        temperature: float = 5.0,
        minus_epochs: int = 3,
        start_epoch: int = 5,
        end_epoch: int | None = None,
    ) -> None:
        super().__init__(lam, temperature, start_epoch, end_epoch)
        self.minus_epochs = check_int("minus_epochs", minus_epochs, 1)
        if self.start_epoch < self.minus_epochs - 1:
            raise invalid(
                "start_epoch",
                start_epoch,
                f"start_epoch >= minus_epochs - 1 = {self.minus_epochs - 1} "
                "(the first KL epoch reads the outputs of minus_epochs earlier)",
            )
        self.reset()

    def reset(self) -> None:
        self._store: Tensor | None = None
        self._size: int | None = None
        self._checked = False

    def setup(self, info: RuleSetup) -> None:
        super().setup(info)
        if info.dataset_size is None:
            raise ValueError(
                "Invalid training data for SAF: its store needs the training set's size, and the "
                "training loader's dataset has no len()"
            )
        if self._store is not None and self._store.shape[0] != info.dataset_size:
            raise ValueError(
                f"Invalid checkpoint for SAF: its store holds {self._store.shape[0]} samples, the "
                f"training set has {info.dataset_size}"
            )
        self._size = int(info.dataset_size)
        self._checked = False

    def extra_loss(
        self, outputs: Tensor, ids: Tensor | None, inputs: tuple[Any, ...], ctx: StepContext
    ) -> Tensor | None:
        if ids is None:
            raise ValueError(
                "Invalid batch for SAF: each training batch must be (x, y, idx) with idx the samples' "
                "dataset indices; set data.init_args.with_indices: true"
            )
        logits = outputs.detach()
        store = self._store_for(logits, ids)
        slots = self.minus_epochs + 1
        with torch.no_grad():
            store[ctx.gather(ids), ctx.epoch % slots] = ctx.gather(logits).to(store.dtype)
        if not self.extra_loss_active(ctx):
            return None
        reference = store[ids, (ctx.epoch - self.minus_epochs) % slots]
        return self.lam * softened_kl(outputs, reference, self.temperature)

    def _store_for(self, logits: Tensor, ids: Tensor) -> Tensor:
        """The store (made at the first batch, when the number of classes is known); the first batch's ids checked."""
        if self._size is None:
            raise RuntimeError("SAF.setup() was not called: the store's size (the training set's) is unknown")
        if not self._checked:  # one host sync, at the first step of a run
            self._checked = True
            if ids.dtype not in (torch.int64, torch.int32) or ids.ndim != 1 or ids.shape[0] != logits.shape[0]:
                raise ValueError(
                    f"Invalid batch for SAF: idx must be a LongTensor of one index per sample; got "
                    f"{ids.dtype} of shape {tuple(ids.shape)} for {logits.shape[0]} samples"
                )
            if int(ids.max()) >= self._size or int(ids.min()) < 0:
                raise ValueError(
                    f"Invalid sample index for SAF: {int(ids.max())}; expected 0 <= idx < {self._size} "
                    "(the training set's size)"
                )
        if self._store is None:
            dtype = torch.promote_types(logits.dtype, torch.float32)
            self._store = torch.zeros(
                self._size, self.minus_epochs + 1, logits.shape[1], dtype=dtype, device=logits.device
            )
        elif self._store.device != logits.device:
            self._store = self._store.to(logits.device)
        return self._store

    def state_dict(self) -> dict[str, Any]:
        return {} if self._store is None else {"store": self._store.detach().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        if "store" in state:
            self._store = state["store"].clone()

    def extra_repr(self) -> str:
        return f"{self._repr_common()}, minus_epochs={self.minus_epochs}"


class MESA(_Trajectory):
    """Memory-Efficient Sharpness-Aware training (MESA): the loss plus λ·KL to an EMA copy of the model's outputs.

    Du, Zhou, Feng, Tan & Zhou (2022), "Sharpness-Aware Training for Free" (NeurIPS), section on MESA;
    code AngusDujw/SAF (``MESA_train.py``, with timm's ``ModelEmaV2``). A copy of the network (the
    teacher, in eval mode) follows the weights and buffers as an exponential moving average; with z the
    network's logits and z̄ the teacher's on the same inputs::

        loss = L_B(w) + λ · τ² · mean_i KL(softmax(z̄_i/τ) ‖ softmax(z_i/τ))     (start_epoch < e < end_epoch)
        after each optimizer.step():  w̄ ← decay·w̄ + (1 − decay)·w              (parameters and float buffers;
                                                                                  integer buffers copied)

    The teacher starts as a copy of the network when the run starts (as ``ModelEmaV2`` does) and runs
    without gradient, in eval mode (BatchNorm on its averaged running statistics, no dropout): one
    forward pass more per step while the KL term is on. It lives outside the LightningModule (not in
    its parameters, so the optimizer never sees it) and in the checkpoint. ``train/loss`` stays L_B(w).

    Defaults λ = 0.8, τ = 5, decay 0.9998, E_start = 5: the authors' ImageNet ``run.sh`` (``--reinforce
    0.8 --kl_start_epoch 5 --model-ema``, timm's EMA decay default 0.9998) and their README (λ = 0.8 for
    MESA). With decay 0.9998 the average spans about 5000 steps; short runs want a smaller decay.

    Args:
        lam: λ ≥ 0, the weight of the KL term.
        temperature: τ > 0 that softens both distributions.
        decay: The EMA decay in [0, 1).
        start_epoch: The KL term is added from epoch start_epoch + 1 on (0-based).
        end_epoch: ... and before this epoch; None: to the end.
    """

    __module__ = PUBLIC_MODULE

    def __init__(
        self,
        lam: float = 0.8,
        temperature: float = 5.0,
        decay: float = 0.9998,
        start_epoch: int = 5,
        end_epoch: int | None = None,
    ) -> None:
        super().__init__(lam, temperature, start_epoch, end_epoch)
        self.decay = check_fraction("decay", decay)
        self.reset()

    def reset(self) -> None:
        self.teacher: nn.Module | None = None
        self._net: nn.Module | None = None
        self._pending: dict[str, Tensor] | None = None
        self._pairs: tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]] | None = None

    def setup(self, info: RuleSetup) -> None:
        super().setup(info)
        if info.net is None:
            raise RuntimeError("MESA.setup() needs the network")
        if self._net is not info.net or self.teacher is None:
            self._net = info.net
            self.teacher = copy.deepcopy(info.net).eval().requires_grad_(False)
            self._pairs = None
        if self._pending is not None:
            self.teacher.load_state_dict(self._pending)
            self._pending = None

    def extra_loss(
        self, outputs: Tensor, ids: Tensor | None, inputs: tuple[Any, ...], ctx: StepContext
    ) -> Tensor | None:
        if not self.extra_loss_active(ctx):
            return None
        assert self.teacher is not None, "MESA.setup() was not called"
        with torch.no_grad():
            reference = self.teacher(*inputs)
        return self.lam * softened_kl(outputs, reference, self.temperature)

    def after_step(self, params: Sequence[Tensor], ctx: StepContext) -> None:
        """w̄ ← decay·w̄ + (1 − decay)·w over parameters and floating buffers; integer buffers copied."""
        if self.teacher is None or self._net is None:
            return
        t_float, s_float, t_int, s_int = self._pairs or self._pair_up()
        with torch.no_grad():
            torch._foreach_mul_(t_float, self.decay)
            torch._foreach_add_(t_float, s_float, alpha=1.0 - self.decay)
            if t_int:
                torch._foreach_copy_(t_int, s_int)

    def _pair_up(self) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        assert self.teacher is not None and self._net is not None
        teacher = list(self.teacher.parameters()) + list(self.teacher.buffers())
        net = list(self._net.parameters()) + list(self._net.buffers())
        floating = [i for i, t in enumerate(teacher) if t.is_floating_point()]
        others = [i for i, t in enumerate(teacher) if not t.is_floating_point()]
        self._pairs = (
            [teacher[i] for i in floating],
            [net[i] for i in floating],
            [teacher[i] for i in others],
            [net[i] for i in others],
        )
        return self._pairs

    def state_dict(self) -> dict[str, Any]:
        if self.teacher is None:
            return {} if self._pending is None else {"teacher": self._pending}
        return {"teacher": {k: v.detach().clone() for k, v in self.teacher.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        if "teacher" in state:
            self._pending = dict(state["teacher"])

    def extra_repr(self) -> str:
        return f"{self._repr_common()}, decay={self.decay}"
