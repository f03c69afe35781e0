"""RunSummary in a foreign LightningModule: values as TensorBoard holds them, failures, no logger, gaps."""

from __future__ import annotations

import json
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flatminima.callbacks import RunSummary
from flatminima.callbacks.summary import gaps

QUIET = dict(
    enable_progress_bar=False,
    enable_model_summary=False,
    accelerator="cpu",
    devices=1,
    enable_checkpointing=False,
    num_sanity_val_steps=0,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def loader(n=64, seed=0, shuffle=False) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=16, shuffle=shuffle)


class Foreign(pl.LightningModule):
    """Automatic optimization, its own keys: ``train/loss``, ``train/acc``, ``val/loss``, ``test/*``, a custom
    per-epoch ``sharpness/weight_norm`` and a metric outside the usual prefixes."""

    def __init__(self, fail_at_epoch: int | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
        self.fail_at_epoch = fail_at_epoch

    def _step(self, batch, stage):
        x, y = batch
        out = self.net(x)
        loss = F.cross_entropy(out, y)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True)
        self.log(f"{stage}/acc", (out.argmax(1) == y).float().mean(), on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch, batch_idx):
        if self.current_epoch == self.fail_at_epoch:
            raise RuntimeError("boom")
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def on_train_epoch_end(self):
        norm = torch.cat([p.detach().reshape(-1) for p in self.parameters()]).norm()
        self.log("sharpness/weight_norm", norm)
        self.log("custom", float(self.current_epoch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_summary_of_a_foreign_module_holds_what_tensorboard_holds(tmp_path):
    pl.seed_everything(5)
    logger = TensorBoardLogger(tmp_path, name="", version="")
    summary = RunSummary(run_id="mine", axes={"net": "tiny"})
    trainer = pl.Trainer(max_epochs=3, logger=logger, callbacks=[summary], **QUIET)
    module = Foreign()
    trainer.fit(module, loader(shuffle=True), loader(seed=1))
    path = tmp_path / "summary.json"  # default: <log_dir>/summary.json
    after_fit = json.loads(path.read_text())
    assert after_fit["status"] == "finished" and after_fit["error"] is None
    assert after_fit["id"] == "mine" and after_fit["axes"] == {"net": "tiny"} and after_fit["seed"] == 5
    assert "test/acc" not in after_fit["metrics"]
    trainer.test(module, loader(seed=2))
    s = json.loads(path.read_text())
    tb = scalars(tmp_path)
    for key in (
        "train/loss",
        "train/acc",
        "val/loss",
        "val/acc",
        "test/loss",
        "test/acc",
        "sharpness/weight_norm",
        "custom",
    ):
        assert s["metrics"][key] == tb[key][-1][1], key  # the final value, exactly as TensorBoard stores it
    assert s["metrics"]["gap/acc"] == pytest.approx(s["metrics"]["train/acc"] - s["metrics"]["test/acc"], abs=0)
    assert s["metrics"]["gap/loss"] == pytest.approx(s["metrics"]["test/loss"] - s["metrics"]["train/loss"], abs=0)
    assert [(e, st, v) for e, st, v in s["history"]["train/loss"]] == [
        (e, st, v) for e, (st, v) in enumerate(tb["train/loss"])
    ]
    assert [(x["epoch"], x["step"], x["value"]) for x in s["sharpness"]] == [
        (e, st, v) for e, (st, v) in enumerate(tb["sharpness/weight_norm"])
    ]
    assert s["epochs"] == 3 and s["global_step"] == 12 and s["threshold_epoch"] is None
    assert s["wall_time_s"] > 0 and s["config"] is None


def test_finish_after_test_writes_only_once_the_test_ran(tmp_path):
    class Data(pl.LightningDataModule):
        def train_dataloader(self):
            return loader()

        def test_dataloader(self):
            return loader(seed=2)

    path = tmp_path / "s.json"
    trainer = pl.Trainer(
        max_epochs=1,
        logger=TensorBoardLogger(tmp_path),
        **QUIET,
        callbacks=[RunSummary(str(path), finish_after="test")],
    )
    module, data = Foreign(), Data()
    trainer.fit(module, datamodule=data)
    assert not path.exists()  # a test follows: a run killed now must not look finished
    trainer.test(module, datamodule=data)
    assert json.loads(path.read_text())["status"] == "finished"
    assert "test/acc" in json.loads(path.read_text())["metrics"]


def test_a_failing_fit_is_recorded_with_its_error_and_what_was_logged(tmp_path):
    path = tmp_path / "s.json"
    trainer = pl.Trainer(max_epochs=3, logger=TensorBoardLogger(tmp_path), callbacks=[RunSummary(str(path))], **QUIET)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(Foreign(fail_at_epoch=1), loader())
    s = json.loads(path.read_text())
    assert s["status"] == "failed" and s["error"] == "RuntimeError: boom"
    assert [e for e, _, _ in s["history"]["train/loss"]] == [0]


def test_without_a_logger_the_callback_metrics_are_the_values(tmp_path):
    path = tmp_path / "s.json"
    trainer = pl.Trainer(max_epochs=2, logger=False, callbacks=[RunSummary(str(path))], **QUIET)
    trainer.fit(Foreign(), loader())
    s = json.loads(path.read_text())
    assert s["metrics"]["train/loss"] == float(trainer.callback_metrics["train/loss"])
    assert s["history"] == {}


def test_gaps_are_positive_when_the_test_is_worse():
    got = gaps(
        {
            "train/acc": 0.9,
            "test/acc": 0.8,
            "train/loss": 0.1,
            "test/loss": 0.4,
            "train/mae": 1.0,
            "test/mae": 1.5,
            "train/other_acc": 1.0,
            "test/other_acc": 0.5,
            "train/x": 1.0,
            "val/x": 2.0,
        }
    )
    assert got == pytest.approx({"gap/acc": 0.1, "gap/loss": 0.3, "gap/mae": 0.5, "gap/other_acc": 0.5})


def test_gaps_take_the_final_weights_on_the_training_set_when_they_were_evaluated():
    got = gaps(
        {
            "train/acc": 0.9,
            "train_final/acc": 0.95,
            "test/acc": 0.8,
            "train/loss": 0.3,
            "test/loss": 0.4,
            "train_final/mae": 1.0,
            "test/mae": 1.5,
        }
    )
    assert got == pytest.approx({"gap/acc": 0.15, "gap/loss": 0.1, "gap/mae": 0.5})


def test_refuses_a_bad_finish_after():
    with pytest.raises(ValueError, match="Invalid finish_after: 'never'"):
        RunSummary(finish_after="never")


class Diverging(Foreign):
    """Logs an infinite training loss and a NaN sharpness in its last epoch (a run that diverged)."""

    def on_train_epoch_end(self):
        last = self.current_epoch == self.trainer.max_epochs - 1
        self.log("train/loss", float("inf") if last else 1.0)
        self.log("sharpness/weight_norm", float("nan") if last else 2.0)


def strict_json(text: str):
    """``json.loads`` refusing the NaN/Infinity tokens Python would otherwise accept."""

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_values_are_written_as_strings_and_read_back_as_floats(tmp_path):
    path = tmp_path / "s.json"
    trainer = pl.Trainer(max_epochs=2, logger=TensorBoardLogger(tmp_path), callbacks=[RunSummary(str(path))], **QUIET)
    module = Diverging()
    trainer.fit(module, loader())
    trainer.test(module, loader(seed=2))
    raw = strict_json(path.read_text())  # strict JSON: no NaN or Infinity tokens
    assert raw["metrics"]["train/loss"] == "inf" and raw["metrics"]["sharpness/weight_norm"] == "nan"
    assert raw["metrics"]["gap/loss"] == "-inf"  # test − train with train = ∞
    assert raw["history"]["train/loss"][-1][2] == "inf" and raw["sharpness"][-1]["value"] == "nan"
    from flatminima.formats.summary import decode, read_summary

    s = read_summary(path)
    assert s == decode(raw) and s["status"] == "finished"
    assert s["metrics"]["train/loss"] == math.inf and math.isnan(s["metrics"]["sharpness/weight_norm"])
    assert s["metrics"]["gap/loss"] == -math.inf and math.isfinite(s["metrics"]["test/loss"])
    assert s["history"]["train/loss"][-1][2] == math.inf and s["history"]["train/loss"][0][2] == 1.0
    assert math.isnan(s["sharpness"][-1]["value"]) and s["sharpness"][0]["value"] == 2.0
