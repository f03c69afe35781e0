"""The command line, running side: folders, per-epoch lines and the final table, HParams, errors of a run.

Small fits in-process (a few seconds each) and one subprocess, asserting on what a user sees: the
files written and where, stdout/stderr lines, exit codes, and the TensorBoard event files' contents
(read with TensorBoard's own loader).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import subprocess
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import pytest
from fixtures_data import SKIP_SHARED, copy_abalone, shared_datasets
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from flatminima import cli
from flatminima.cli_support.quiet import LIGHTNING_LOGGERS

CONFIGS = cli.ROOT / "configs"
SMALL = ["--data.init_args.num_samples=400", "--trainer.max_epochs=3"]  # 5 training batches of 64 per epoch


def read_events(folder: Path) -> tuple[dict[str, list[tuple[int, float]]], list[dict]]:
    """Scalars ``tag -> [(step, value)]`` and HParams sessions (name -> value) of every event file in ``folder``."""
    scalars: dict[str, list[tuple[int, float]]] = defaultdict(list)
    sessions = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "hparams":
                    data = HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    if data.HasField("session_start_info"):
                        sessions.append(
                            {k: getattr(v, v.WhichOneof("kind")) for k, v in data.session_start_info.hparams.items()}
                        )
                elif value.metadata.plugin_data.plugin_name == "scalars":  # the loader stores scalars as tensors
                    scalars[value.tag].append((event.step, value.tensor.float_val[0]))
    return scalars, sessions


def run_cli(args: list[str]) -> tuple[cli.FlatMinimaCLI, str, str]:
    """``cli.main(args)`` with stdout and stderr captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        result = cli.main(args)
    return result, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    """One small composed fit: the default + the gradient-norm preset, with per-step logging."""
    cwd, here = tmp_path_factory.mktemp("run"), os.getcwd()
    os.chdir(cwd)
    try:
        args = [
            "fit",
            "--config",
            str(CONFIGS / "callbacks/gradient_norm.yaml"),
            *SMALL,
            "--model.init_args.log_train_steps=true",
        ]
        result, out, err = run_cli(args)
    finally:
        os.chdir(here)
    return cwd, result, out, err


# ---------------------------------------------------------------- item 6: folders
def test_a_composed_run_gets_its_own_named_folder(composed):
    cwd, _, _, _ = composed
    assert sorted(p.name for p in cwd.iterdir()) == ["logs"]  # no ./checkpoints, no lightning_logs
    run = cwd / "logs" / "moons_gsam+gradient_norm" / "version_0"
    assert [p.name for p in (cwd / "logs").iterdir()] == ["moons_gsam+gradient_norm"]
    assert (run / "config.yaml").is_file() and len(list((run / "checkpoints").glob("*.ckpt"))) == 1
    assert list(run.glob("events.out.tfevents.*"))


def test_test_and_resume_stay_in_the_run_they_belong_to(composed, tmp_path, monkeypatch):
    shutil.copytree(composed[0] / "logs", tmp_path / "logs")
    monkeypatch.chdir(tmp_path)
    run = Path("logs") / "moons_gsam+gradient_norm" / "version_0"
    (ckpt,) = (run / "checkpoints").glob("*.ckpt")
    tested, _, _ = run_cli(["test", "--ckpt_path", str(ckpt)])  # the run's config.yaml is found beside it
    assert "test/acc" in tested.trainer.callback_metrics
    assert [p.name for p in run.parent.iterdir()] == ["version_0"]  # no empty version_1
    assert "test/acc" in read_events(run)[0]
    resumed, out, _ = run_cli(["fit", "--ckpt_path", str(ckpt), "--trainer.max_epochs=4"])
    assert resumed.trainer.current_epoch == 4
    assert [p.name for p in run.parent.iterdir()] == ["version_0"]  # the resume continues the same folder
    epochs = sorted({step for step, _ in read_events(run)[0]["train/loss"]})
    assert epochs == [4, 9, 14, 19]  # one curve: epoch means at the last step of each of the 4 epochs
    assert [line.split()[1] for line in out.splitlines() if line.startswith("epoch ")] == ["4/4"]


def test_a_named_run_is_tested_in_its_own_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_cli(["fit", "--name", "mine", "--data.init_args.num_samples=200", "--trainer.max_epochs=1"])
    (ckpt,) = Path("logs/mine/version_0/checkpoints").glob("*.ckpt")
    run_cli(["test", "--ckpt_path", str(ckpt)])
    assert sorted(p.name for p in Path("logs").iterdir()) == ["mine"]
    assert [p.name for p in Path("logs/mine").iterdir()] == ["version_0"]


# ---------------------------------------------------------------- item 7: output
def test_one_line_per_epoch_then_a_final_table_with_sharpness(composed):
    _, _, out, err = composed
    lines = out.splitlines()
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [line.split()[1] for line in epochs] == ["1/3", "2/3", "3/3"]
    assert all("train/loss " in line and "val/acc " in line and "sharpness/gradient_norm " in line for line in epochs)
    assert "\r" not in out and "\r" not in err  # no progress bar when the output is not a terminal
    title = lines.index(next(line for line in lines if line.startswith("Final metrics")))
    table = {line.split()[0]: float(line.split()[1]) for line in lines[title + 1 :] if line.startswith("  ")}
    assert {"train/loss", "val/acc", "test/acc", "test/loss", "sharpness/gradient_norm"} <= set(table)
    assert lines[title] == "Final metrics (seed 0, epoch 3, step 15):"
    assert len(lines) < 25


# ---------------------------------------------------------------- item 8: HParams
def test_the_hparams_tab_gets_readable_names_and_the_final_metrics(composed):
    cwd, _, _, _ = composed
    scalars, sessions = read_events(cwd / "logs" / "moons_gsam+gradient_norm" / "version_0")
    (hparams,) = sessions[:1]
    assert {k: hparams[k] for k in ("task", "net", "optimizer", "rule", "data")} == {
        "task": "Classifier",
        "net": "MLP",
        "optimizer": "SGD",
        "rule": "GSAM",
        "data": "MoonsDataModule",
    }
    assert hparams["optimizer.lr"] == 0.1 and hparams["optimizer.momentum"] == 0.9
    assert hparams["rule.rho"] == 0.05 and hparams["rule.alpha"] == 0.1
    assert hparams["net.hidden"] == "[32, 32, 32]" and hparams["data.batch_size"] == 64
    assert hparams["max_epochs"] == 3 and hparams["seed"] == 0
    assert not any("/" in k or "init_args" in k for k in hparams)
    for metric in ("test/acc", "val/loss", "train/loss", "sharpness/gradient_norm"):  # the session's metrics
        assert scalars[metric], metric


# ---------------------------------------------------------------- item 10: log_train_steps
def test_log_train_steps_logs_every_step(composed):
    cwd, result, _, _ = composed
    assert result.trainer.log_every_n_steps == 50
    scalars, _ = read_events(cwd / "logs" / "moons_gsam+gradient_norm" / "version_0")
    assert [step for step, _ in scalars["train_step/loss"]] == list(range(15))


# ---------------------------------------------------------------- item 4: untrained weights, a cut data file
def test_zero_epochs_warns_that_the_metrics_are_those_of_untrained_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result, out, err = run_cli(["fit", "--data.init_args.num_samples=200", "--trainer.max_epochs=0"])
    assert result.trainer.global_step == 0
    warning = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warning == [
        "warning: trainer.max_epochs=0: nothing will be trained; the metrics reported are those of "
        "the untrained weights"
    ]
    assert "Final metrics of weights untrained (initial): no training step ran in this fit" in out
    assert "test/acc" in out


def _abalone_rows(path: Path, rows: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{'MFI'[i % 3]},0.{400 + i % 90},0.3,0.1,0.5,0.2,0.1,0.15,{5 + i % 12}" for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")


def test_an_abalone_file_that_is_not_ucis_warns_with_its_rows_and_md5(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _abalone_rows(tmp_path / "data" / "abalone" / "abalone.data", 1000)
    args = [
        "fit",
        "--config",
        str(CONFIGS / "experiments/adaptive_sharpness_abalone.yaml"),
        "--trainer.fast_dev_run=1",
        "--data.init_args.data_dir=data",
    ]
    with pytest.warns(
        UserWarning,
        match=r"differs from UCI's abalone\.data: 1000 rows, .* \(UCI's file: 4177 rows, "
        r"191,873 bytes, MD5 a769fd0119787cac09158fe08971e480\)",
    ):
        run_cli(args)
    if shared_datasets() is None:
        pytest.skip(SKIP_SHARED)
    copy_abalone(tmp_path / "data")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_cli(args)
    assert not [w for w in caught if "abalone.data" in str(w.message)]


# ---------------------------------------------------------------- item 5: no logger
def test_no_logger_works_and_keeps_checkpoints_out_of_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    filters = list(warnings.filters)
    log_filters = {name: list(logging.getLogger(name).filters) for name in LIGHTNING_LOGGERS}
    result, out, _ = run_cli(
        ["fit", "--data.init_args.num_samples=200", "--trainer.max_epochs=1", "--trainer.logger=false"]
    )
    assert result.trainer.global_step == 3 and "test/acc" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs"]
    run = tmp_path / "logs" / "moons_gsam" / "version_0"
    assert len(list((run / "checkpoints").glob("*.ckpt"))) == 1 and (run / "config.yaml").is_file()
    # nothing of the call stays behind for the next run in this process
    assert list(warnings.filters) == filters
    assert {name: list(logging.getLogger(name).filters) for name in LIGHTNING_LOGGERS} == log_filters


# ---------------------------------------------------------------- item 3: errors once the run started
def run_entry(args: list[str], capsys) -> tuple[int, list[str]]:
    code = cli.entry(args)
    return code, capsys.readouterr().err.strip().splitlines()


def test_errors_of_a_run_are_one_line_at_the_end_without_a_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tiny = ["--trainer.fast_dev_run=2", "--data.init_args.num_samples=200"]
    code, err = run_entry(
        [
            "fit",
            "--config",
            str(CONFIGS / "experiments/adaptive_sharpness_abalone.yaml"),
            "--data.init_args.data_dir=nowhere",
        ],
        capsys,
    )
    assert code == 1 and err[-1].startswith("error: DataNotFoundError: Abalone not found: missing nowhere")
    assert not any("Traceback" in line for line in err)
    code, err = run_entry(["fit", "--config", str(CONFIGS / "model/fcnn.yaml"), *tiny], capsys)
    assert code == 1 and err[-1].startswith("error: Invalid net for MoonsDataModule: FCNN has in_features=10")
    code, err = run_entry(["fit", "--model.init_args.optimizer.init_args.lr=1e30", *tiny], capsys)
    assert code == 1 and err[-1].startswith("error: FloatingPointError: Non-finite training loss")
    bad = tmp_path / "bad" / "abalone" / "abalone.data"
    _abalone_rows(bad, 3)
    bad.write_text(bad.read_text() + "M,0.35,0.265,x,0.2255,0.0995,0.0485,0.07,7\n")
    code, err = run_entry(
        [
            "fit",
            "--config",
            str(CONFIGS / "experiments/adaptive_sharpness_abalone.yaml"),
            f"--data.init_args.data_dir={bad.parent.parent}",
        ],
        capsys,
    )
    assert code == 1 and err[-1].startswith(f"error: Invalid abalone file {bad}, line 4: non-numeric measurement")
    assert not any("Traceback" in line for line in err)
    with pytest.raises(FloatingPointError):  # asked for: the exception itself
        cli.entry(["fit", "--model.init_args.optimizer.init_args.lr=1e30", *tiny, "--verbose_errors"])


def test_a_config_error_from_entry_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.entry(["fit", "--trainer.max_epochz", "1"])
    assert exit_info.value.code == 2 and len(capsys.readouterr().err.splitlines()) == 1


# ---------------------------------------------------------------- the real command line
@pytest.mark.slow
def test_the_command_line_output_is_concise(tmp_path):
    """``python cli.py fit`` redirected to files: no progress bar, no noise warnings, epoch lines, the table."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(cli.ROOT), os.environ.get("PYTHONPATH")])),
        OMP_NUM_THREADS="1",
    )
    proc = subprocess.run(
        [
            sys.executable,
            str(cli.ROOT / "cli.py"),
            "fit",
            "--config",
            str(CONFIGS / "callbacks/gradient_norm.yaml"),
            "--data.init_args.num_samples=300",
            "--trainer.max_epochs=2",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for noise in ("torch.jit", "Tip:", "LeafSpec", "logging interval", "Warning"):
        assert noise not in proc.stderr, proc.stderr
    assert proc.stderr.count("Seed set to 0") == 1  # held until the classes are built, then shown
    assert "\r" not in proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[1] for line in lines if line.startswith("epoch ")] == ["1/2", "2/2"]
    assert any(line.split()[0] == "sharpness/gradient_norm" for line in lines if line.startswith("  "))
    assert len(lines) <= 20 and len(proc.stderr.splitlines()) <= 20
