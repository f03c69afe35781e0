"""The command line, parsing side: the embedded default and how presets layer on it, one-line errors, --help.

Each test looks at what a user sees: the exit code, the number of stderr lines and the key they name,
``--print_config`` or the objects built (``run=False``). Runs that train are in ``test_cli_runs.py``.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.core import LightningDataModule

from flatminima import cli
from flatminima.cli_support import compose
from flatminima.cli_support.help import GROUPS, header
from flatminima.lightning_modules import SAM, USAM, Classifier, Regressor, TwoPassModule
from flatminima.lightning_modules.optim import AdaShift

CONFIGS = cli.ROOT / "configs"


def config(name: str) -> str:
    return str(CONFIGS / name)


def configs(*names: str) -> list[str]:
    return [a for n in names for a in ("--config", config(n))]


def build(*names: str, extra=()) -> cli.FlatMinimaCLI:
    """What ``fit`` would build from these presets, instantiated without training (no logger written)."""
    return cli.main([*configs(*names), "--trainer.logger=false", *extra], run=False)


def printed_config(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def one_error_line(capsys, args: list[str], code: int = 2) -> str:
    """Run ``args``; assert the exit code and that stderr is exactly one ``error:`` line; return it."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# ---------------------------------------------------------------- item 1: the composition rule (docs/cli.md)
def test_readme_composition_trains_the_default_epochs_not_lightnings_1000(capsys):
    printed = printed_config(
        capsys, *configs("data/moons.yaml", "model/mlp.yaml", "optim/adam.yaml", "minimizer/sam.yaml")
    )
    assert printed["trainer"]["max_epochs"] == 50
    assert printed["model"]["init_args"]["optimizer"]["class_path"] == "torch.optim.Adam"
    assert printed["model"]["init_args"]["minimizer"]["class_path"] == "flatminima.lightning_modules.minimizers.SAM"


def test_print_config_shows_the_moons_gsam_default(capsys):
    printed = printed_config(capsys)
    assert printed["model"]["init_args"]["minimizer"]["class_path"] == "flatminima.lightning_modules.minimizers.GSAM"
    assert printed["data"]["class_path"] == "flatminima.datamodules.MoonsDataModule"
    assert printed["data"]["init_args"]["num_samples"] == 10000 and printed["data"]["init_args"]["noise"] == 0.3
    assert printed["data"]["init_args"]["batch_size"] == 64 and printed["trainer"]["max_epochs"] == 50


# ---------------------------------------------------------------- item 2: presets layer on the default
def test_a_rule_preset_alone_is_the_default_with_that_rule(capsys):
    printed = printed_config(capsys, *configs("minimizer/sam.yaml"))
    assert printed["model"]["init_args"]["minimizer"] == {
        "class_path": "flatminima.lightning_modules.minimizers.SAM",
        "init_args": {"rho": 0.05, "p": 2.0, "eps": 1e-12},
    }
    assert printed["data"]["class_path"] == "flatminima.datamodules.MoonsDataModule"
    assert printed["model"]["init_args"]["optimizer"]["init_args"]["momentum"] == 0.9  # the default's optimizer


def test_an_optimizer_preset_replaces_the_default_optimizer_whole():
    """optim/sgd.yaml is plain SGD: the default's momentum 0.9 must not leak into it."""
    opt = build("optim/sgd.yaml").model.configure_optimizers()
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["lr"] == 0.1
    assert opt.param_groups[0]["momentum"] == 0.0


def test_a_model_preset_of_another_task_keeps_the_default_recipe_but_none_of_its_classifier():
    run = build("data/abalone.yaml", "model/fcnn.yaml")
    model = run.model
    assert type(model) is Regressor and type(model.net).__name__ == "FCNN"
    assert (model.net.in_features, model.net.out_features) == (10, 1)
    assert type(model.minimizer).__name__ == "GSAM"  # the default's rule and optimizer stay
    assert model.configure_optimizers().param_groups[0]["momentum"] == 0.9
    init = run.config.as_dict()["model"]["init_args"]
    assert "label_smoothing" not in init and "num_classes" not in init  # nothing of the default's Classifier
    assert set(init["net"]["init_args"]) == {
        "in_features",
        "hidden",
        "out_features",
        "activation",
        "dropout",
        "weight_init",
        "output_activation",
    }
    assert init["net"]["init_args"]["hidden"] == [64, 64]


def test_any_base_combines_with_any_rule_from_two_files():
    run = build("data/moons.yaml", "model/mlp.yaml", "optim/adashift.yaml", "minimizer/sam_linf.yaml")
    assert isinstance(run.model.minimizer, SAM) and run.model.minimizer.p == math.inf
    assert isinstance(run.model.configure_optimizers(), AdaShift)
    run = build("data/moons.yaml", "model/mlp.yaml", "optim/phb.yaml", "minimizer/usam.yaml")
    opt = run.model.configure_optimizers()
    assert isinstance(run.model.minimizer, USAM)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.8
    run = build("data/moons.yaml", "model/mlp.yaml", "optim/sgd.yaml", "minimizer/none.yaml")
    assert run.model.minimizer is None


def test_callbacks_presets_append_to_the_default_callbacks():
    run = build("callbacks/sharpness.yaml")
    names = [type(c).__name__ for c in run.trainer.callbacks]
    expected = [
        "LossThresholdCheckpoint",
        "MinimumSharpness",
        "AdaptiveSharpness",
        "GradientNormSharpness",
        "HessianSpectrum",
    ]
    assert all(n in names for n in expected)
    assert run.config["trainer"]["callbacks"][0]["class_path"].endswith("LearningRateMonitor")  # the default's
    assert isinstance(run.model, Classifier) and run.trainer.max_epochs == 50


def test_a_trainer_preset_changes_only_the_trainer(capsys):
    printed = printed_config(capsys, *configs("trainer/ddp_cpu.yaml"))
    trainer = printed["trainer"]
    assert (trainer["strategy"], trainer["devices"], trainer["accelerator"]) == ("ddp", 2, "cpu")
    assert trainer["max_epochs"] == 50 and printed["data"]["class_path"] == "flatminima.datamodules.MoonsDataModule"


def test_an_experiment_composes_as_lightningcli_does_with_preset_objects_replaced_whole():
    """A whole-run config replaces the default; a later preset's objects replace the experiment's whole.

    The reference is a plain LightningCLI given the experiment without the objects the presets set
    (so nothing of the experiment's SGD can leak into the preset's Adam).
    """
    experiment = config("experiments/sam_wrn_cifar10.yaml")
    tail = [
        *configs("optim/adam.yaml", "minimizer/none.yaml"),
        "--model.init_args.optimizer.init_args.lr=0.01",
        "--trainer.logger=false",
    ]
    ours = cli.main(["--config", experiment, *tail], run=False).config.as_dict()
    content = yaml.safe_load(Path(experiment).read_text())
    assert content["model"]["init_args"]["optimizer"]["init_args"]["weight_decay"] == 5e-4  # what must not leak
    del content["model"]["init_args"]["optimizer"], content["model"]["init_args"]["minimizer"]
    plain = LightningCLI(
        TwoPassModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        args=["--config", yaml.safe_dump(content), *tail],
        run=False,
        save_config_callback=None,
    )
    theirs = plain.config.as_dict()
    for extra in ("name", "test_after_fit", "config"):
        ours.pop(extra, None)
        theirs.pop(extra, None)
    for key in ("enable_progress_bar", "default_root_dir"):  # set by our output rules, not by composition
        ours["trainer"].pop(key)
        theirs["trainer"].pop(key)
    assert ours == theirs
    optimizer = ours["model"]["init_args"]["optimizer"]
    assert optimizer["class_path"] == "torch.optim.Adam" and optimizer["init_args"]["weight_decay"] == 0.0
    assert optimizer["init_args"]["lr"] == 0.01


def test_plan_names_runs_after_the_base_and_the_files_that_changed_it():
    plan = compose.plan(["fit", *configs("data/moons.yaml", "model/mlp.yaml", "optim/adam.yaml", "minimizer/sam.yaml")])
    assert (plan.base, plan.name) == ("default", "moons_gsam+adam+sam")  # moons.yaml and mlp.yaml change nothing
    plan = compose.plan(["fit", *configs("experiments/minsharp_digits.yaml", "optim/adam.yaml")])
    assert (plan.base, plan.name) == ("experiment", "minsharp_digits+adam")
    assert "optimizer" not in yaml.safe_load(plan.args[2])["model"]["init_args"]  # replaced by optim/adam.yaml
    unchanged = compose.plan(["fit", *configs("experiments/minsharp_digits.yaml", "callbacks/hessian.yaml")])
    assert unchanged.args[2] == config("experiments/minsharp_digits.yaml")  # nothing replaced: the file itself
    assert compose.plan(["fit"]).name == "moons_gsam"
    study = compose.plan(
        [
            "fit",
            "--config",
            config("experiments/moons_gsam.yaml"),
            '--trainer.logger={"class_path": "x"}',
            "--trainer.default_root_dir=d",
        ]
    )
    assert {"logger", "default_root_dir"} <= study.explicit


# ---------------------------------------------------------------- item 3: config errors in one line
@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (
            ["--model.init_args.minimizer.init_args.rh", "0.1"],
            [
                "model.init_args.minimizer.init_args.rh: Option 'rh' is not accepted by GSAM",
                "accepted: rho, alpha",
                "did you mean rho?",
            ],
        ),
        (
            ["--model.init_args.minimizer.init_args.rho", "abc"],
            ["model.init_args.minimizer.init_args.rho: got 'abc'", "expected a float"],
        ),
        (
            ["--model.init_args.optimizer.class_path", "torch.optim.Adamm"],
            ["model.init_args.optimizer: no class torch.optim.Adamm", "did you mean torch.optim.Adam?"],
        ),
        (["--trainer.max_epochz", "3"], ["unknown option --trainer.max_epochz", "did you mean --trainer.max_epochs?"]),
        (["--trainer.max_epochs", "x"], ["trainer.max_epochs: got 'x'", "expected an int or null"]),
        (
            ["--model.init_args.on_nonfinite", "explode"],
            ["model.init_args.on_nonfinite: got 'explode'", "'raise', 'stop', 'skip', 'ignore'"],
        ),
        (
            ["--model", "flatminima.lightning_modules.Classifierr"],
            ["model: no class", "did you mean flatminima.lightning_modules.Classifier?"],
        ),
        (["--data.init_args.batch_siz", "3"], ["data.init_args.batch_siz:", "did you mean batch_size?"]),
        (
            ["--model.init_args.gradient_clip_vale", "1"],  # arguments the task passes on through **kwargs count
            ["Option 'gradient_clip_vale' is not accepted by Classifier", "did you mean gradient_clip_val?"],
        ),
        (["--model.init_args.optimizer.init_args.lr=inf"], ["optimizer.init_args.lr: got 'inf'", ".inf"]),
    ],
    ids=[
        "unknown-key",
        "wrong-type",
        "unknown-class",
        "unknown-option",
        "int",
        "choice",
        "task",
        "data-key",
        "kwargs",
        "inf",
    ],
)
def test_a_config_error_is_one_line_naming_the_key(capsys, args, needles):
    line = one_error_line(capsys, ["fit", *args])
    for needle in needles:
        assert needle in line, line


def test_a_typo_in_a_yaml_file_names_the_key_and_the_file(capsys, tmp_path):
    typo = tmp_path / "rhoo.yaml"
    typo.write_text("model:\n  init_args:\n    minimizer:\n      init_args:\n        rhoo: 0.1\n")
    line = one_error_line(capsys, ["fit", *configs("experiments/moons_gsam.yaml"), "--config", str(typo)])
    assert "model.init_args.minimizer.init_args.rhoo:" in line and f"(in {typo})" in line
    assert "did you mean rho?" in line
    top = tmp_path / "trainr.yaml"
    top.write_text("trainr:\n  max_epochs: 3\n")
    assert "did you mean trainer.max_epochs?" in one_error_line(capsys, ["fit", "--config", str(top)])


@pytest.mark.parametrize(
    ("content", "needle"),
    [("", "the file is empty"), ("trainer: [1\n", "invalid YAML at line"), ("- 1\n", "expected a YAML mapping")],
)
def test_an_unusable_config_file_is_one_line(capsys, tmp_path, content, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    line = one_error_line(capsys, ["fit", "--config", str(path)])
    assert f"--config {path}" in line and needle in line
    assert "file not found" in one_error_line(capsys, ["fit", "--config", str(tmp_path / "nowhere.yaml")])


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (
            ["--model.init_args.minimizer.init_args.rho=-0.1"],
            ["model.init_args.minimizer", "Invalid rho: -0.1; expected a finite rho >= 0"],
        ),
        (
            [
                "--model.init_args.minimizer=flatminima.lightning_modules.minimizers.SAM",
                "--model.init_args.minimizer.init_args.p=3",
            ],
            ["model.init_args.minimizer", "Invalid p: 3.0; expected p = 2 or p = inf"],
        ),
        (
            ["--model.init_args.net.init_args.out_features=1"],
            ["model (flatminima.lightning_modules.Classifier)", "out_features=1 but num_classes=2"],
        ),
        (["--model.init_args.gradient_clip_val=-1"], ["model", "Invalid gradient_clip_val: -1"]),
        (["--data.init_args.batch_size=0"], ["data (flatminima.datamodules.MoonsDataModule)", "Invalid batch_size: 0"]),
    ],
)
def test_bad_values_are_refused_before_training_naming_the_field(capsys, args, needles):
    line = one_error_line(capsys, ["fit", *args])
    for needle in needles:
        assert needle in line, line


def test_subcommand_errors_are_one_line(capsys):
    assert "did you mean fit?" in one_error_line(capsys, ["fitt"])
    assert "no subcommand given" in one_error_line(capsys, [])


def test_verbose_errors_show_the_parser_output(capsys, monkeypatch):
    with pytest.raises(SystemExit):
        cli.main(["fit", "--model.init_args.minimizer.init_args.rh", "0.1", "--verbose_errors"])
    assert len(capsys.readouterr().err.splitlines()) > 10
    monkeypatch.setenv("FLATMINIMA_DEBUG", "1")
    with pytest.raises(SystemExit):
        cli.main(["fit", "--model.init_args.minimizer.init_args.rh", "0.1"])
    assert "Does not validate against any of the Union subtypes" in capsys.readouterr().err


# ---------------------------------------------------------------- item 4: evaluating without a checkpoint
@pytest.mark.parametrize("subcommand", ["test", "validate"])
def test_evaluation_without_a_checkpoint_is_refused(capsys, subcommand):
    line = one_error_line(capsys, [subcommand, *configs("experiments/moons_gsam.yaml")])
    assert line.startswith("error: ckpt_path:") and "--ckpt_path" in line


# ---------------------------------------------------------------- item 6: names and folders
def test_name_and_an_explicit_logger_decide_the_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = cli.main(["--name", "mine"], run=False)
    assert run.trainer.logger.log_dir == "logs/mine/version_0"
    composed = cli.main(configs("optim/adam.yaml"), run=False)
    assert composed.trainer.logger.name == "moons_gsam+adam"
    logger = (
        '{"class_path":"lightning.pytorch.loggers.TensorBoardLogger","init_args":{"save_dir":"out/runs",'
        '"name":"run-1","version":""}}'
    )
    study = cli.main(
        [
            *configs("experiments/moons_gsam.yaml", "optim/adam.yaml"),
            f"--trainer.logger={logger}",
            "--trainer.default_root_dir=out/runs/run-1",
        ],
        run=False,
    )
    assert study.trainer.logger.log_dir.rstrip("/") == "out/runs/run-1"
    assert study.trainer.default_root_dir.endswith("out/runs/run-1")


# ---------------------------------------------------------------- item 7: a progress bar only on a terminal
def test_a_progress_bar_only_on_a_terminal_unless_asked(monkeypatch):
    """Epoch lines replace the bar off a terminal (``test_cli_runs.py`` checks the lines themselves)."""
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    run = cli.main(["--trainer.logger=false"], run=False)
    assert run.trainer.progress_bar_callback is None and run.config["trainer"]["enable_progress_bar"] is False
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert cli.main(["--trainer.logger=false"], run=False).trainer.progress_bar_callback is not None
    asked = cli.main(["--trainer.logger=false", "--trainer.enable_progress_bar=false"], run=False)
    assert asked.trainer.progress_bar_callback is None


# ---------------------------------------------------------------- item 9: --help
def test_help_describes_the_project_subcommands_and_presets(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "Lightning Trainer command line tool" not in out
    assert "sharpness-aware training" in out and "study run|analyze" in out
    for subcommand in ("fit", "validate, test", "predict"):
        assert f"\n  {subcommand} " in out
    for group in GROUPS:
        assert f"\n  {group}/\n" in out
    assert re.search(r"\n    sam +SAM on the L2 ball, rho 0\.05 \(Foret et al\. 2021\)\.\n", out)  # names in a column
    for group in GROUPS:  # every preset is listed with its one-line header
        for path in (CONFIGS / group).glob("*.yaml"):
            first = path.read_text().splitlines()[0]
            assert first.startswith("# ") and len(first) <= 101 and first.endswith((".", ")", '"')), path
            assert f"    {path.stem}" in out and first[2:] in out, path


def test_a_header_that_runs_on_is_cut_at_a_word(tmp_path):
    long = tmp_path / "long.yaml"
    long.write_text(
        "# A quick study on moons: 3 base optimizers x (alone, SAM) x 2 seeds = 12 small runs (5 epochs on "
        "2000\n# points; about a minute on a 2-core laptop). More text.\nname: x\n"
    )
    text = header(long)
    assert text.endswith("…") and len(text) <= 100 and text.startswith("A quick study on moons: 3 base")
    assert header(CONFIGS / "minimizer/sam.yaml") == "SAM on the L2 ball, rho 0.05 (Foret et al. 2021)."


def test_fit_help_shows_the_one_line_summaries(capsys):
    with pytest.raises(SystemExit):
        cli.main(["fit", "--model.help", "flatminima.lightning_modules.Classifier"])
    out = capsys.readouterr().out
    assert "Classification with cross-entropy" in out
    assert "--model.minimizer" in out
