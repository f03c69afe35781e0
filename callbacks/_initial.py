"""The network's initial weights, for the measures that compare the trained weights with them (distance to init).

A measure callback that mixes in :class:`InitialWeights` copies the measured network's state dict
(parameters and buffers, to the CPU) at the start of fit, before any training step, and keeps the copy in
its callback state, so a run resumed from a checkpoint measures against the same initial weights. The copy
is taken on every rank (DDP has broadcast rank 0's weights by then); a second ``fit`` with the same
callback keeps the first copy.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor


class InitialWeights:
    """Mixin for a :class:`~flatminima.callbacks.base.SharpnessCallback`: :attr:`initial`, the network's weights at fit start.

    Put it before ``SharpnessCallback`` among the bases; it extends ``state_dict``/``load_state_dict`` with
    ``"initial"`` and takes the copy in ``on_fit_start``.
    """

    _initial: dict[str, Tensor] | None = None

    @property
    def initial(self) -> dict[str, Tensor] | None:
        """The network's state dict (CPU copies) at the start of the first fit, or None before it."""
        return self._initial

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)  # type: ignore[misc]
        if self._initial is not None:
            return
        network = self.resolve_network(pl_module)  # type: ignore[attr-defined]
        self._initial = {k: v.detach().to("cpu", copy=True) for k, v in network.state_dict().items()}
        if trainer.ckpt_path is not None:
            name = getattr(self, "name", "")
            rank_zero_warn(
                f"{type(self).__name__}({name!r}): the checkpoint {trainer.ckpt_path} holds no initial weights "
                "of this callback, so the weights it resumes from are taken as the initial ones; the distances to "
                "initialization measure from there"
            )

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "initial": self._initial}  # type: ignore[misc]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # type: ignore[misc]
        if state_dict.get("initial") is not None:
            self._initial = dict(state_dict["initial"])
