"""Two-process CPU DDP (gloo) fit with the sharpness callbacks; run as a script, never imported by pytest.

Lightning's ``strategy="ddp"`` re-executes ``sys.argv`` for rank 1, so this must be a script
(tests/test_sharpness_callbacks.py runs it in a subprocess). Usage::

    python tests/ddp_measures_script.py OUT_DIR

Each rank writes ``OUT_DIR/rank<r>.json`` with the values its callbacks measured at the last
checkpoint (every rank measures its share of the fixed batches; sums are all-reduced). Rank 0 also
writes ``OUT_DIR/single.json``: the same measures on the final weights in one process, on all the
batches, with the pure functions of ``flatminima.callbacks.measures``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import cli  # noqa: E402,F401  (this checkout is the package flatminima)
from flatminima.callbacks import (  # noqa: E402
    AdaptiveSharpness,
    AverageSharpness,
    ComplexityMeasures,
    FinalTrainEvaluation,
    FisherRaoNorm,
    GradientNormSharpness,
    HessianSpectrum,
    LossThresholdCheckpoint,
    MinimumSharpness,
    PacBayesFlatness,
    WorstCaseSharpness,
    measures,
)


class Plain(pl.LightningModule):
    """A foreign LightningModule (automatic optimization) with a small conv-BN-ReLU chain."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(1, 3, 3),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(12, 4),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main(out: Path) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 1, 6, 6, generator=g)
    y = torch.randint(0, 4, (64,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)
    subset = dict(num_samples=40, batch_size=8)  # 5 batches: ranks take 3 and 2
    callbacks = [
        LossThresholdCheckpoint(threshold=float("inf"), every_n_epochs=1, dirpath=str(out / "ckpt")),
        MinimumSharpness(**subset),
        AdaptiveSharpness(rho=0.05, n_iters=5, **subset),
        HessianSpectrum(k=2, tol=1e-6, n_probes=8, **subset),
        GradientNormSharpness(rho=0.1, on_checkpoint=True, **subset),
        PacBayesFlatness(depth=5, samples=3, **subset),
        WorstCaseSharpness(depth=4, restarts=2, steps=2, **subset),
        AverageSharpness(rho=0.1, samples=3, **subset),
        ComplexityMeasures(**subset),
        FisherRaoNorm(**subset),
        FinalTrainEvaluation(on_checkpoint=True, batch_size=8),
    ]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        callbacks=callbacks,
        logger=False,
        default_root_dir=str(out),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = Plain()
    trainer.fit(module, loader)
    last = {}
    for cb in callbacks[1:]:
        last.update({k: v for k, v in cb.history[-1].items() if k not in ("epoch", "step")})
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(last))
    if trainer.global_rank == 0:
        net = module.net
        batches = callbacks[1]._batches
        parts = measures.adaptive_sharpness_parts(net, batches, 0.05, n_iters=5)
        single = {
            "sharpness/minimum": measures.minimum_sharpness(net, batches),
            "sharpness/adaptive": measures.adaptive_sharpness(net, batches, 0.05, n_iters=5),
            "sharpness/adaptive_ascent_loss": parts.ascent_loss,
            "sharpness/adaptive_clean_loss": parts.clean_loss,
            "sharpness/gradient_norm_subset": measures.gradient_norm_sharpness(net, batches, 0.1),
            "sharpness/hessian_trace": measures.hutchinson_trace(net, batches, n_probes=8).value,
        }
        eigs = measures.hessian_eigenvalues(net, batches, 2, tol=1e-6)
        single.update({f"sharpness/hessian_eig{i + 1}": v for i, v in enumerate(eigs)})
        initial = callbacks[5].initial
        single.update(
            {
                f"sharpness/{k}": v
                for k, v in measures.pac_bayes(net, batches, initial=initial, m=64, depth=5, samples=3).items()
            }
        )
        for key, magnitude_eps in (("sharpness_flatness", None), ("sharpness_mag_flatness", 1e-3)):
            alpha = measures.sharpness_alpha(net, batches, depth=4, restarts=2, steps=2, magnitude_eps=magnitude_eps)
            single[f"sharpness/{key}"] = 1 / alpha.radius**2
        single["sharpness/average"] = measures.average_sharpness(net, batches, 0.1, samples=3).value
        single.update({f"complexity/{k}": v for k, v in measures.norm_measures(net, batches, initial=initial).items()})
        single["complexity/fisher_rao"] = measures.fisher_rao_norm(net, batches)
        loss, acc = measures.loss_and_accuracy(net, [(x, y)], F.cross_entropy)
        single.update({"train_final/loss": loss, "train_final/acc": acc})
        (out / "single.json").write_text(json.dumps(single))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
