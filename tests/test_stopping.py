"""RelativeLossStopping: stops at exactly the epoch a prescribed (synthetic) loss curve dictates."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from flatminima.callbacks import LossThresholdCheckpoint, RelativeLossStopping
from flatminima.callbacks.stopping import relative_change

pytestmark = pytest.mark.usefixtures("one_thread")


class CurveModule(pl.LightningModule):
    """Logs ``train/loss`` = ``curve[e]`` at the end of training epoch e (0-based), as the tasks do."""

    def __init__(self, curve: list[float]) -> None:
        super().__init__()
        self.curve = curve
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.epochs_run = 0

    def training_step(self, batch, batch_idx):
        return (self.w * batch[0]).sum()

    def on_train_epoch_end(self) -> None:
        self.epochs_run += 1
        self.log("train/loss", self.curve[self.current_epoch], on_epoch=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.ones(2, 1)), batch_size=2)


def expected_stop(curve: list[float], threshold: float, min_epochs: int = 1, mode: str = "abs") -> int:
    """Epochs trained, written out from the rule: the first e >= max(2, min_epochs) with r_e < threshold."""
    for e in range(2, len(curve) + 1):
        prev, cur = curve[e - 2], curve[e - 1]
        r = abs(cur - prev) / abs(prev) if mode == "abs" else (prev - cur) / abs(prev)
        if e >= min_epochs and r < threshold:
            return e
    return len(curve)


def fit(curve, max_epochs=None, **kwargs):
    module = CurveModule(curve)
    stopper = RelativeLossStopping(**kwargs)
    trainer = quiet_trainer(max_epochs=max_epochs or len(curve), callbacks=[stopper])
    trainer.fit(module)
    return trainer, module, stopper


# relative changes: e2 0.5, e3 0.2, e4 0.1, e5 0.0278 (< 0.05), e6 ...
CURVE = [1.0, 0.5, 0.4, 0.36, 0.35, 0.30, 0.2999, 0.2998]


def test_stops_at_the_first_epoch_below_the_threshold():
    trainer, module, stopper = fit(CURVE, threshold=0.05)
    assert expected_stop(CURVE, 0.05) == 5
    assert module.epochs_run == 5 and trainer.current_epoch == 5 and stopper.stopped_epoch == 5
    assert [e for e, _ in stopper.relative_changes] == [2, 3, 4, 5]
    assert stopper.relative_changes[-1][1] == pytest.approx(0.01 / 0.36, rel=1e-5)  # logged as float32
    trainer, module, stopper = fit(CURVE, threshold=0.11)  # 0.1 at e4 is below 0.11
    assert module.epochs_run == 4 == expected_stop(CURVE, 0.11)


def test_threshold_is_strict():
    curve = [1.0, 0.5, 0.375, 0.3]  # e3: exactly 25 % (binary fractions), e4: 20 %
    _, module, _ = fit(curve, threshold=0.25)
    assert module.epochs_run == expected_stop(curve, 0.25) == 4


def test_min_epochs_holds_the_stop_back():
    """Cora: 'a minimum of 10 epochs'. Small changes early (e2, e3) do not stop a run held to >= 10 epochs."""
    curve = [1.0, 0.99, 0.98] + [0.98 * 0.5**k for k in range(1, 9)] + [0.98 * 0.5**8 * 0.999, 0.001, 0.0005]
    assert len(curve) == 14
    _, free, _ = fit(curve, threshold=0.05)
    assert free.epochs_run == 2
    trainer, held, stopper = fit(curve, threshold=0.05, min_epochs=10)
    # e10, e11 halve the loss (r = 0.5); e12 changes it by 0.1 %: the first epoch >= 10 below 5 %
    assert held.epochs_run == 12 == expected_stop(curve, 0.05, min_epochs=10) and stopper.stopped_epoch == 12
    _, notebook, _ = fit(curve, threshold=0.05, min_epochs=11)  # the notebook's `epoch >= 10` (0-based)
    assert notebook.epochs_run == 12


def test_max_epochs_ends_a_run_that_never_settles():
    curve = [2.0**-k for k in range(6)]  # halves every epoch
    _, module, stopper = fit(curve, threshold=0.05)
    assert module.epochs_run == 6 and stopper.stopped_epoch == 0


def test_decrease_mode_stops_on_a_rising_loss():
    """The Abalone notebook: continue while (L_{e-1} - L_e) / L_{e-1} >= 5 %, so a rise stops too."""
    curve = [1.0, 0.8, 0.9, 0.5, 0.1]
    _, absolute, _ = fit(curve, threshold=0.05)
    assert absolute.epochs_run == 5  # |0.9 - 0.8| / 0.8 = 12.5 %: continue
    _, decrease, stopper = fit(curve, threshold=0.05, mode="decrease")
    assert decrease.epochs_run == 3 == expected_stop(curve, 0.05, mode="decrease")
    assert stopper.relative_changes[-1][1] == pytest.approx(-0.125, rel=1e-5)


def test_resumed_run_stops_where_the_uninterrupted_one_does(tmp_path):
    """The previous epoch value is callback state: after a resume at epoch 3 the rule still sees L_3."""
    curve = [1.0, 0.5, 0.25, 0.249, 0.2, 0.1, 0.05, 0.049]
    _, whole, _ = fit(curve, threshold=0.05)
    assert whole.epochs_run == 4
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    first = quiet_trainer(
        max_epochs=3, callbacks=[RelativeLossStopping(threshold=0.05), ckpt], enable_checkpointing=True
    )
    first.fit(CurveModule(curve))
    stopper = RelativeLossStopping(threshold=0.05)
    resumed = CurveModule(curve)
    second = quiet_trainer(max_epochs=len(curve), callbacks=[stopper], enable_checkpointing=False)
    second.fit(resumed, ckpt_path=tmp_path / "last.ckpt")
    assert resumed.epochs_run == 1 and second.current_epoch == 4 and stopper.stopped_epoch == 4


def test_loss_threshold_checkpoint_saves_the_stopped_epoch(tmp_path):
    """The stop is decided before LossThresholdCheckpoint's end-of-epoch check, which then saves that epoch."""
    saver = LossThresholdCheckpoint(threshold=-math.inf, every_n_epochs=0, dirpath=str(tmp_path))
    trainer = quiet_trainer(
        max_epochs=len(CURVE), callbacks=[saver, RelativeLossStopping(threshold=0.05)], enable_checkpointing=True
    )
    trainer.fit(CurveModule(CURVE))
    assert [(s["reason"], s["epoch"]) for s in saver.saved] == [("end", 4)]  # 0-based epoch 4: the fifth


def test_relative_change_and_bad_arguments():
    assert relative_change(2.0, 1.5) == pytest.approx(0.25)
    assert relative_change(2.0, 2.5) == pytest.approx(0.25)
    assert relative_change(2.0, 2.5, "decrease") == pytest.approx(-0.25)
    assert relative_change(-2.0, -1.0) == pytest.approx(0.5)
    assert relative_change(0.0, 0.0) == 0.0 and relative_change(0.0, 1.0) == math.inf
    assert math.isnan(relative_change(1.0, math.nan)) and math.isnan(relative_change(math.inf, 1.0))
    for kwargs, name in [
        ({"threshold": 0}, "threshold"),
        ({"threshold": math.nan}, "threshold"),
        ({"min_epochs": 0}, "min_epochs"),
        ({"mode": "rel"}, "mode"),
        ({"monitor": ""}, "monitor"),
    ]:
        with pytest.raises(ValueError, match=f"Invalid {name}: "):
            RelativeLossStopping(**kwargs)


def test_unlogged_monitor_is_a_clear_error():
    module = CurveModule([1.0, 0.5])
    trainer = quiet_trainer(max_epochs=2, callbacks=[RelativeLossStopping(monitor="train/nothing")])
    with pytest.raises(ValueError, match="Invalid monitor: 'train/nothing' was not logged"):
        trainer.fit(module)


def test_non_finite_loss_never_counts_as_converged():
    curve = [1.0, math.nan, math.nan, 0.5]
    _, module, _ = fit(curve, threshold=0.05)
    assert module.epochs_run == 4
