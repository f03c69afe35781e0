"""Two-process CPU DDP runs (gloo) of the variants with per-rank state, recording what each rank saw and kept.

Run by tests/ddp_step_script.py (for tests/test_ddp_variants.py) after its own runs, in the same two processes;
alone as ``python tests/ddp_variants_script.py OUT_DIR``. Lightning's ``ddp`` strategy re-executes the script for
rank 1. For LookSAM (g_v), AdaptiveSteps (AE-SAM's statistics), RandomSteps (the draw)
and SAF (the store) it writes ``OUT_DIR/<name>_rank<r>.pt`` with the initial weights, every batch the rank trained
on, whether each step took pass 2, the rule's final state and the final weights.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402,F401  (this checkout is the package flatminima)
from flatminima.lightning_modules import SAM, Classifier  # noqa: E402
from flatminima.lightning_modules.minimizers import SAF, AdaptiveSteps, LookSAM, RandomSteps  # noqa: E402
from tests.efficient_reference import tanh_mlp  # noqa: E402


class Record(pl.Callback):
    """Keep the batches, whether pass 2 ran, the rule's state and the weights of this rank."""

    def __init__(self) -> None:
        self.data: dict = {"batches": [], "two_pass": []}

    def on_train_start(self, trainer, pl_module) -> None:
        self.data["initial"] = [p.detach().clone() for p in pl_module.net.parameters()]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.data["batches"].append([t.clone() for t in batch])
        self.data["two_pass"].append(False)

    def on_after_backward(self, trainer, pl_module) -> None:
        if pl_module.pass_index == 2:
            self.data["two_pass"][-1] = True

    def on_train_end(self, trainer, pl_module) -> None:
        self.data["final"] = [p.detach().clone() for p in pl_module.net.parameters()]
        self.data["state"] = pl_module.minimizer.state_dict()
        self.data["world_size"] = trainer.world_size


def run(out: Path, name: str, rule, epochs: int = 1) -> None:
    net = tanh_mlp()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, generator=g, dtype=torch.float64)
    y = (x @ torch.randn(3, 3, generator=g, dtype=torch.float64)).argmax(1)
    loader = DataLoader(TensorDataset(x, y, torch.arange(64)), batch_size=8, shuffle=False)
    model = Classifier(net, num_classes=3, optimizer=partial(torch.optim.SGD, lr=0.1), minimizer=rule)
    record = Record()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        precision="64-true",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
    )
    trainer.fit(model, loader)
    torch.save(record.data, out / f"{name}_rank{trainer.global_rank}.pt")


def run_variants(out_dir: Path) -> None:
    """The four runs, one after the other."""
    run(out_dir, "looksam", LookSAM(rho=0.05, k=2, alpha=0.7))
    run(out_dir, "adaptive", AdaptiveSteps(SAM(0.05), delta=0.5, c_start=1.5, c_end=-1.5))
    run(out_dir, "random", RandomSteps(SAM(0.05), p=0.5, seed=1))
    run(out_dir, "saf", SAF(lam=0.3, temperature=2.0, minus_epochs=1, start_epoch=0), epochs=2)


if __name__ == "__main__":
    run_variants(Path(sys.argv[1]))
