"""The epoch end a resumed checkpoint left undone, for callbacks that work at the end of training epochs.

Lightning runs ``on_train_epoch_end`` after the last batch of an epoch. A checkpoint written between
the two (a step-based ``ModelCheckpoint`` at the epoch's last batch, or one saved at validation end)
resumes past that hook, or replays it without the epoch's logged metrics. A callback that must not
lose that epoch's work records, in its state, the ``(epoch, step)`` whose end is still due; after the
resume it does that work itself (:meth:`EpochEndTracker._overdue`) or recognises the replay
(:meth:`EpochEndTracker._epoch_ended`). Used by the sharpness measures and by
:class:`~flatminima.callbacks.checkpoint.LossThresholdCheckpoint`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl

Pending = tuple[int, int]
"""``(epoch, step)`` of an epoch end still due."""


def pending_epoch_end(
    trainer: pl.Trainer | None, batch_epoch: int, ended_epoch: int, restored: Pending | None
) -> Pending | None:
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


class EpochEndTracker:
    """Mixin for a Lightning callback: tracks which epoch end is handled, and which one a resume left due.

    The callback calls :meth:`_start_tracking` in ``setup``, puts ``self._pending_now()`` into its
    ``state_dict`` under ``"pending"`` and :meth:`_restore_pending` into ``load_state_dict``, calls
    :meth:`_epoch_ended` at the start of its ``on_train_epoch_end`` and :meth:`_overdue` in
    ``on_train_start``/``on_fit_end``. ``on_train_batch_start`` is provided.
    """

    _trainer_ref: Callable[[], pl.Trainer | None] = staticmethod(lambda: None)
    _batch_epoch = -1  # the epoch whose batches this process last ran
    _ended_epoch = -1  # the last epoch whose end this callback has handled
    _pending: Pending | None = None  # restored: (epoch, step) whose end is still due

    def _start_tracking(self, trainer: pl.Trainer) -> None:
        """Forget the previous fit's epochs (called from ``setup``)."""
        self._trainer_ref = weakref.ref(trainer)
        self._batch_epoch, self._ended_epoch, self._pending = -1, -1, None

    def _pending_now(self) -> Pending | None:
        """The epoch end a checkpoint written now would leave undone (saved in the callback state)."""
        return pending_epoch_end(self._trainer_ref(), self._batch_epoch, self._ended_epoch, self._pending)

    def _restore_pending(self, state_dict: dict[str, Any]) -> None:
        pending = state_dict.get("pending")
        self._pending = None if pending is None else (int(pending[0]), int(pending[1]))

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        self._batch_epoch = trainer.current_epoch

    def _epoch_ended(self, trainer: pl.Trainer) -> bool:
        """Mark the current epoch's end handled; True when it is the replay of a restored pending end."""
        replayed = self._pending is not None and self._pending[0] == trainer.current_epoch
        self._ended_epoch, self._pending = trainer.current_epoch, None
        return replayed

    def _overdue(self, trainer: pl.Trainer) -> Pending | None:
        """The restored epoch end Lightning went past (now handled by the caller), or None.

        (When Lightning replays that epoch's end instead, ``on_train_epoch_end`` takes it.)
        """
        pending = self._pending
        if pending is None or trainer.current_epoch <= pending[0]:
            return None
        self._pending, self._ended_epoch = None, pending[0]
        return pending
