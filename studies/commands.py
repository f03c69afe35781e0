"""The two study commands as functions: run a study (or print its commands), analyse a study folder."""

from __future__ import annotations

import io
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from flatminima.cli_support import claims
from flatminima.formats.summary import Summary, read_json

from . import analysis, pool, report, runner, shared
from .engines import Engine
from .progress import Progress
from .runner import RunResult, Task
from .spec import Study, StudyError, load


def default_out(study: Study) -> Path:
    """``logs/studies/<name>`` (relative to the current directory)."""
    return Path("logs") / "studies" / study.name


def default_workers(threads: int) -> int:
    """The CPUs this process may use, divided by the threads per run (at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, threads))


def tasks_of(study: Study, out: str | Path) -> list[Task]:
    """One task per run of the grid, run from the current directory."""
    return [runner.make_task(run, out, study.resources.threads, Path.cwd()) for run in study.runs()]


def dry_run(study: Study, out: str | Path, stream: TextIO | None = None) -> int:
    """Print one ``python cli.py fit ...`` command per run (to run from the current directory); write nothing."""
    stream = stream or sys.stdout
    stream.write(f"# {study.name}: {len(study.runs())} runs; run each command from {Path.cwd()}\n")
    for task in tasks_of(study, out):
        stream.write(runner.command_line(task) + "\n")
    return 0


def run(
    study: Study,
    out: str | Path,
    *,
    engine: str = "local",
    workers: int | None = None,
    address: str | None = None,
    timeout: float | None = None,
    analyze_after: bool = True,
    stream: TextIO | None = None,
) -> int:
    """Run the runs not finished yet, sharing the study folder with any other process; 0 if every run finished.

    Each run is claimed before it is trained (:mod:`flatminima.studies.shared`): this process trains the runs it can
    claim, waits for those other processes train, and ends when every run is settled; the last process
    out writes the analysis. Returns 0 when every run finished, else 1.
    """
    stream = stream or sys.stderr
    out = Path(out)
    tasks = tasks_of(study, out)
    out.mkdir(parents=True, exist_ok=True)
    _copy_study_file(study, out)
    owner = claims.Owner.this_process("study run")
    attempts_at_start, stamp_at_start = shared.attempts(tasks), read_json(shared.analysis_stamp(out))
    finished_before = {t.id for t in tasks if runner.is_done(t)}
    progress = Progress(len(tasks), skipped=len(finished_before), stream=stream)
    stream.write(
        f"study {study.name}: {len(tasks)} runs, {len(tasks) - len(finished_before)} to run "
        f"({engine} engine) -> {out}\n"
    )
    mine: set[str] = set()

    def done(result: RunResult) -> None:
        if result.status != "elsewhere":
            mine.add(result.id)
        progress.ended(result)

    with claims.Heartbeat(owner) as heartbeat:
        ledger = shared.Ledger(out, heartbeat, attempts_at_start, stream)
        while True:
            state = shared.survey(tasks, ledger)
            progress.elsewhere(
                len(set(state.finished) - finished_before - mine),
                len(state.failed_elsewhere),
                len(state.running_elsewhere),
            )
            if state.pending:
                _engine(engine, study, out, workers, address, timeout, len(state.pending)).run(
                    state.pending, claims=ledger, on_start=lambda task, pid: progress.started(task.id), on_done=done
                )
            elif state.running_elsewhere:
                time.sleep(shared.poll_seconds())
            else:
                break
        progress.close()
        if analyze_after:
            shared.analyze_once(out, owner, stamp_at_start, lambda: analyze(out, stream=stream), stream)
    summaries = [runner.read_run_summary(out, t.id) or {} for t in tasks]
    return 0 if all(s.get("status") == "finished" for s in summaries) else 1


def _copy_study_file(study: Study, out: Path) -> None:
    """``DIR/study.yaml``: the study file, copied when it differs (its analysis section drives ``study analyze``)."""
    target = out / "study.yaml"
    if target.exists() and (target.samefile(study.path) or target.read_bytes() == Path(study.path).read_bytes()):
        return
    tmp = out / f".study.yaml.{os.getpid()}.tmp"
    shutil.copyfile(study.path, tmp)
    os.replace(tmp, target)


def _engine(
    name: str, study: Study, out: Path, workers: int | None, address: str | None, timeout: float | None, pending: int
) -> Engine:
    if name == "local":
        from .engines.local import LocalEngine

        count = min(pending, workers or default_workers(study.resources.threads))
        return LocalEngine(workers=count, threads=study.resources.threads, timeout=timeout)
    if name == "ray":
        from .engines.ray import RayEngine

        return RayEngine(out, study.resources, workers=workers, address=address)
    raise ValueError(f"Invalid engine: {name!r}; expected 'local' or 'ray'")


def with_resources(study: Study, cpu: float | None, gpu: float | None) -> Study:
    """The study with its per-run resources overridden by the command line (None keeps the file's)."""
    resources = study.resources
    if cpu is not None:
        if not cpu > 0:
            raise StudyError(f"Invalid --cpus-per-run: {cpu}; expected a number > 0")
        resources = replace(resources, cpu=float(cpu))
    if gpu is not None:
        if not gpu >= 0:
            raise StudyError(f"Invalid --gpus-per-run: {gpu}; expected a number >= 0")
        resources = replace(resources, gpu=float(gpu))
    return replace(study, resources=resources)


def analyze(
    directory: str | Path,
    x: list[str] | None = None,
    y: list[str] | None = None,
    groups: list[str] | None = None,
    bootstrap: int | None = None,
    figures: bool = True,
    stream: TextIO | None = None,
) -> dict[str, Any]:
    """Analyse ``DIR/runs/*/summary.json``; write results.csv, analysis.json/md, figures and TensorBoard."""
    stream = stream or sys.stderr
    directory = Path(directory)
    summaries = pool.load(directory)
    if not summaries:
        raise StudyError(f"{directory}: no runs/*/summary.json to analyse")
    study = load(directory / "study.yaml", check_files=False) if (directory / "study.yaml").is_file() else None
    plan = study.analysis if study is not None else None
    xs = x or list(plan.x if plan and plan.x else pool.default_x(summaries))
    ys = y or list(plan.y if plan and plan.y else pool.default_y(summaries))
    group_axes = groups if groups is not None else (list(plan.groups) if plan and plan.groups is not None else None)
    resamples = bootstrap if bootstrap is not None else (plan.bootstrap if plan else 1000)
    require = plan.require if plan else ()
    result = analysis.analyze(
        summaries,
        xs,
        ys,
        group_axes=group_axes,
        ks=plan.ks if plan else (),
        resamples=resamples,
        seed=plan.seed if plan else 0,
        require=require,
    )
    finished, _ = analysis.apply_requirements(analysis.split_pool(summaries)[0], require)
    names = _figures(directory, finished, result, result["axes"]) if figures else []
    keys = pool.metric_keys(summaries)
    report.write_csv(directory / "results.csv", summaries, result["axes"], keys)
    report.write_analysis_json(directory / "analysis.json", result)
    title = study.name if study is not None else directory.name
    (directory / "analysis.md").write_text(report.markdown(result, title, names), encoding="utf-8")
    stream.write(
        f"analysis: {directory / 'analysis.md'} ({result['runs']['finished']} runs, "
        f"{result['runs']['left_out']} left out), {len(names)} figures in {directory / 'figures'}, "
        f"TensorBoard: tensorboard --logdir {directory / 'tensorboard'}\n"
    )
    return result


def _figures(directory: Path, runs: list[Summary], result: dict[str, Any], axes: list[str]) -> list[str]:
    """Save the figures as PNG and to TensorBoard, one at a time; returns their paths relative to ``directory``."""
    from . import board, figures

    folder = directory / "figures"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    names = []
    with board.Board(directory / "tensorboard") as tensorboard:
        for name, fig in figures.make_all(runs, result):
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png")
            png = buffer.getvalue()
            (folder / f"{name}.png").write_bytes(png)
            tensorboard.add_image(f"study/{name}", png)
            names.append(f"figures/{name}.png")
        tensorboard.add_runs(runs, axes)
    return names
