"""Two-process CPU DDP run (gloo) of the two-pass step, recording what each rank saw.

Run by tests/test_ddp.py as ``python tests/ddp_step_script.py OUT_DIR``; Lightning's ``ddp``
strategy re-executes this script for rank 1. For GSAM with each ascent mode
and for SAM with the per-replica ascent (and both again with
gradient accumulation in the module) it writes ``OUT_DIR/<name>_rank<r>.pt`` with the initial weights, every batch the rank trained on, the
rank's pass-1 gradient of every step, and the final weights. The variants with per-rank state follow
(tests/ddp_variants_script.py, run in this same process to pay for one DDP start-up).
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
from flatminima.lightning_modules import GSAM, SAM, Classifier  # noqa: E402
from tests.ddp_variants_script import run_variants  # noqa: E402

STEPS = 3


class Record(pl.Callback):
    """Keep the batches, the pass-1 gradients and the weights of this rank."""

    def __init__(self) -> None:
        self.data: dict = {"batches": [], "grads1": []}

    def on_train_start(self, trainer, pl_module) -> None:
        self.data["initial"] = [p.detach().clone() for p in pl_module.net.parameters()]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.data["batches"].append([t.clone() for t in batch])

    def on_after_backward(self, trainer, pl_module) -> None:
        if pl_module.pass_index == 1:
            self.data["grads1"].append(torch.cat([p.grad.flatten() for p in pl_module.net.parameters()]))

    def on_train_end(self, trainer, pl_module) -> None:
        self.data["final"] = [p.detach().clone() for p in pl_module.net.parameters()]
        self.data["world_size"] = trainer.world_size


def run(out: Path, name: str, mode: str, rule, accumulate: int = 1) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, generator=g)
    y = (x @ torch.randn(3, 3, generator=g)).argmax(1)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)
    model = Classifier(
        net,
        num_classes=3,
        optimizer=partial(torch.optim.SGD, lr=0.1),
        minimizer=rule,
        ascent=mode,
        accumulate_grad_batches=accumulate,
    )
    record = Record()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        precision="64-true",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
    )
    trainer.fit(model, loader)
    torch.save(record.data, out / f"{name}_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    run(out_dir, "replica", "replica", GSAM(rho=0.05, alpha=0.3))
    run(out_dir, "global", "global", GSAM(rho=0.05, alpha=0.3))
    run(out_dir, "replica_sam", "replica", SAM(rho=0.05))
    run(out_dir, "global_acc", "global", GSAM(rho=0.05, alpha=0.3), accumulate=2)
    run(out_dir, "replica_sam_acc", "replica", SAM(rho=0.05), accumulate=4)
    run_variants(out_dir)
