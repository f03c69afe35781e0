"""PAC-Bayes flatness and bounds (Jiang et al. 2020) as a Lightning callback."""

from __future__ import annotations

import warnings
from typing import Any, Literal

import lightning.pytorch as pl
import torch.nn.functional as F
from torch import nn

from flatminima.lightning_modules.validation import check_choice, check_float, check_int

from . import measures
from ._initial import InitialWeights
from .base import SharpnessCallback, Values
from .noise_search import check_search


def training_set_size(trainer: pl.Trainer) -> int | None:
    """m: the number of examples of the training set (None when the training loader's dataset has no length)."""
    dataset = getattr(trainer.train_dataloader, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None


class PacBayesFlatness(InitialWeights, SharpnessCallback):
    """PAC-Bayes flatness 1/σ′², its magnitude-aware variant and the PAC-Bayes bounds (Jiang et al. 2020).

    σ′ is the largest noise scale whose Gaussian perturbations of the weights drop the training accuracy on
    the fixed subset by at most ``target`` in expectation, by a seeded bisection over ``samples`` Monte-Carlo
    draws (:func:`flatminima.callbacks.measures.pac_bayes_sigma`); the magnitude-aware noise has variance σ′² w_i² + ε².
    The bounds use the training-set size m and the initial weights, which the callback keeps from the start of
    fit (in its checkpoint state). Formulas: :func:`flatminima.callbacks.measures.pac_bayes`. The loss is not used (the
    accuracy is); the network must be a classifier with integer targets.

    Logs (``variant`` "both"; "plain" or "magnitude" log their half):
        ``sharpness/<name>_flatness``, ``sharpness/<name>_orig``, ``sharpness/<name>_init``;
        ``sharpness/<name>_mag_flatness``, ``sharpness/<name>_mag_orig``, ``sharpness/<name>_mag_init``.

    Args:
        target: The allowed expected accuracy drop (Jiang et al.: 0.1).
        depth: Bisection probes (Jiang et al.'s code: 15).
        samples: Monte-Carlo draws per probe (their 10); at most depth × samples perturbed evaluations.
        lower: Lower end of the σ bracket.
        upper: Upper end of the σ bracket (their 2).
        tol: Stop at a probe whose drop is within tol of the target (their 1e-2; 0: never).
        scale: Bisect at midpoints (``"linear"``, theirs) or geometric means (``"log"``; lower > 0).
        magnitude_eps: ε of the magnitude-aware noise (Jiang et al.: 1e-3).
        variant: ``"both"``, ``"plain"`` (noise N(0, σ² I)) or ``"magnitude"``.
        name: Metric prefix (default ``"pac_bayes"``).
        batch_size: Batch size of the subset's batches (default 256).
        **kwargs: The other :class:`~flatminima.callbacks.base.SharpnessCallback` options (schedule, subset, network).
    """

    identity_args = (
        "target",
        "depth",
        "samples",
        "lower",
        "upper",
        "tol",
        "scale",
        "magnitude_eps",
        "variant",
    ) + SharpnessCallback.identity_args

    def __init__(
        self,
        target: float = 0.1,
        depth: int = 15,
        samples: int = 10,
        lower: float = 0.0,
        upper: float = 2.0,
        tol: float = 1e-2,
        scale: Literal["linear", "log"] = "linear",
        magnitude_eps: float = 1e-3,
        variant: Literal["both", "plain", "magnitude"] = "both",
        name: str = "pac_bayes",
        batch_size: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, batch_size=batch_size, loss_fn=F.cross_entropy, sampling="subset", **kwargs)
        check_search(target, depth, samples, lower, upper, tol, scale=scale)
        self.scale = scale
        self.target, self.depth, self.samples = float(target), check_int("depth", depth), check_int("samples", samples)
        self.lower, self.upper, self.tol = float(lower), float(upper), float(tol)
        self.magnitude_eps = check_float("magnitude_eps", magnitude_eps)
        self.variant = check_choice("variant", variant, ("both", "plain", "magnitude"))

    def check_batch(self, network: nn.Module, batch: Any) -> None:
        """The network must classify the batch (integer targets)."""
        with warnings.catch_warnings():  # one probe: always at an end of the bracket
            warnings.simplefilter("ignore", UserWarning)
            measures.pac_bayes_sigma(network, [batch], depth=1, samples=1)

    def compute(
        self, network: nn.Module, batches: list[Any], reduce: measures.Reduce | None, trainer: pl.Trainer
    ) -> Values:
        values = measures.pac_bayes(
            network,
            batches,
            initial=self.initial,
            m=training_set_size(trainer),
            variant=self.variant,
            target=self.target,
            magnitude_eps=self.magnitude_eps,
            depth=self.depth,
            samples=self.samples,
            lower=self.lower,
            upper=self.upper,
            tol=self.tol,
            seed=self.seed,
            scale=self.scale,
            reduce=reduce,
        )
        return {f"sharpness/{self.metric_name}{key[len('pac_bayes') :]}": value for key, value in values.items()}
