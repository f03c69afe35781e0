"""The command line: the embedded default, composition of presets, and bad input refused early."""

from __future__ import annotations

import math

import pytest
import torch

import cli
from lightning_modules import SAM, USAM, Classifier
from lightning_modules.optim import AdaShift


def test_default_config_only_without_user_configs():
    assert cli.with_default_config(["fit"]) == ["fit", "--config", str(cli.DEFAULT_CONFIG)]
    assert cli.with_default_config(["fit", "--trainer.max_epochs=1"])[1:3] == ["--config", str(cli.DEFAULT_CONFIG)]
    assert cli.with_default_config(["fit", "--config", "x.yaml"]) == ["fit", "--config", "x.yaml"]
    assert cli.with_default_config(["fit", "-c=x.yaml"]) == ["fit", "-c=x.yaml"]
    assert cli.with_default_config(["test", "--ckpt_path", "a"]) == ["test", "--ckpt_path", "a"]


def test_print_config_shows_the_moons_gsam_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    for expected in ("lightning_modules.minimizers.GSAM", "datamodules.MoonsDataModule", "num_samples: 10000",
                     "noise: 0.3", "batch_size: 64", "max_epochs: 50", "TensorBoardLogger"):
        assert expected in out


def test_the_default_fit_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = cli.main(["fit", "--trainer.fast_dev_run=2", "--data.init_args.num_samples=300"])
    assert run.trainer.global_step == 2
    assert isinstance(run.model, Classifier)


def _compose(*names, extra=()):
    files = ["--config=" + str(cli.ROOT / "configs" / n) for n in names]
    return cli.main([*files, "--trainer.logger=false", *extra], run=False)


def test_any_base_combines_with_any_rule_from_two_files():
    run = _compose("data/moons.yaml", "model/mlp.yaml", "optim/adashift.yaml", "minimizer/sam_linf.yaml")
    assert isinstance(run.model.minimizer, SAM) and run.model.minimizer.p == math.inf
    assert isinstance(run.model.configure_optimizers(), AdaShift)
    run = _compose("data/moons.yaml", "model/mlp.yaml", "optim/phb.yaml", "minimizer/usam.yaml")
    opt = run.model.configure_optimizers()
    assert isinstance(run.model.minimizer, USAM)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.8
    run = _compose("data/moons.yaml", "model/mlp.yaml", "optim/sgd.yaml", "minimizer/none.yaml")
    assert run.model.minimizer is None


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--model.init_args.minimizer.init_args.rho=-0.1"],
         ["model.init_args.minimizer", "Invalid rho: -0.1; expected a finite rho >= 0"]),
        (["--model.init_args.minimizer=lightning_modules.minimizers.SAM", "--model.init_args.minimizer.init_args.p=3"],
         ["model.init_args.minimizer", "Invalid p: 3.0; expected p = 2 or p = inf"]),
        (["--model.init_args.optimizer=torch.optim.Nope"], ["optimizer", "torch.optim.Nope"]),
        (["--model.init_args.net.init_args.out_features=1"],
         ["model (lightning_modules.Classifier)", "out_features=1 but num_classes=2"]),
        (["--model.init_args.ascent=local"], ["ascent", "local"]),
        (["--model.init_args.gradient_clip_val=-1"], ["model", "Invalid gradient_clip_val: -1"]),
        (["--data.init_args.batch_size=0"], ["data (datamodules.MoonsDataModule)", "Invalid batch_size: 0"]),
    ],
)
def test_bad_input_is_refused_before_training_naming_the_field(capsys, args, needles):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err[-2000:]


def test_help_shows_the_one_line_summaries(capsys):
    with pytest.raises(SystemExit):
        cli.main(["fit", "--model.help", "lightning_modules.Classifier"])
    out = capsys.readouterr().out
    assert "Classification with cross-entropy" in out
    assert "--model.minimizer" in out


def test_fit_reports_test_metrics_then_test_reloads_the_saved_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    small = ["--data.init_args.num_samples=400", "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false"]
    run = cli.main(["fit", *small])
    assert "test/acc" in run.trainer.callback_metrics  # --test_after_fit (default true)
    fitted = run.trainer.callback_metrics["test/acc"].item()
    log_dir = tmp_path / "logs" / "moons_gsam" / "version_0"
    (ckpt,) = (log_dir / "checkpoints").glob("*.ckpt")
    again = cli.main(["test", "--config", str(log_dir / "config.yaml"), "--ckpt_path", str(ckpt)])
    assert again.trainer.callback_metrics["test/acc"].item() == fitted
    skipped = cli.main(["fit", *small, "--test_after_fit=false"])
    assert "test/acc" not in skipped.trainer.callback_metrics
