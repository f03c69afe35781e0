"""Adaptive worst-case m-sharpness (Andriushchenko et al. 2023) as a Lightning callback."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import move_data_to_device
from torch import nn
from torch.utils.data import DataLoader

from flatminima.lightning_modules.validation import check_choice, check_float, check_int, check_p

from . import measures
from ._subset import seeded_rng
from .adaptive import check_selection
from .base import SharpnessCallback, Values


class AdaptiveSharpness(SharpnessCallback):
    """Adaptive worst-case m-sharpness (Andriushchenko et al. 2023) at checkpoints.

    mean over the subset's batches of max_{‖δ ⊙ c⁻¹‖_p ≤ ρ} L_B(w + δ) − L_B(w), c = |w| if adaptive
    (:func:`flatminima.callbacks.measures.adaptive_sharpness`). Hammoud et al. 2023 measure with ``method="pga"``,
    ``n_iters=5``, p = ∞, ``batch_size=64``, ``num_samples=3200`` (50 batches), the step the training
    learning rate (taken from the first optimizer when ``step_size`` is None).

    Hammoud et al.'s notebooks measure differently; the options ``score``, ``box``, ``select``, ``train_mode``
    and ``sampling`` reproduce their choices (see :func:`flatminima.callbacks.measures.adaptive_sharpness`).

    Logs (means over the batches; :func:`flatminima.callbacks.measures.adaptive_sharpness_parts`):
        ``sharpness/<name>``: the sharpness A − L.
        ``sharpness/<name>_ascent_loss``: A, the loss of the selected ascent iterate (the training-set
        loss with ``score="train_set"``).
        ``sharpness/<name>_clean_loss``: L, the loss at the measured weights, the one the sharpness subtracts.
        ``sharpness/<name>_ascent_falls``: the fraction of ascent steps whose loss fell below the previous
        iterate's (0 when every ascent is monotone); counted from the losses the ascent computes anyway.

    Args:
        rho: Radius ρ ≥ 0.
        p: 2 or ``float("inf")``.
        adaptive: c = |w| (scale-invariant) instead of 1.
        n_iters: Ascent steps per batch.
        method: ``"apgd"`` (the authors' estimator, as their code runs it), ``"apgd_reset"`` (the iterate
            restarts from the best point at each step halving; this project's earlier default) or ``"pga"``
            (Hammoud et al. 2023).
        step_size: Initial (apgd, default 2ρ) or fixed (pga, default the current training lr) step.
        name: Metric name (default ``"adaptive"``).
        score: pga only. ``"batch"``: each iterate is scored by its ascent batch's loss (the definition);
            ``"train_set"``: by the loss over the whole training set, collated as one batch (their FCNN and
            GAT notebooks), the value being the best score minus the clean training-set loss.
        box: pga with p = ∞ only: ``"abs"`` (|δ| ≤ ρ|w|) or ``"signed"`` (their FCNN notebook's clamp
            with bounds ±ρ·w, which pins negative weights at w − ρ|w|).
        select: pga only: ``"best_iterate"`` (the largest loss over the iterates) or ``"best_pass_end"``
            (their FCNN notebook: the ``n_iters`` steps form ``passes`` passes of equal length, and the
            iterate ending the pass with the largest summed loss is taken).
        passes: The number of passes of ``select="best_pass_end"`` (a divisor of ``n_iters``; their
            notebook: 6 passes of 53 steps); 1 with ``"best_iterate"``.
        train_mode: Measure with the network in training mode (dropout on, as their GAT and LeNet-5
            notebooks do); the dropout masks are drawn from a generator seeded with ``seed`` at every
            measurement, and the global RNG is restored afterwards.
        **kwargs: The other :class:`~flatminima.callbacks.base.SharpnessCallback` options, ``sampling`` included
            (``"replacement"``: their GAT notebook draws its 64 nodes with replacement).
    """

    identity_args = (
        "rho",
        "p",
        "adaptive",
        "n_iters",
        "method",
        "step_size",
        "score",
        "box",
        "select",
        "passes",
        "train_mode",
        "sampling",
    ) + SharpnessCallback.identity_args

    def __init__(
        self,
        rho: float,
        p: float = math.inf,
        adaptive: bool = True,
        n_iters: int = 20,
        method: Literal["apgd", "apgd_reset", "pga"] = "apgd",
        step_size: float | None = None,
        name: str = "adaptive",
        score: Literal["batch", "train_set"] = "batch",
        box: Literal["abs", "signed"] = "abs",
        select: Literal["best_iterate", "best_pass_end"] = "best_iterate",
        passes: int = 1,
        train_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, **kwargs)
        self.rho = check_float("rho", rho)
        self.p = check_p(p, allowed=(2.0, math.inf))
        self.adaptive = adaptive
        self.n_iters = check_int("n_iters", n_iters, 1)
        self.method = check_choice("method", method, ("apgd", "apgd_reset", "pga"))
        self.step_size = None if step_size is None else check_float("step_size", step_size, strict=True)
        self.score = check_choice("score", score, ("batch", "train_set"))
        self.box = check_choice("box", box, ("abs", "signed"))
        self.select = check_choice("select", select, ("best_iterate", "best_pass_end"))
        self.passes = check_int("passes", passes, 1)
        self.train_mode = bool(train_mode)
        measures.check_pga_options(self.method, self.p, self.adaptive, self.box, self.score != "batch", "score")
        check_selection(self.method, self.n_iters, self.select, self.passes)
        self._score_batches: list[Any] | None = None

    def compute(
        self, network: nn.Module, batches: list[Any], reduce: measures.Reduce | None, trainer: pl.Trainer
    ) -> Values:
        step_size = self.step_size
        if step_size is None and self.method == "pga":
            if not trainer.optimizers:
                raise ValueError("Invalid step_size: None with method='pga' and no optimizer to take the lr from")
            step_size = float(trainer.optimizers[0].param_groups[0]["lr"])
        score_batches = self.training_set_batch(trainer) if self.score == "train_set" else None
        with seeded_rng(self.seed) if self.train_mode else contextlib.nullcontext():
            parts = measures.adaptive_sharpness_parts(
                network,
                batches,
                self.rho,
                p=self.p,
                adaptive=self.adaptive,
                n_iters=self.n_iters,
                method=self.method,
                step_size=step_size,
                loss_fn=self.loss_fn,
                reduce=reduce,
                score_batches=score_batches,
                box=self.box,
                select=self.select,
                passes=self.passes,
                train_mode=self.train_mode,
            )
        key = f"sharpness/{self.metric_name}"
        return {
            key: parts.value,
            f"{key}_ascent_loss": parts.ascent_loss,
            f"{key}_clean_loss": parts.clean_loss,
            f"{key}_ascent_falls": parts.falls,
        }

    def training_set_batch(self, trainer: pl.Trainer) -> list[Any]:
        """The whole training set collated as one batch (through ``batch_to_inputs``), drawn once and kept."""
        if self._score_batches is None:
            loader = trainer.train_dataloader
            if not isinstance(loader, DataLoader):
                raise TypeError(
                    f"{type(self).__name__}(score='train_set') needs the training DataLoader; "
                    f"trainer.train_dataloader is {type(loader).__name__}"
                )
            dataset = loader.dataset
            batch = loader.collate_fn([dataset[i] for i in range(len(dataset))])
            self._score_batches = [self.batch_to_inputs(batch) if self.batch_to_inputs is not None else batch]
        return [move_data_to_device(b, trainer.lightning_module.device) for b in self._score_batches]
