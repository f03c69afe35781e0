"""The Ray engine: each run is a Ray Tune trial (``tune.Tuner``), on a local Ray instance or a cluster.

Ray Tune brings scheduling over a cluster's CPUs and GPUs (``tune.with_resources``: CPUs and GPUs per
run, fractional GPUs so several small runs share one device), reuse of the trial actors between runs
(torch and Lightning imported once per actor) and fault handling. A trial runs
:func:`studies.runner.run_task`, the same function as the local engine, so both write the same files;
the summary also travels back in the trial's result, and the driver writes it into ``DIR/runs/<id>/`` when
the trial ran on a node that does not share the file system (logs and checkpoints then stay there).

Ray's worker processes import this checkout: its root goes first on their ``PYTHONPATH`` through the
job's ``runtime_env``. On a multi-node cluster (``--address``) the checkout and the study folder should
be at the same paths on every node (a shared file system), as usual for clusters.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import runner
from formats.summary import decode, dumps, read_json, write_json
from ..spec import Resources

MISSING = 'the ray engine needs Ray Tune: pip install "flatminima[ray]"'


def _import_ray() -> Any:
    try:
        import ray
        from ray import tune  # noqa: F401
    except ImportError:
        raise RuntimeError(MISSING) from None
    return ray


def _trainable(config: dict[str, Any]) -> None:
    """One trial: run the task in this (reused) actor process and report its result and summary."""
    from ray import tune

    result = runner.run_task(config["task"])
    tune.report({"status": result["status"], "error": result["error"] or "", "seconds": result["seconds"],
                 "summary_json": dumps(result["summary"])})


class RayEngine:
    """Run tasks as Ray Tune trials.

    Args:
        out: The study folder (Ray Tune's own records go to ``out/ray``).
        resources: CPUs and GPUs per run (fractional GPUs allowed).
        workers: At most this many runs at once (None: as many as the resources allow).
        address: An existing cluster (``ray://host:10001`` or ``auto``); None starts a local instance.
    """

    def __init__(self, out: str | os.PathLike, resources: Resources, workers: int | None = None,
                 address: str | None = None) -> None:
        self.out = Path(out).resolve()
        self.resources = resources
        self.workers = workers
        self.address = address

    def run(self, tasks: list[dict[str, Any]], on_start: Callable[[dict[str, Any], int], None] | None = None,
            on_done: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """Run every task as one trial; returns one result per task (``{id, status, error, seconds, summary}``)."""
        ray = _import_ray()
        from ray import tune

        os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(address=self.address, runtime_env=_runtime_env(), include_dashboard=False,
                     log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
        by_id = {t["id"]: t for t in tasks}
        try:
            tuner = tune.Tuner(
                tune.with_resources(_trainable, {"cpu": self.resources.cpu, "gpu": self.resources.gpu}),
                param_space={"task": tune.grid_search(tasks)},
                tune_config=tune.TuneConfig(max_concurrent_trials=self.workers, reuse_actors=True,
                                            trial_name_creator=_trial_id, trial_dirname_creator=_trial_id),
                run_config=tune.RunConfig(name="tune", storage_path=str(self.out / "ray"), verbose=0,
                                          failure_config=tune.FailureConfig(max_failures=0),
                                          callbacks=[_events(by_id, on_start, on_done)]),
            )
            grid = tuner.fit()
            return [_result(by_id, r) for r in grid]
        finally:
            if started_here:
                ray.shutdown()


def _runtime_env() -> dict[str, Any]:
    path = os.pathsep.join(p for p in (str(runner.ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path, "RAY_CHDIR_TO_TRIAL_DIR": "0"}}


def _trial_id(trial: Any) -> str:
    return trial.config["task"]["id"]


def _result(by_id: dict[str, dict[str, Any]], result: Any) -> dict[str, Any]:
    """A task result from a Tune result; writes the summary on this machine when it is missing or stale."""
    task = by_id[result.config["task"]["id"]]
    metrics = result.metrics or {}
    if result.error is not None or "summary_json" not in metrics:
        error = f"Ray trial failed: {_first_line(result.error)}" if result.error else "Ray trial reported nothing"
        summary = runner.read_run_summary(task["out"], task["id"])
        if summary is None or summary.get("status") != "failed":
            summary = runner.write_failed(task, error)
        return {"id": task["id"], "status": "failed", "error": summary.get("error"), "seconds": 0.0,
                "summary": summary}
    summary = decode(json.loads(metrics["summary_json"]))
    path = runner.run_dir(task["out"], task["id"]) / "summary.json"
    if read_json(path) != json.loads(metrics["summary_json"]):  # compared as written ("nan" == "nan")
        write_json(path, summary)
    return {"id": task["id"], "status": summary["status"], "error": summary.get("error"),
            "seconds": float(metrics.get("seconds", 0.0)), "summary": summary}


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


def _events(by_id: dict[str, dict[str, Any]], on_start: Callable[[dict[str, Any], int], None] | None,
            on_done: Callable[[dict[str, Any]], None] | None) -> Any:
    """A Tune callback (driver side) telling the progress line when trials start and end."""
    from ray import tune

    class Events(tune.Callback):
        def __init__(self) -> None:
            self.last: dict[str, dict[str, Any]] = {}

        def on_trial_start(self, iteration, trials, trial, **info):
            if on_start is not None:
                on_start(by_id[_trial_id(trial)], 0)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.last[_trial_id(trial)] = result

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._done(trial, self.last.get(_trial_id(trial), {}))

        def on_trial_error(self, iteration, trials, trial, **info):
            self._done(trial, {"status": "failed", "error": "Ray trial failed (its error is in DIR/ray)"})

        def _done(self, trial, result):
            if on_done is not None:
                on_done({"id": _trial_id(trial), "status": result.get("status", "failed"),
                         "error": result.get("error") or None, "seconds": result.get("seconds", 0.0)})

    return Events()
