"""The Ray engine: each run is a Ray Tune trial (``tune.Tuner``), on a local Ray instance or a cluster.

Ray Tune brings scheduling over a cluster's CPUs and GPUs (``tune.with_resources``: CPUs and GPUs per
run, fractional GPUs so several small runs share one device), reuse of the trial actors between runs
(torch and Lightning imported once per actor) and fault handling. A trial runs
:func:`flatminima.studies.runner.run_task`, the same function as the local engine, so both write the same files;
the summary also travels back in the trial's result, and the driver writes it into ``DIR/runs/<id>/`` when
the trial ran on a node that does not share the file system (logs and checkpoints then stay there).

Claims: a trial claims its run before training it (in the name of the driver, the ``study run`` process,
whose heartbeat keeps the claim alive and whose death makes it stale) and releases it once the summary is
written; a trial whose run another process holds returns at once.

Ray's worker processes import this checkout: its root goes first on their ``PYTHONPATH`` through the
job's ``runtime_env``. On a multi-node cluster (``--address``) the checkout and the study folder should
be at the same paths on every node (a shared file system), as usual for clusters.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flatminima.cli_support import claims as claim_files
from flatminima.formats.summary import decode, dumps, read_json, write_json

from .. import runner
from ..runner import RunResult, Task
from ..spec import Resources
from . import Claims, OnDone, OnStart

MISSING = 'the ray engine needs Ray Tune: pip install "flatminima[ray]"'


def _import_ray() -> Any:
    try:
        import ray
        from ray import tune  # noqa: F401
    except ImportError:
        raise RuntimeError(MISSING) from None
    return ray


def _trainable(config: dict[str, Any]) -> None:
    """One trial: claim the run (for the driver), run it in this (reused) actor process, report result and summary."""
    from ray import tune

    config = config["run"]
    task = runner.Task.from_dict(config["task"])
    claim = config.get("claim")
    if claim is not None:
        path, owner = Path(claim["path"]), claim_files.Owner(**claim["owner"])
        outcome = claim_files.acquire(path, owner)
        if not outcome.acquired:
            holder = outcome.holder.describe() if outcome.holder else "another process"
            tune.report({"status": "elsewhere", "error": f"claimed by {holder}", "seconds": 0.0})
            return
    try:
        result = runner.run_task(task)
    finally:
        if claim is not None:
            claim_files.release(path, owner)
    tune.report(
        {
            "status": result.status,
            "error": result.error or "",
            "seconds": result.seconds,
            "summary_json": dumps(result.summary),
        }
    )


class RayEngine:
    """Run tasks as Ray Tune trials.

    Args:
        out: The study folder (Ray Tune's own records go to ``out/ray``).
        resources: CPUs and GPUs per run (fractional GPUs allowed).
        workers: At most this many runs at once (None: as many as the resources allow).
        address: An existing cluster (``ray://host:10001`` or ``auto``); None starts a local instance.
    """

    def __init__(
        self, out: str | os.PathLike, resources: Resources, workers: int | None = None, address: str | None = None
    ) -> None:
        self.out = Path(out).resolve()
        self.resources = resources
        self.workers = workers
        self.address = address

    def run(
        self,
        tasks: Sequence[Task],
        claims: Claims | None = None,
        on_start: OnStart | None = None,
        on_done: OnDone | None = None,
    ) -> list[RunResult]:
        """Run every task as one trial (those another process holds return at once); one result per task run."""
        ray = _import_ray()
        from ray import tune

        os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(
                address=self.address,
                runtime_env=_runtime_env(),
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.ERROR,
                configure_logging=True,
            )
        by_id = {t.id: t for t in tasks}
        configs = [
            {
                "task": t.as_dict(),
                "claim": None if claims is None else {"path": str(claims.path(t)), "owner": asdict(claims.owner)},
            }
            for t in tasks
        ]
        try:
            tuner = tune.Tuner(
                tune.with_resources(_trainable, {"cpu": self.resources.cpu, "gpu": self.resources.gpu}),
                param_space={"run": tune.grid_search(configs)},
                tune_config=tune.TuneConfig(
                    max_concurrent_trials=self.workers,
                    reuse_actors=True,
                    trial_name_creator=_trial_id,
                    trial_dirname_creator=_trial_id,
                ),
                run_config=tune.RunConfig(
                    name="tune",
                    storage_path=str(self.out / "ray"),
                    verbose=0,
                    failure_config=tune.FailureConfig(max_failures=0),
                    callbacks=[_events(by_id, claims, on_start, on_done)],
                ),
            )
            grid = tuner.fit()
            results = [_result(by_id, claims, r) for r in grid]
            return [r for r in results if r.status != "elsewhere"]
        finally:
            if started_here:
                ray.shutdown()


def _runtime_env() -> dict[str, Any]:
    """The trial processes' environment: a clone's root on ``PYTHONPATH`` and its ``cli.use_this_checkout``
    run first in each worker (the clone is then the package ``flatminima``); an installed package as is."""
    env: dict[str, Any] = {"env_vars": {"PYTHONPATH": runner.checkout_pythonpath(), "RAY_CHDIR_TO_TRIAL_DIR": "0"}}
    if runner.CHECKOUT:
        env["worker_process_setup_hook"] = "cli.use_this_checkout"
    return env


def _trial_id(trial: Any) -> str:
    return trial.config["run"]["task"]["id"]


def _result(by_id: dict[str, Task], claims: Claims | None, result: Any) -> RunResult:
    """A task's result from a Tune result; writes the summary on this machine when it is missing or stale."""
    task = by_id[result.config["run"]["task"]["id"]]
    metrics = result.metrics or {}
    if metrics.get("status") == "elsewhere":
        return runner.elsewhere(task, metrics.get("error") or None)
    if result.error is not None or "summary_json" not in metrics:
        error = f"Ray trial failed: {_first_line(result.error)}" if result.error else "Ray trial reported nothing"
        if claims is not None and not claims.holds(task) and not claims.acquire(task):
            return runner.elsewhere(task, error)  # another process has the run and records it
        summary = runner.read_run_summary(task.out, task.id)
        outcome = (
            runner.result_of(task, summary, 0.0)
            if summary is not None and summary.get("status") == "failed"
            else runner.failed(task, error)
        )
        if claims is not None:
            claims.release(task)
        return outcome
    summary = decode(json.loads(metrics["summary_json"]))
    path = runner.run_dir(task.out, task.id) / "summary.json"
    if read_json(path) != json.loads(metrics["summary_json"]):  # compared as written ("nan" == "nan")
        write_json(path, summary)
    return runner.result_of(task, summary, float(metrics.get("seconds", 0.0)))


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


@dataclass(frozen=True)
class _Context:
    """What the driver-side callback works with (never pickled: Tune saves its state, this is this process's)."""

    by_id: dict[str, Task]
    claims: Claims | None
    on_start: OnStart | None
    on_done: OnDone | None


def _events(by_id: dict[str, Task], claims: Claims | None, on_start: OnStart | None, on_done: OnDone | None) -> Any:
    """A Tune callback (driver side): keeps the trials' claims alive and tells the progress line of starts and ends."""
    from ray import tune

    class Events(tune.Callback):
        def __init__(self, context: _Context | None) -> None:
            self.context = context
            self.last: dict[str, dict[str, Any]] = {}

        def __getstate__(self) -> dict[str, Any]:  # Tune pickles its run config: leave the live objects out
            return {"context": None, "last": {}}

        def on_trial_start(self, iteration, trials, trial, **info):
            task = self.context.by_id[_trial_id(trial)]
            if self.context.claims is not None:
                self.context.claims.track(task)
            if self.context.on_start is not None:
                self.context.on_start(task, 0)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.last[_trial_id(trial)] = result

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._done(trial, self.last.get(_trial_id(trial), {}))

        def on_trial_error(self, iteration, trials, trial, **info):
            self._done(trial, {"status": "failed", "error": "Ray trial failed (its error is in DIR/ray)"})

        def _done(self, trial, result):
            task, claims = self.context.by_id[_trial_id(trial)], self.context.claims
            status = result.get("status", "failed")
            if claims is not None and status == "elsewhere":
                claims.forget(task)
            elif claims is not None:
                claims.untrack(task)
            if self.context.on_done is None:
                return
            if status == "elsewhere":
                self.context.on_done(runner.elsewhere(task, result.get("error") or None))
            else:  # the summary as the trial reported it (or the failure Tune saw; the driver records it after)
                summary = (
                    decode(json.loads(result["summary_json"]))
                    if result.get("summary_json")
                    else {"id": task.id, "status": "failed", "error": result.get("error") or "Ray trial failed"}
                )
                self.context.on_done(runner.result_of(task, summary, float(result.get("seconds", 0.0))))

    return Events(_Context(by_id, claims, on_start, on_done))
