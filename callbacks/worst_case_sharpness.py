"""Worst-case sharpness 1/α′² (Jiang et al. 2020's "sharpness" family) as a Lightning callback."""

from __future__ import annotations

import warnings
from typing import Any, Literal

import lightning.pytorch as pl
from torch import nn

from flatminima.lightning_modules.validation import check_choice, check_float, check_int

from . import measures
from .base import SharpnessCallback, Values
from .noise_search import check_search


class WorstCaseSharpness(SharpnessCallback):
    """Worst-case sharpness 1/α′² and its magnitude-aware variant (Jiang et al. 2020) on the fixed subset.

    α′ is the largest box radius within which projected sign-gradient ascent on the subset's loss, from
    ``restarts`` random starts, cannot drop the training accuracy by more than ``target``: the box |u_i| ≤ α
    (plain) or |u_i| ≤ α|w_i| + ε (magnitude-aware), found by the seeded bisection
    (:func:`flatminima.callbacks.measures.sharpness_alpha`).

    Logs (``variant`` "both"; "plain" or "magnitude" log one):
        ``sharpness/<name>_flatness``: 1/α′² (Jiang et al.'s sharpness-flatness).
        ``sharpness/<name>_mag_flatness``: 1/α′² of the magnitude-aware box (sharpness-mag-flatness).

    Args:
        target: The allowed accuracy drop (Jiang et al.: 0.1).
        depth: Bisection probes.
        restarts: Random starts per probe; at most depth × restarts evaluated starts.
        steps: Ascent steps per start (each one forward-backward pass over the subset).
        step_size: The ascent step as a fraction of the radius (default 2.5/steps).
        lower: Lower end of the α bracket (> 0 for ``scale="log"``).
        upper: Upper end of the α bracket.
        tol: Stop at a probe whose drop is within tol of the target (0: never).
        scale: Bisect at geometric means (``"log"``, default) or midpoints (``"linear"``).
        magnitude_eps: ε of the magnitude-aware box (Jiang et al.: 1e-3).
        variant: ``"both"``, ``"plain"`` or ``"magnitude"``.
        name: Metric prefix (default ``"sharpness"``, Jiang et al.'s name of the family).
        batch_size: Batch size of the subset's batches (default 256).
        **kwargs: The other :class:`~flatminima.callbacks.base.SharpnessCallback` options (schedule, subset, loss, network).
    """

    identity_args = (
        "target",
        "depth",
        "restarts",
        "steps",
        "step_size",
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
        restarts: int = 3,
        steps: int = 5,
        step_size: float | None = None,
        lower: float = 1e-6,
        upper: float = 2.0,
        tol: float = 1e-2,
        scale: Literal["linear", "log"] = "log",
        magnitude_eps: float = 1e-3,
        variant: Literal["both", "plain", "magnitude"] = "both",
        name: str = "sharpness",
        batch_size: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, batch_size=batch_size, sampling="subset", **kwargs)
        check_search(target, depth, restarts, lower, upper, tol, samples_name="restarts", scale=scale)
        self.scale = scale
        self.target, self.depth = float(target), check_int("depth", depth)
        self.restarts, self.steps = check_int("restarts", restarts), check_int("steps", steps, 0)
        self.step_size = None if step_size is None else check_float("step_size", step_size, strict=True)
        self.lower, self.upper, self.tol = float(lower), float(upper), float(tol)
        self.magnitude_eps = check_float("magnitude_eps", magnitude_eps)
        self.variant = check_choice("variant", variant, ("both", "plain", "magnitude"))

    def check_batch(self, network: nn.Module, batch: Any) -> None:
        """The network must classify the batch (integer targets) and the loss must take it."""
        with warnings.catch_warnings():  # one probe: always at an end of the bracket
            warnings.simplefilter("ignore", UserWarning)
            measures.sharpness_alpha(network, [batch], depth=1, restarts=1, steps=1, loss_fn=self.loss_fn)

    def compute(
        self, network: nn.Module, batches: list[Any], reduce: measures.Reduce | None, trainer: pl.Trainer
    ) -> Values:
        search = dict(
            target=self.target,
            depth=self.depth,
            restarts=self.restarts,
            steps=self.steps,
            step_size=self.step_size,
            lower=self.lower,
            upper=self.upper,
            tol=self.tol,
            seed=self.seed,
            scale=self.scale,
            loss_fn=self.loss_fn,
            reduce=reduce,
        )
        out: Values = {}
        if self.variant in ("both", "plain"):
            alpha = measures.sharpness_alpha(network, batches, **search).radius
            out[f"sharpness/{self.metric_name}_flatness"] = 1.0 / alpha**2
        if self.variant in ("both", "magnitude"):
            alpha = measures.sharpness_alpha(network, batches, magnitude_eps=self.magnitude_eps, **search).radius
            out[f"sharpness/{self.metric_name}_mag_flatness"] = 1.0 / alpha**2
        return out
