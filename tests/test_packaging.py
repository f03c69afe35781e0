"""One import name: the wheel installs ``flatminima`` only, a foreign project keeps its own packages, old runs load.

The repository's root is the package ``flatminima`` (setup.cfg: ``package_dir = flatminima = .``); these tests
build the wheel, install it into a fresh folder ahead of everything else on the path, and use it from a user
project that has its own ``callbacks/``, ``datamodules/``, ``studies/`` and ``cli.py``. A ``config.yaml`` and a
checkpoint written before the rename (``class_path: lightning_modules.Classifier``, committed in
``tests/fixtures/legacy_run``) still resume and test, to the values the code of that time computed.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LEGACY = Path(__file__).with_name("fixtures") / "legacy_run"
SOURCE_IGNORE = shutil.ignore_patterns(
    ".git",
    ".ci",
    "tests",
    "docs",
    "benchmarks",
    "logs",
    "data",
    "build",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    "lightning_logs",
)


def _declared_packages() -> list[str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return config["options"]["packages"].split()


def test_setup_cfg_declares_every_subpackage():
    found = {"flatminima"} | {
        "flatminima." + ".".join(p.parent.relative_to(ROOT).parts)
        for p in ROOT.rglob("__init__.py")
        if p.parent != ROOT and p.relative_to(ROOT).parts[0] not in {"tests", "benchmarks", "docs", "build", "data"}
    }
    assert sorted(_declared_packages()) == sorted(found)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, list[str]]:
    """(the folder the wheel was installed into, the wheel's file names)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source, wheels, target = tmp / "source", tmp / "dist", tmp / "site"
    shutil.copytree(ROOT, source, ignore=SOURCE_IGNORE)
    run = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*run, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(wheels)],
        check=True,
        cwd=tmp,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("flatminima-*.whl")
    subprocess.run(
        [*run, "install", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        cwd=tmp,
        capture_output=True,
        timeout=300,
    )
    with zipfile.ZipFile(wheel) as archive:
        return target, archive.namelist()


def test_the_wheel_holds_flatminima_alone(installed):
    _, names = installed
    assert {n.split("/")[0] for n in names} == {"flatminima", "flatminima-0.1.0.dist-info"}
    assert "flatminima/callbacks/minimum_sharpness.py" in names and "flatminima/cli.py" in names
    assert "flatminima/configs/experiments/moons_gsam.yaml" in names  # the presets travel with the package
    assert not [n for n in names if n.startswith(("flatminima/tests/", "flatminima/benchmarks/"))]


USER_TRAIN = textwrap.dedent("""
    import warnings

    import lightning.pytorch as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import callbacks, cli, datamodules, studies  # the project's own
    from flatminima.callbacks import GradientNormSharpness, MinimumSharpness
    import flatminima

    import callbacks as again  # still the project's own once flatminima is imported
    assert (callbacks.OWNER, datamodules.OWNER, studies.OWNER, cli.OWNER, again.OWNER) == ("user",) * 5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import lightning_modules  # a name the project lacks: flatminima's former name, the same module
    import flatminima.lightning_modules
    assert lightning_modules is flatminima.lightning_modules
    assert any(issubclass(w.category, FutureWarning) for w in caught)

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self.model(x), y)
            self.log("train/loss", loss, on_epoch=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    measures = [MinimumSharpness(num_samples=32, batch_size=16, network="model", every_n_epochs=1,
                                 on_checkpoint=False),
                GradientNormSharpness(rho=0.05)]
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=measures)
    trainer.fit(Net(), DataLoader(TensorDataset(x, y), batch_size=16))
    print(flatminima.__file__)
    print(sorted(k for k in trainer.callback_metrics if k.startswith("sharpness/")))
""")


def test_a_project_with_its_own_callbacks_trains_with_the_installed_measures(installed, tmp_path):
    target, _ = installed
    project = tmp_path / "project"
    for package in ("callbacks", "datamodules", "studies"):
        (project / package).mkdir(parents=True)
        (project / package / "__init__.py").write_text('OWNER = "user"\n')
    (project / "cli.py").write_text('OWNER = "user"\n')
    (project / "train.py").write_text(USER_TRAIN)
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "train.py"], cwd=project, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    where, keys = out.stdout.strip().splitlines()[-2:]
    assert Path(where).parent == target / "flatminima"
    assert (
        keys == "['sharpness/gradient_norm', 'sharpness/gradient_norm_step', 'sharpness/minimum', "
        "'sharpness/minimum_trace']"
    )


def test_the_console_script_runs_a_study_and_a_fit_from_any_folder(installed, tmp_path):
    target, _ = installed
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    script = [sys.executable, str(target / "bin" / "flatminima")]
    study = subprocess.run(
        [*script, "study", "run", "configs/studies/moons_quick.yaml", "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert study.returncode == 0, study.stderr
    commands = [line for line in study.stdout.splitlines() if not line.startswith("#")]
    assert len(commands) == 12 and all(" flatminima fit --config configs/data/moons.yaml" in c for c in commands)
    fit = subprocess.run(
        [*script, "fit", "--trainer.max_epochs=1", "--data.init_args.num_samples=256", "--trainer.logger=false"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "test/acc" in fit.stdout and (tmp_path / "logs" / "moons_gsam").is_dir()


@pytest.fixture
def legacy_run(tmp_path, monkeypatch) -> Path:
    """A copy of the run written before the rename, as ``logs/legacy_run/version_0`` under a fresh folder."""
    folder = tmp_path / "logs" / "legacy_run" / "version_0"
    shutil.copytree(LEGACY, folder, ignore=shutil.ignore_patterns("*.pt"))
    monkeypatch.chdir(tmp_path)
    return folder / "checkpoints" / "epoch=1-step=16.ckpt"


def test_a_run_saved_under_the_old_names_resumes_where_that_code_went(legacy_run):
    from flatminima import cli

    assert "class_path: lightning_modules.Classifier" in (legacy_run.parents[1] / "config.yaml").read_text()
    run = cli.main(
        ["fit", "--ckpt_path", str(legacy_run), "--trainer.max_epochs", "3", "--trainer.enable_progress_bar", "false"]
    )
    expected = torch.load(LEGACY / "resumed_epoch2_weights.pt", weights_only=True)  # the old code's resume
    got = {k: v for k, v in run.model.state_dict().items() if k.startswith("net.")}
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7)
    assert (legacy_run.parent / "epoch=2-step=24.ckpt").is_file()  # in the run's own folder


def test_a_checkpoint_saved_under_the_old_names_tests_as_that_code_did(legacy_run):
    from flatminima import cli

    run = cli.main(["test", "--ckpt_path", str(legacy_run), "--trainer.enable_progress_bar", "false"])
    metrics = run.trainer.callback_metrics
    assert float(metrics["test/loss"]) == pytest.approx(0.35530415177345276, rel=1e-6)  # printed by the old code
    assert float(metrics["test/acc"]) == 0.84375
