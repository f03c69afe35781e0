"""Two-process DDP run of the two-pass step (nccl on 2 GPUs, or gloo on 2 CPU processes).

``ddp_rows`` (called by ``benchmarks/gpu_check.py``) runs this file as a script in a subprocess:
``python benchmarks/gpu_check_ddp.py OUT_DIR {gpu|cpu}``. Lightning's ``ddp`` strategy re-executes
it for rank 1. For GSAM with ``ascent="replica"`` and ``ascent="global"`` each rank writes
``OUT_DIR/<ascent>_rank<r>.pt``: its pass-1 gradient of every step and its final weights. The check:
on both ranks the final weights are bit-identical; with the per-replica ascent the ranks' pass-1
gradients differ (no all-reduce in pass 1), with the global ascent they agree; the two ascents end
at different weights.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_check_common import CLASSES, ROOT, Row, Settings, bn_cnn, loader, make_batches, verdict  # noqa: E402

from flatminima.lightning_modules import GSAM, Classifier  # noqa: E402

STEPS = 3
ASCENTS = ("replica", "global")


class Record(pl.Callback):
    """Keep this rank's pass-1 gradients and final weights (on the CPU)."""

    def __init__(self) -> None:
        self.data: dict = {"grads1": []}

    def on_after_backward(self, trainer, pl_module) -> None:
        if pl_module.pass_index == 1:
            self.data["grads1"].append(torch.cat([p.grad.flatten() for p in pl_module.net.parameters()]).cpu())

    def on_train_end(self, trainer, pl_module) -> None:
        self.data["final"] = [p.detach().cpu().clone() for p in pl_module.net.parameters()]
        self.data["world_size"] = trainer.world_size


def run(out: Path, accelerator: str, ascent: str) -> None:
    """Train the BN CNN for STEPS steps with GSAM on 2 devices; each rank saves what it saw."""
    batches = make_batches(2 * STEPS, 8, 8, seed=5, dtype=torch.float32)  # the sampler splits them over the ranks
    model = Classifier(
        bn_cnn(8),
        num_classes=CLASSES,
        optimizer=partial(torch.optim.SGD, lr=0.1),
        minimizer=GSAM(rho=0.05, alpha=0.3),
        ascent=ascent,
    )
    record = Record()
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=2,
        strategy="ddp",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
    )
    trainer.fit(model, loader(batches))
    torch.save(record.data, out / f"{ascent}_rank{trainer.global_rank}.pt")


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def ddp_rows(s: Settings) -> Iterator[Row]:
    """Run the script on 2 devices and check the recorded ranks (or one 'skipped' row)."""
    if s.ddp not in ("nccl", "gloo"):
        yield Row("ddp", "2-process DDP, ascent replica and global: weights identical on both ranks", "skip", s.ddp)
        return
    start = time.perf_counter()
    accelerator = "gpu" if s.ddp == "nccl" else "cpu"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory(prefix="gpu_check_ddp_") as tmp:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), tmp, accelerator],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=s.timeout_s,
        )
        if proc.returncode == 0:
            runs = {a: [torch.load(Path(tmp) / f"{a}_rank{r}.pt", weights_only=True) for r in (0, 1)] for a in ASCENTS}
    seconds = time.perf_counter() - start
    if proc.returncode:
        tail = " ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])[-300:]
        yield Row("ddp", f"2-process DDP ({s.ddp}) run", "FAIL", f"exit {proc.returncode}: {tail}", "", seconds)
        return
    for ascent in ASCENTS:
        r0, r1 = runs[ascent]
        same = _equal(r0["final"], r1["final"])
        grads_equal = all(torch.allclose(a, b, rtol=1e-6, atol=0) for a, b in zip(r0["grads1"], r1["grads1"]))
        expect_equal = ascent == "global"
        ok = same and grads_equal == expect_equal and r0["world_size"] == 2
        yield Row(
            "ddp",
            f"GSAM, ascent {ascent}, 2 ranks ({s.ddp}): final weights bit-identical on both ranks",
            verdict(ok),
            f"identical {same}; pass-1 grads {'equal' if grads_equal else 'differ'} across ranks",
            f"identical; grads {'equal' if expect_equal else 'differ'}",
            seconds if ascent == "replica" else None,
            dict(identical=same, pass1_grads_equal=grads_equal, world_size=r0["world_size"]),
        )
    differ = not _equal(runs["replica"][0]["final"], runs["global"][0]["final"])
    yield Row(
        "ddp", "ascent replica and global end at different weights", verdict(differ), f"differ {differ}", "differ", None
    )


if __name__ == "__main__":
    for mode in ASCENTS:
        run(Path(sys.argv[1]), sys.argv[2], mode)
