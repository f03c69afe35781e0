"""Study files: grid expansion, readable ids, one-line errors naming the key, and the run's CLI arguments."""

from __future__ import annotations

import shlex

import pytest
import torch

from flatminima import cli
from flatminima.studies import runner
from flatminima.studies.spec import StudyError, load, parse

ROOT = cli.ROOT
STUDIES = sorted((ROOT / "configs" / "studies").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    """Config paths in study files resolve against the current directory: the repository root here."""
    monkeypatch.chdir(ROOT)


def grid(**extra) -> dict:
    data = {
        "base": ["configs/data/moons.yaml", "configs/model/mlp.yaml"],
        "overrides": {"trainer.max_epochs": 2},
        "axes": {
            "optim": {
                "adam": "configs/optim/adam.yaml",
                "sgd": {
                    "configs": ["configs/optim/sgd.yaml"],
                    "overrides": {"model.init_args.optimizer.init_args.lr": 0.5},
                },
            },
            "rule": {"none": "configs/minimizer/none.yaml", "sam": ["configs/minimizer/sam.yaml"]},
            "rho": {"key": "model.init_args.minimizer.init_args.rho", "values": [0.01, 0.1]},
        },
        "seeds": [0, 7],
    }
    data.update(extra)
    return data


def test_grid_expands_in_file_order_with_readable_unique_ids():
    study = parse(grid(), "s.yaml")
    runs = study.runs()
    assert len(runs) == 2 * 2 * 2 * 2
    assert runs[0].id == "optim=adam-rule=none-rho=0.01-seed=0"
    assert runs[1].id == "optim=adam-rule=none-rho=0.01-seed=7"
    assert runs[-1].id == "optim=sgd-rule=sam-rho=0.1-seed=7"
    assert len({r.id for r in runs}) == len(runs)
    sgd_sam = next(r for r in runs if r.axes == {"optim": "sgd", "rule": "sam", "rho": "0.1"} and r.seed == 0)
    assert sgd_sam.configs == (
        "configs/data/moons.yaml",
        "configs/model/mlp.yaml",
        "configs/optim/sgd.yaml",
        "configs/minimizer/sam.yaml",
    )
    # study overrides first, then each axis value's, in axis order: an axis value wins over the study
    assert sgd_sam.overrides == (
        ("trainer.max_epochs", 2),
        ("model.init_args.optimizer.init_args.lr", 0.5),
        ("model.init_args.minimizer.init_args.rho", 0.1),
    )
    assert parse({**grid(), "seeds": 3}, "s.yaml").seeds == (0, 1, 2)
    assert parse({"base": ["configs/data/moons.yaml"]}, "s.yaml").runs()[0].id == "seed=0"


def test_run_arguments_compose_configs_overrides_seed_logger_and_summary(tmp_path):
    run = parse(grid(), "s.yaml").runs()[-1]
    task = runner.make_task(run, tmp_path / "out", threads=1, cwd=ROOT)
    args = list(task.args)
    assert args[0] == "fit"
    configs = [args[i + 1] for i, a in enumerate(args) if a == "--config"]
    assert configs == list(run.configs)
    assert "--model.init_args.optimizer.init_args.lr=0.5" in args
    assert "--model.init_args.minimizer.init_args.rho=0.1" in args
    assert f"--seed_everything={run.seed}" in args and "--test_after_fit=true" in args
    assert args.index("--model.init_args.minimizer.init_args.rho=0.1") > max(
        i for i, a in enumerate(args) if a == "--config"
    )
    folder = tmp_path / "out" / "runs" / run.id
    assert any(
        a.startswith("--trainer.callbacks+=") and "flatminima.callbacks.RunSummary" in a and str(folder) in a
        for a in args
    )
    assert list(task.portable) == [a.replace(str(tmp_path / "out"), "{out}") for a in args]
    line = runner.command_line(task)
    claim = tmp_path / "out" / "claims" / f"{run.id}.claim"
    assert line.startswith(f"OMP_NUM_THREADS=1 FLATMINIMA_CLAIM={claim} python cli.py fit ")
    assert shlex.split(line)[4:] == args  # the printed command is exactly the run's argument list


@pytest.mark.parametrize(
    "value, text",
    [
        (True, "true"),
        (None, "null"),
        (0.001, "0.001"),
        (float("inf"), ".inf"),
        ([1, 2], "[1,2]"),
        ({"a": 1}, '{"a":1}'),
        ("x.y", "x.y"),
        (3, "3"),
    ],
)
def test_override_values_are_written_as_yaml_for_the_cli(value, text):
    assert runner.cli_value(value) == text


def test_overrides_reach_the_instantiated_run():
    study = parse(grid(), "s.yaml")
    run = next(r for r in study.runs() if r.axes == {"optim": "sgd", "rule": "sam", "rho": "0.1"})
    args = list(runner.make_task(run, "unused", 1, ROOT).args)
    keep = [
        a
        for a in args[1:]
        if not a.startswith(("--trainer.callbacks+=", "--trainer.logger=", "--trainer.default_root_dir="))
    ]
    with torch.no_grad():
        built = cli.main([*keep, "--trainer.logger=false"], run=False)
    assert type(built.model.minimizer).__name__ == "SAM" and built.model.minimizer.rho == 0.1
    assert built.model.configure_optimizers().param_groups[0]["lr"] == 0.5
    assert built.trainer.max_epochs == 2


BAD = [
    ({"axes": {"optim": {"adam": "configs/optim/adamm.yaml"}}}, "axes.optim.adam: file not found: configs/optim/adamm"),
    ({"base": ["configs/data/nope.yaml"]}, "base[0]: file not found"),
    ({"axes": {"optim": {"adam": {"config": "configs/optim/adam.yaml"}}}}, "axes.optim.adam.config: unknown key"),
    ({"axis": {}}, "axis: unknown key; expected one of name, description"),
    ({"axes": {"seed": {"a": "configs/optim/adam.yaml"}}}, "axes.seed: invalid axis name"),
    ({"axes": {"optim": {"a/b": "configs/optim/adam.yaml"}}}, "axes.optim.a/b: invalid name"),
    ({"axes": {"optim": {}}}, "axes.optim: an axis needs at least one value"),
    ({"seeds": [0, 0]}, "seeds: seeds must be distinct"),
    ({"seeds": -1}, "seeds: expected a count >= 1"),
    ({"seeds": [1.5]}, "seeds: expected a count >= 1 or a list of integers"),
    ({"overrides": {"trainer max_epochs": 1}}, "overrides.trainer max_epochs: expected a dotted config key"),
    ({"resources": {"gpu": -0.5}}, "resources.gpu: expected a number >= 0"),
    ({"resources": {"cpus": 1}}, "resources.cpus: unknown key"),
    ({"analysis": {"groups": ["net"]}}, "analysis.groups[0]: unknown axis 'net'"),
    ({"analysis": {"x": 3}}, "analysis.x: expected a key or a list of keys"),
    (
        {"analysis": {"ks": [{"axis": "optim", "groups": {"a": ["adamw"], "b": ["sgd"]}, "keys": ["test/acc"]}]}},
        "analysis.ks[0].groups.a: unknown optim value 'adamw'",
    ),
    (
        {"analysis": {"ks": [{"axis": "optim", "keys": ["k"], "groups": {"a": ["sgd"]}}]}},
        "analysis.ks[0].groups: expected at least two groups",
    ),
    ({"analysis": {"ks": [{"axis": "optim"}]}}, "analysis.ks[0].keys: missing"),
    ({"analysis": {"bootstrap": -1}}, "analysis.bootstrap: expected an integer >= 0"),
    ({"base": [], "axes": {"optim": {"a": {"overrides": {"x.y": 1}}}}}, "base: no config file"),
]


@pytest.mark.parametrize("change, needle", BAD, ids=[n.split(":")[0] for _, n in BAD])
def test_bad_study_files_are_refused_in_one_line_naming_the_key(change, needle):
    data = {**grid(), **change}
    with pytest.raises(StudyError) as info:
        parse(data, "bad.yaml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("bad.yaml: ")
    assert needle in message, message


def test_unreadable_study_files(tmp_path):
    with pytest.raises(StudyError, match="study file not found"):
        load(tmp_path / "none.yaml")
    (tmp_path / "s.yaml").write_text("axes: [\n")
    with pytest.raises(StudyError, match="not valid YAML"):
        load(tmp_path / "s.yaml")
    (tmp_path / "s.yaml").write_text("- 1\n")
    with pytest.raises(StudyError, match="s.yaml: [(]top level[)]: expected a mapping"):
        load(tmp_path / "s.yaml")


def test_the_study_cli_prints_the_error_and_exits_2(tmp_path, capsys):
    from flatminima.studies.cli import main

    (tmp_path / "s.yaml").write_text("base: [configs/data/moons.yaml]\naxes: {optim: {adam: nope.yaml}}\n")
    assert main(["run", str(tmp_path / "s.yaml"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "axes.optim.adam: file not found: nope.yaml" in err and "\n" not in err


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_every_study_file_is_valid_and_each_axis_value_instantiates(path, tmp_path):
    """Each value of each axis appears in one instantiated run (through the CLI, no training)."""
    study = load(path.relative_to(ROOT))
    runs = study.runs()
    assert runs and study.analysis.y  # x may be left out: every final sharpness/complexity measure
    needed = {(a.name, v.name) for a in study.axes for v in a.values}
    chosen = []
    for run in runs:
        if needed & set(run.axes.items()):
            needed -= set(run.axes.items())
            chosen.append(run)
    for run in chosen:
        args = list(runner.make_task(run, tmp_path, 1, ROOT).args)
        built = cli.main([*args[1:], "--trainer.logger=false"], run=False)
        assert any(type(c).__name__ == "RunSummary" for c in built.trainer.callbacks)
