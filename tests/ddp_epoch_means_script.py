"""Two-process CPU DDP run (gloo) recording each rank's batch losses and the epoch means the module logs.

Run by tests/test_step_structure.py as ``python tests/ddp_epoch_means_script.py OUT_DIR``; Lightning's ``ddp``
strategy re-executes this script for rank 1. Writes ``OUT_DIR/rank<r>.pt``.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402,F401  (this checkout is the package flatminima)
from flatminima.lightning_modules import SAM, Classifier  # noqa: E402


class Record(pl.Callback):
    """Every batch's (loss, size) of this rank, by stage."""

    def __init__(self) -> None:
        self.data: dict = {"train": [], "val": []}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.data["train"].append((float(outputs["loss"]), batch[0].shape[0]))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.data["val"].append((float(outputs), batch[0].shape[0]))


if __name__ == "__main__":
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(45, 3, generator=g, dtype=torch.float64)
    y = (x @ torch.randn(3, 3, generator=g, dtype=torch.float64)).argmax(1)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))
    model = Classifier(net, num_classes=3, optimizer=partial(torch.optim.SGD, lr=0.1), minimizer=SAM(0.05))
    record = Record()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        precision="64-true",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[record],
    )
    train = DataLoader(TensorDataset(x, y), batch_size=7)
    val = DataLoader(TensorDataset(x[:31], y[:31]), batch_size=5)
    trainer.fit(model, train, val)
    logged = trainer.callback_metrics
    record.data["logged"] = {k: v.clone() for k, v in logged.items() if k.startswith(("train/", "val/"))}
    torch.save(record.data, out / f"rank{trainer.global_rank}.pt")
