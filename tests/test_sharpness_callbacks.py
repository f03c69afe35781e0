"""The sharpness callbacks and LossThresholdCheckpoint inside real Lightning fits.

The callbacks are used with plain LightningModules written here (automatic optimization) and, for
the gradient-norm callback's pass-1 contract, with the project's two-pass SAM module. Values are
checked against the pure functions on the same fixed subset; the schedule against epochs worked out
by hand; DDP in a 2-process subprocess (tests/ddp_measures_script.py).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from flatminima.callbacks import (
    AdaptiveSharpness,
    GradientNormSharpness,
    HessianSpectrum,
    LossThresholdCheckpoint,
    MinimumSharpness,
    measures,
)

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)


pytestmark = pytest.mark.usefixtures("one_thread")


def dataset(n=96, seed=0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return TensorDataset(x, y)


class Plain(pl.LightningModule):
    """A foreign LightningModule in automatic optimization; the network is ``self.model``.

    ``scripted`` replaces the logged ``train/loss`` by a value per epoch (the schedule tests); the
    module counts its forward calls and backward passes and records its own gradient norms.
    """

    def __init__(self, scripted: list[float] | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        self.scripted = scripted
        self.forwards = 0
        self.backwards = 0
        self.grad_norms: list[float] = []
        self.model[0].weight.register_hook(self._count_backward)
        self.model.register_forward_hook(self._count_forward)

    def _count_forward(self, *args):
        self.forwards += 1

    def _count_backward(self, grad):
        self.backwards += 1

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        logged = loss if self.scripted is None else torch.tensor(self.scripted[self.current_epoch])
        self.log("train/loss", logged, on_step=False, on_epoch=True)
        return loss

    def on_before_optimizer_step(self, optimizer):
        grads = [p.grad for p in self.parameters()]
        self.grad_norms.append(float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads]))))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def subset_batches(data: Dataset, indices: list[int], batch_size: int) -> list:
    """The callback's fixed subset, rebuilt independently from the stored indices."""
    x = torch.stack([data[i][0] for i in indices])
    y = torch.stack([data[i][1] for i in indices])
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(indices), batch_size)]


# ---------------------------------------------------------------------------------------- values and storage
def test_callbacks_in_a_foreign_module_log_and_store_the_pure_function_values(tmp_path):
    data = dataset()
    loader = DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    ckpt = LossThresholdCheckpoint(threshold=0.9, every_n_epochs=2, dirpath=str(tmp_path / "ckpt"))
    minimum = MinimumSharpness(num_samples=50, batch_size=20, seed=3)
    adaptive = AdaptiveSharpness(rho=0.02, n_iters=6, num_samples=40, batch_size=20)
    hessian = HessianSpectrum(k=2, tol=1e-6, n_probes=6, num_samples=40, batch_size=40)
    grad = GradientNormSharpness(rho=0.05, every_n_epochs=3, num_samples=30, batch_size=10)
    module = Plain()
    trainer = pl.Trainer(
        max_epochs=3,
        callbacks=[ckpt, minimum, adaptive, hessian, grad],
        logger=CSVLogger(tmp_path),
        default_root_dir=tmp_path,
        **QUIET,
    )
    trainer.fit(module, loader)

    # The checkpoint fired once training loss <= 0.9 (and at the end); measures ran at those saves only.
    assert ckpt.saved and ckpt.saved[-1]["epoch"] == 2
    assert [h["epoch"] for h in minimum.history] == [s["epoch"] for s in ckpt.saved]
    assert [h["epoch"] for h in grad.history] == [2]  # every_n_epochs=3 only (on_checkpoint is off by default)
    last = torch.load(ckpt.saved[-1]["path"], weights_only=False)
    assert last["loss_threshold"]["epoch"] == 2
    stored = last["sharpness"]
    expected_keys = {
        "sharpness/minimum",
        "sharpness/minimum_trace",
        "sharpness/adaptive",
        "sharpness/adaptive_ascent_loss",
        "sharpness/adaptive_clean_loss",
        "sharpness/adaptive_ascent_falls",
        "sharpness/hessian_eig1",
        "sharpness/hessian_eig2",
        "sharpness/hessian_trace",
        "sharpness/hessian_trace_stderr",
        "sharpness/gradient_norm_subset",
    }
    assert set(stored) == expected_keys
    for key in expected_keys:
        assert float(trainer.callback_metrics[key]) == pytest.approx(stored[key], rel=1e-6)
    assert "sharpness/gradient_norm" in trainer.callback_metrics

    # The same numbers from the pure functions on the final weights and the stored subsets.
    net = module.model
    drawn = torch.randperm(len(data), generator=torch.Generator().manual_seed(3))[:50].tolist()
    assert minimum.state_dict()["indices"] == drawn
    ms_batches = subset_batches(data, minimum.state_dict()["indices"], 20)
    assert stored["sharpness/minimum"] == pytest.approx(measures.minimum_sharpness(net, ms_batches), rel=1e-12)
    ad_batches = subset_batches(data, adaptive.state_dict()["indices"], 20)
    assert stored["sharpness/adaptive"] == pytest.approx(
        measures.adaptive_sharpness(net, ad_batches, 0.02, n_iters=6), rel=1e-12
    )
    h_batches = subset_batches(data, hessian.state_dict()["indices"], 40)
    assert [stored["sharpness/hessian_eig1"], stored["sharpness/hessian_eig2"]] == pytest.approx(
        measures.hessian_eigenvalues(net, h_batches, 2, tol=1e-6), rel=1e-12
    )
    gn_batches = subset_batches(data, grad.state_dict()["indices"], 10)
    assert stored["sharpness/gradient_norm_subset"] == pytest.approx(
        measures.gradient_norm_sharpness(net, gn_batches, 0.05), rel=1e-12
    )
    assert not any(p.grad is None for p in net.parameters())  # training state untouched by the measures


def test_gradient_norm_sharpness_adds_no_forward_or_backward(tmp_path):
    loader = DataLoader(dataset(), batch_size=16)
    counts = []
    for callbacks in ([], [GradientNormSharpness(rho=0.05)]):
        module = Plain()
        trainer = pl.Trainer(
            max_epochs=2,
            callbacks=callbacks,
            logger=False,
            default_root_dir=tmp_path,
            enable_checkpointing=False,
            **QUIET,
        )
        trainer.fit(module, loader)
        counts.append((module.forwards, module.backwards))
    assert counts[0] == counts[1] == (12, 12)
    # The logged epoch mean is ρ·mean‖g‖ of the last epoch's steps, as the module computed them itself.
    assert float(trainer.callback_metrics["sharpness/gradient_norm"]) == pytest.approx(
        0.05 * sum(module.grad_norms[6:]) / 6, rel=1e-5
    )
    assert float(trainer.callback_metrics["sharpness/gradient_norm_step"]) == pytest.approx(
        0.05 * module.grad_norms[-1], rel=1e-5
    )


def test_gradient_norm_sharpness_reads_the_clean_pass_of_the_sam_module(tmp_path):
    from flatminima.lightning_modules import Classifier
    from flatminima.lightning_modules.minimizers import SAM

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    module = Classifier(net, num_classes=3, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), minimizer=SAM(rho=0.3))
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[GradientNormSharpness(rho=0.5)],
        logger=False,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        **QUIET,
    )
    trainer.fit(module, DataLoader(dataset(), batch_size=16))
    # train/grad_norm is the module's own pass-1 ‖∇L_B(w)‖ (epoch mean over equal batches).
    assert float(trainer.callback_metrics["sharpness/gradient_norm"]) == pytest.approx(
        0.5 * float(trainer.callback_metrics["train/grad_norm"]), rel=1e-5
    )


# ---------------------------------------------------------------------------------------- the schedule
LOSSES = [1.0, 0.5, 0.2, 0.009, 0.02, 0.03, 0.008, 0.001, 0.001, 0.001, 0.001, 0.001]


def _fit_schedule(tmp_path, max_epochs, anchor="threshold", ckpt_path=None):
    ckpt = LossThresholdCheckpoint(threshold=0.01, every_n_epochs=3, anchor=anchor, dirpath=str(tmp_path / anchor))
    measure = MinimumSharpness(num_samples=20, batch_size=20)
    trainer = pl.Trainer(
        max_epochs=max_epochs, callbacks=[ckpt, measure], logger=False, default_root_dir=tmp_path, **QUIET
    )
    trainer.fit(Plain(LOSSES), DataLoader(dataset(48), batch_size=16), ckpt_path=ckpt_path)
    return ckpt, measure


def test_loss_threshold_schedule_and_resume(tmp_path):
    # First epoch with loss <= 0.01 is epoch 3; then 6, 9, ...; the end of fit (epoch 7) is saved too.
    ckpt, measure = _fit_schedule(tmp_path, 8)
    assert [(s["epoch"], s["reason"]) for s in ckpt.saved] == [(3, "threshold"), (6, "periodic"), (7, "end")]
    assert [h["epoch"] for h in measure.history] == [3, 6, 7]
    for s in ckpt.saved:
        stored = torch.load(s["path"], weights_only=False)
        assert stored["loss_threshold"]["reason"] == s["reason"] and "sharpness/minimum" in stored["sharpness"]
    # Resume from the epoch-6 checkpoint: the threshold epoch, the history and the subset come back.
    resumed, measure2 = _fit_schedule(tmp_path, 11, ckpt_path=ckpt.saved[1]["path"])
    assert resumed.threshold_epoch == 3
    assert [(s["epoch"], s["reason"]) for s in resumed.saved] == [
        (3, "threshold"),
        (6, "periodic"),
        (9, "periodic"),
        (10, "end"),
    ]
    assert [h["epoch"] for h in measure2.history] == [3, 6, 9, 10]
    assert measure2.state_dict()["indices"] == measure.state_dict()["indices"]


def test_the_values_are_stored_once_and_older_checkpoints_holding_them_twice_resume_alike(tmp_path):
    ckpt, measure = _fit_schedule(tmp_path / "first", 8)
    file = torch.load(ckpt.saved[1]["path"], weights_only=False)
    records = file["callbacks"][ckpt.state_key]["saved"]
    assert [r["epoch"] for r in records] == [3, 6] and not any(k.startswith("sharpness/") for r in records for k in r)
    for r in records:  # the format written before: each save record also held the values of its measures
        r.update(
            {
                k: v
                for h in measure.history
                if h["epoch"] == r["epoch"]
                for k, v in h.items()
                if k.startswith("sharpness/")
            }
        )
    torch.save(file, tmp_path / "older.ckpt")
    resumed, _ = _fit_schedule(tmp_path / "resumed", 11, ckpt_path=str(tmp_path / "older.ckpt"))
    full, _ = _fit_schedule(tmp_path / "full", 11)
    assert [{k: v for k, v in s.items() if k != "path"} for s in resumed.saved] == [
        {k: v for k, v in s.items() if k != "path"} for s in full.saved
    ]
    assert all("sharpness/minimum" in s for s in full.saved)
    assert not any(k.startswith("sharpness/") for r in resumed.state_dict()["saved"] for k in r)


def test_loss_threshold_schedule_anchored_at_epoch_zero(tmp_path):
    # Bejan et al.'s wording: after the threshold epoch (3), every epoch count divisible by 3 (epochs 5, 8).
    ckpt, _ = _fit_schedule(tmp_path, 9, anchor="zero")
    assert [(s["epoch"], s["reason"]) for s in ckpt.saved] == [(3, "threshold"), (5, "periodic"), (8, "periodic")]


class Silent(Plain):
    """Logs ``loss`` only: a LossThresholdCheckpoint monitoring ``train/loss`` can never decide."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("loss", loss, on_epoch=True)
        return loss


def test_missing_monitor_is_reported_with_the_logged_names(tmp_path):
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[LossThresholdCheckpoint(dirpath=str(tmp_path))], logger=False, **QUIET
    )
    with pytest.raises(ValueError, match=r"Invalid monitor: 'train/loss'.*'loss'"):
        trainer.fit(Silent(), DataLoader(dataset(32), batch_size=16))


# ---------------------------------------------------------------------------------------- inputs and options
class DictData(Dataset):
    """:func:`dataset` as dict samples ``{"features", "label"}`` (a batch the measures cannot read by default)."""

    def __init__(self, n: int = 40) -> None:
        self.inner = dataset(n)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i):
        x, y = self.inner[i]
        return {"features": x, "label": y}


def test_batch_to_inputs_and_network_path(tmp_path):
    class DictModule(Plain):
        def training_step(self, batch, batch_idx):
            loss = F.cross_entropy(self(batch["features"]), batch["label"])
            self.log("train/loss", loss, on_epoch=True, on_step=False)
            return loss

    callback = AdaptiveSharpness(
        rho=0.01,
        n_iters=3,
        num_samples=None,
        batch_size=40,
        every_n_epochs=1,
        on_checkpoint=False,
        network="model",
        batch_to_inputs=lambda b: (b["features"], b["label"]),
    )
    module = DictModule()
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[callback], logger=False, default_root_dir=tmp_path, enable_checkpointing=False, **QUIET
    )
    trainer.fit(module, DataLoader(DictData(), batch_size=20))
    x = torch.stack([DictData()[i]["features"] for i in callback.state_dict()["indices"]])
    y = torch.stack([DictData()[i]["label"] for i in callback.state_dict()["indices"]])
    assert sorted(callback.state_dict()["indices"]) == list(range(40))
    assert callback.history[-1]["sharpness/adaptive"] == pytest.approx(
        measures.adaptive_sharpness(module.model, [(x, y)], 0.01, n_iters=3), rel=1e-12
    )


def test_a_measure_without_trigger_warns(tmp_path):
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[MinimumSharpness()],
        logger=False,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        **QUIET,
    )
    with pytest.warns(UserWarning, match="will not measure"):
        trainer.fit(Plain(), DataLoader(dataset(32), batch_size=16))


def test_any_callback_with_the_trigger_capability_runs_the_checkpoint_measures(tmp_path, recwarn):
    from flatminima.callbacks.base import measure_on_save

    class EveryEpoch(pl.Callback):  # not a LossThresholdCheckpoint: found by triggers_measures alone
        triggers_measures = True

        def on_train_epoch_end(self, trainer, pl_module):
            measure_on_save(trainer, pl_module)

    measure = MinimumSharpness(num_samples=20, batch_size=20)
    idle = MinimumSharpness(name="idle", on_checkpoint=False)
    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=[EveryEpoch(), measure, idle],
        logger=False,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        **QUIET,
    )
    trainer.fit(Plain(), DataLoader(dataset(32), batch_size=16))
    assert [h["epoch"] for h in measure.history] == [0, 1] and idle.history == []
    messages = [str(w.message) for w in recwarn if "will not measure" in str(w.message)]
    assert messages == [
        "MinimumSharpness('idle') will not measure: it has every_n_epochs=None, at_end=False and "
        "on_checkpoint=False; add flatminima.callbacks.LossThresholdCheckpoint or set every_n_epochs or at_end"
    ]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: AdaptiveSharpness(rho=-0.1), "Invalid rho: -0.1; expected a finite rho >= 0"),
        (lambda: AdaptiveSharpness(rho=0.1, p=1.0), "Invalid p: 1.0"),
        (lambda: MinimumSharpness(solver="adam"), "Invalid solver: 'adam'"),
        (lambda: MinimumSharpness(num_samples=0), "Invalid num_samples: 0; expected an integer >= 1"),
        (lambda: HessianSpectrum(k=0, trace="none"), "Invalid k: 0"),
        (lambda: HessianSpectrum(trace="exact", loss_fn=F.mse_loss), "Invalid trace"),
        (lambda: GradientNormSharpness(name="a/b"), "Invalid name: 'a/b'"),
        (lambda: LossThresholdCheckpoint(every_n_epochs=-1), "Invalid every_n_epochs: -1"),
        (lambda: LossThresholdCheckpoint(anchor="one"), "Invalid anchor: 'one'"),
        (lambda: LossThresholdCheckpoint(threshold=math.nan), "Invalid threshold: nan"),
    ],
)
def test_bad_callback_arguments_are_refused(make, message):
    import re

    with pytest.raises(ValueError, match=re.escape(message)):
        make()


# ---------------------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_two_process_ddp_gives_every_rank_the_single_process_values(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "ddp_measures_script.py"), str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    single = json.loads((tmp_path / "single.json").read_text())
    assert rank0 == rank1  # all-reduced sums: bit-identical on every rank
    assert set(single) <= set(rank0)
    for key, value in single.items():
        assert rank0[key] == pytest.approx(value, rel=2e-5), key  # fp32 sums in another order


# ---------------------------------------------------------------------------------------- the CLI presets
@pytest.mark.slow
def test_cli_presets_compose_and_measure_at_the_end_of_fit(tmp_path):
    from flatminima.cli import main

    presets = ["loss_threshold", "minimum_sharpness", "adaptive_sharpness", "gradient_norm", "hessian"]
    args = ["fit", "--config", str(ROOT / "configs/experiments/moons_gsam.yaml")]
    for name in presets:
        args += ["--config", str(ROOT / f"configs/callbacks/{name}.yaml")]
    args += [
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=4",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--data.init_args.num_samples=4000",
        "--test_after_fit=false",
    ]
    cli = main(args)
    kinds = {type(c).__name__ for c in cli.trainer.callbacks}
    assert {
        "LearningRateMonitor",
        "LossThresholdCheckpoint",
        "MinimumSharpness",
        "AdaptiveSharpness",
        "GradientNormSharpness",
        "HessianSpectrum",
    } <= kinds
    ckpt = next(c for c in cli.trainer.callbacks if isinstance(c, LossThresholdCheckpoint))
    assert [s["reason"] for s in ckpt.saved] == ["end"]
    stored = torch.load(ckpt.saved[0]["path"], weights_only=False)["sharpness"]
    assert {"sharpness/minimum", "sharpness/adaptive", "sharpness/hessian_eig1", "sharpness/hessian_trace"} <= set(
        stored
    )
    assert "sharpness/gradient_norm" in cli.trainer.callback_metrics
