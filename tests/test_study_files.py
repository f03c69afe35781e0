"""The study files of configs/studies: each dry-runs; the full-size ones fit one step on format-faithful files.

Also pinned here: the values the CPU studies rely on (the report's stopping rule and PGA protocol in the pool
setups, the notebook options), the study figures added for them, and float64 epoch means (matrix sensing's
1e65 losses must survive the epoch logging).
"""

from __future__ import annotations

import io
import math
from functools import partial

import pytest
import torch
from fixtures_data import skip_md5, write_cifar10, write_mnist
from helpers import quiet_trainer

from flatminima import cli
from flatminima.lightning_modules import Regressor
from flatminima.lightning_modules.networks import MatrixFactorization
from flatminima.studies import commands, figures, runner
from flatminima.studies.spec import load

ROOT = cli.ROOT
STUDIES = sorted((ROOT / "configs" / "studies").glob("*.yaml"))
FULL_SIZE = [
    "minimum_sharpness_fashion_mnist",
    "minimum_sharpness_cifar10",
    "gradient_norm_cifar10",
    "adaptive_sharpness_fashion_mnist",
    "mnist_gsam",
    "sam_cifar10_rho",
    "sam_cifar10_norm",
    "sam_cifar10_architectures",
]


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_every_study_file_dry_runs_one_command_per_run(path, tmp_path):
    study = load(path.relative_to(ROOT))
    out = io.StringIO()
    assert commands.dry_run(study, tmp_path / "out", out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(f"# {study.name}: {len(study.runs())} runs")
    assert len(lines) == 1 + len(study.runs()) and all(" cli.py fit " in line for line in lines[1:])


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL_SIZE)
def test_full_size_study_fits_one_step_on_format_faithful_files(name, tmp_path, monkeypatch):
    """The first run of each full-size study, as the runner composes it, with fast_dev_run on tiny data files."""
    root = tmp_path / "data"
    write_cifar10(root, per_batch=2, test=4)
    write_mnist(root, "MNIST", train=8, test=4)
    write_mnist(root, "FashionMNIST", train=8, test=4)
    skip_md5(monkeypatch)
    study = load(f"configs/studies/{name}.yaml")
    args = list(runner.make_task(study.runs()[0], tmp_path / "out", 1, ROOT).args)
    small = ["--data.init_args.batch_size=2"] + (["--data.init_args.eval_batch_size=2"] if "cifar" in name else [])
    built = cli.main([*args, f"--data.init_args.data_dir={root}", "--trainer.fast_dev_run=true", *small])
    assert built.trainer.state.finished and built.trainer.global_step == 1
    assert torch.isfinite(built.trainer.callback_metrics["train/loss"])


# ---------------------------------------------------------------------------------------- the pool setups
def test_pool_setups_hold_the_report_protocol_and_the_notebook_options():
    def callbacks(config, *extra):
        built = cli.main(
            ["--config", f"configs/experiments/{config}.yaml", *extra, "--trainer.logger=false"], run=False
        )
        return built, {type(c).__name__: c for c in built.trainer.callbacks}

    for config, rho, min_epochs, max_epochs in (
        ("adaptive_sharpness_abalone", 0.025, 1, 10),
        ("adaptive_sharpness_cora", 0.02, 10, 20),
    ):
        built, found = callbacks(config)
        stop, sharp = found["RelativeLossStopping"], found["AdaptiveSharpness"]
        assert (stop.threshold, stop.min_epochs, stop.change_mode, built.trainer.max_epochs) == (
            0.05,
            min_epochs,
            "abs",
            max_epochs,
        )
        assert (sharp.rho, sharp.p, sharp.method, sharp.n_iters, sharp.step_size) == (rho, math.inf, "pga", 5, None)
        assert (sharp.batch_size, sharp.num_samples, sharp.sampling, sharp.score, sharp.train_mode) == (
            64,
            3200,
            "replacement",
            "batch",
            False,
        )
    assert built.datamodule.hparams.train_batch_nodes == 64 and built.model.train_subgraph_hops == 2
    assert built.model.net.conv1.heads == 1 and built.model.net.input_dropout == 0.0
    _, found = callbacks("adaptive_sharpness_abalone_notebook")
    assert found["AdaptiveSharpness"].box == "signed"
    _, found = callbacks("adaptive_sharpness_cora_notebook")
    sharp = found["AdaptiveSharpness"]
    assert (sharp.num_samples, sharp.batch_size, sharp.sampling, sharp.score, sharp.train_mode) == (
        320,
        64,
        "replacement",
        "train_set",
        True,
    )


# ---------------------------------------------------------------------------------------- float64 epoch means
def test_float64_runs_log_epoch_losses_beyond_the_float32_range():
    """A float64 matrix-sensing loss of ~1e44 is logged as such (float32 would make it inf); float32 runs log float32."""
    torch.manual_seed(0)
    a = torch.randn(6, 4, 4, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    losses = {}
    for precision in ("64-true", "32-true"):
        net = MatrixFactorization(dim=4, width=4)
        with torch.no_grad():
            net.U.fill_(1e10)  # U U^T = 4e20 everywhere: squared residuals ~1e42
        model = Regressor(net, optimizer=partial(torch.optim.SGD, lr=0.0), on_nonfinite="ignore")
        trainer = quiet_trainer(max_epochs=1, precision=precision, limit_val_batches=0)
        dtype = torch.float64 if precision == "64-true" else torch.float32
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(a.to(dtype), b.to(dtype)), batch_size=6)
        trainer.fit(model, loader)
        losses[precision] = trainer.callback_metrics["train/loss"]
    u = torch.full((4, 4), 1e10, dtype=torch.float64)
    expected = float(((torch.einsum("ijk,jk->i", a, u @ u.T) - b) ** 2).mean())
    assert 1e39 < expected < 1e300
    assert losses["64-true"].dtype == torch.float64 and float(losses["64-true"]) == pytest.approx(expected, rel=1e-12)
    assert losses["32-true"].dtype == torch.float32 and math.isinf(float(losses["32-true"]))


# ---------------------------------------------------------------------------------------- the added figures
def summaries() -> list[dict]:
    runs = []
    for rule in ("sam", "usam"):
        for rho in ("0.01", "0.1"):
            diverged = rule == "usam" and rho == "0.1"
            values = [5.0, 30.0, 7e7, None] if diverged else [5.0, 2.0, 1.0, 0.5]
            runs.append(
                {
                    "id": f"rule={rule}-rho={rho}-seed=0",
                    "status": "finished",
                    "axes": {"rule": rule, "rho": rho},
                    "seed": 0,
                    "metrics": {"train/grad_norm": 1.0 + len(runs), "test/loss": 2.0 + len(runs) % 3},
                    "history": {
                        "train/loss": [[e, e + 1, v] for e, v in enumerate(values)],
                        "train/acc": [[e, e + 1, 0.5 + e / 10] for e in range(4)],
                        "val/acc": [[e, e + 1, 0.45 + e / 10] for e in range(4)],
                    },
                }
            )
    return runs


def test_added_figures_are_made_for_the_study_figures():
    runs = summaries()
    rows = [
        {"x": "train/grad_norm", "y": "test/loss", "group": g, "n": 2, "tau": 1.0, "p": 0.3, "ci95": None}
        for g in ("all", "rule=sam", "rule=usam", "rho=0.01", "rho=0.1")
    ]
    result = {"x": ["train/grad_norm"], "y": ["test/loss"], "groups": ["rule", "rho"], "kendall": rows}
    made = dict(figures.make_all(runs, result))
    assert {
        "scatter-train_grad_norm-vs-test_loss-per-rule",
        "bars-train_grad_norm",
        "bars-test_loss",
        "curves-acc-rule",
        "curves-acc-rho",
        "runs-train_loss",
    } <= set(made)
    per_run = made["runs-train_loss"]
    panels = [ax for ax in per_run.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["rho=0.01", "rho=0.1"]  # panels: the second group axis
    assert all(ax.get_yscale() == "log" for ax in panels)
    lines = panels[1].get_lines()  # rho=0.1: sam (4 points), usam (3 finite points, then a cross)
    assert [len(line.get_xdata()) for line in lines] == [4, 3, 1]
    assert lines[2].get_marker() == "x" and lines[2].get_ydata()[0] == 7e7
    bars = made["bars-test_loss"]
    assert sorted(round(p.get_height(), 6) for ax in bars.axes for p in ax.patches) == [2.0, 2.0, 3.0, 4.0]
