"""The final weights re-evaluated on the training set (eval mode, no augmentation) as a Lightning callback."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch import nn

from . import measures
from .base import SharpnessCallback, Values


class FinalTrainEvaluation(SharpnessCallback):
    """Loss and accuracy of the final weights on the training set, in eval mode and without augmentation.

    The epoch means ``train/loss`` and ``train/acc`` average over the weights of a whole epoch, in training
    mode (dropout on, BatchNorm on batch statistics) and on augmented inputs; generalization gaps of the final
    weights (Jiang et al. 2020) need the training set evaluated like the test set. At the end of fit (and at
    the other times the :class:`~flatminima.callbacks.base.SharpnessCallback` options ask for) this callback evaluates
    the network in eval mode on the training examples, read through the data module's
    ``train_eval_dataloader()`` when it has one (the project's data modules: the training set with the
    evaluation transforms, no augmentation, training labels included) and otherwise from the training
    loader's dataset (whose transforms then apply), in a fixed order under a seeded RNG, collated at each
    evaluation and not kept in memory between them. The accuracy is logged for integer class targets only.

    Logs:
        ``<name>/loss``: the mean loss over the examples (``loss_fn``, default cross-entropy).
        ``<name>/acc``: the accuracy (classification).

    Args:
        name: Metric prefix (default ``"train_final"``).
        num_samples: Examples evaluated (default None: the whole training set).
        batch_size: Batch size of the evaluation (default 256).
        at_end: Evaluate at the end of fit (default True).
        on_checkpoint: Also evaluate at every LossThresholdCheckpoint save (default False).
        **kwargs: The other :class:`~flatminima.callbacks.base.SharpnessCallback` options (loss, network, ...).
    """

    def __init__(
        self,
        name: str = "train_final",
        num_samples: int | None = None,
        batch_size: int = 256,
        at_end: bool = True,
        on_checkpoint: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            name,
            num_samples=num_samples,
            batch_size=batch_size,
            at_end=at_end,
            on_checkpoint=on_checkpoint,
            sampling="subset",
            **kwargs,
        )

    def source_loader(self, trainer: pl.Trainer) -> Any:
        """The data module's ``train_eval_dataloader()`` when it has one, else the training loader."""
        datamodule = getattr(trainer, "datamodule", None)
        make = getattr(datamodule, "train_eval_dataloader", None)
        return make() if callable(make) else trainer.train_dataloader

    def local_batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Any]:
        """This rank's share of the evaluated examples, collated anew each time (the training set is not kept)."""
        try:
            return super().local_batches(trainer, pl_module)
        finally:
            self._batches = None

    def compute(
        self, network: nn.Module, batches: list[Any], reduce: measures.Reduce | None, trainer: pl.Trainer
    ) -> Values:
        loss, acc = measures.loss_and_accuracy(network, batches, self.loss_fn, reduce)
        out = {f"{self.metric_name}/loss": loss}
        if acc is not None:
            out[f"{self.metric_name}/acc"] = acc
        return out
