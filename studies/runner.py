"""Run ONE run of a study in the current process, through the same LightningCLI code path as ``cli.py fit``.

A run is ``flatminima.cli_support.app.main(["fit", ...])`` (what ``python cli.py fit`` runs) with the study's configs and overrides, the seed, a TensorBoard logger
and checkpoints in ``DIR/runs/<id>/``, the :class:`~flatminima.callbacks.summary.RunSummary` callback and
``--test_after_fit=true`` — exactly the argument list ``study run --dry-run`` prints as
``python cli.py fit ...``, so a printed command run by hand writes the same summary. The run's stdout,
stderr and Lightning's logging go to ``DIR/runs/<id>/log.txt``. Global state a run may change (torch's
default dtype, thread count and deterministic flags, warnings filters, signal handlers, environment,
working directory, logging levels) is restored afterwards, so a reused worker process gives the result a
fresh process gives.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import shlex
import shutil
import signal
import sys
import threading
import time
import traceback
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from flatminima.cli_support import processes
from flatminima.cli_support.claims import CLAIM_ENV
from flatminima.formats.summary import Summary, read_json, read_summary, write_json

from .spec import Run

ROOT = Path(__file__).resolve().parents[1]
CHECKOUT = (ROOT / "setup.cfg").is_file()
"""Whether ``ROOT`` is a clone of the repository (else an installed package, whose folder must never go on a
path: its subpackages would become top-level modules of their own)."""


def checkout_pythonpath() -> str:
    """``PYTHONPATH`` for the processes a study starts: the clone's root first (its ``cli.py`` makes the clone
    the package ``flatminima``, even where an editable install points elsewhere), else unchanged."""
    current = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join(p for p in (str(ROOT) if CHECKOUT else "", current) if p)


WARM_MODULES = ("flatminima.cli_support.app",)
"""What a worker imports before its first run (torch, Lightning and the project, through the CLI)."""
OUT_PLACEHOLDER = "{out}"


# ---------------------------------------------------------------------------------------- the task
@dataclass(frozen=True)
class Task:
    """One run as an engine sends it to a worker (picklable; :meth:`as_dict` for Ray's JSON-like configs).

    ``portable`` is the argument list with the output directory as ``{out}`` (a finished run is skipped
    only while it is unchanged); ``args`` the same with DIR in place.
    """

    id: str
    axes: Mapping[str, str]
    seed: int
    out: str
    threads: int
    cwd: str
    portable: tuple[str, ...]
    args: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        """The fields as plain values (lists for the argument tuples)."""
        return {**asdict(self), "axes": dict(self.axes), "portable": list(self.portable), "args": list(self.args)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Task:
        """The task :meth:`as_dict` described."""
        return cls(
            **{**data, "axes": dict(data["axes"]), "portable": tuple(data["portable"]), "args": tuple(data["args"])}
        )


RunStatus = Literal["finished", "failed", "elsewhere"]


@dataclass(frozen=True)
class RunResult:
    """What became of a task: ``finished`` or ``failed`` here (with the summary written), or ``elsewhere``.

    ``elsewhere``: not run by this process, since another holds the run's claim (``error`` says who).
    """

    id: str
    status: RunStatus
    error: str | None
    seconds: float
    summary: Summary | None = None


def make_task(run: Run, out: str | os.PathLike, threads: int, cwd: str | os.PathLike) -> Task:
    """The :class:`Task` of ``run``, writing into the study folder ``out``, run from ``cwd``."""
    portable = tuple(fit_args(run, OUT_PLACEHOLDER))
    return Task(
        id=run.id,
        axes=dict(run.axes),
        seed=run.seed,
        out=str(out),
        threads=int(threads),
        cwd=str(Path(cwd).resolve()),
        portable=portable,
        args=tuple(a.replace(OUT_PLACEHOLDER, str(out)) for a in portable),
    )


def result_of(task: Task, summary: Summary, seconds: float) -> RunResult:
    """The result of a task that ran here, from the summary it left."""
    return _result(task, summary["status"], summary.get("error"), seconds, summary)


def elsewhere(task: Task, why: str | None) -> RunResult:
    """The result of a task this process did not run: another process holds its claim (``why``: who, or how)."""
    return _result(task, "elsewhere", why, 0.0, None)


def _result(task: Task, status: RunStatus, error: str | None, seconds: float, summary: Summary | None) -> RunResult:
    """The one place a :class:`RunResult` is built."""
    return RunResult(id=task.id, status=status, error=error, seconds=seconds, summary=summary)


def failed(task: Task, error: str, seconds: float = 0.0) -> RunResult:
    """Record ``task`` as failed with ``error`` (:func:`write_failed`) and return its result."""
    return result_of(task, write_failed(task, error), seconds)


def run_dir(out: str | os.PathLike, run_id: str) -> Path:
    """``DIR/runs/<id>``."""
    return Path(out) / "runs" / run_id


def claim_path(out: str | os.PathLike, run_id: str) -> Path:
    """``DIR/claims/<id>.claim``: the run's claim while a process trains it (:mod:`flatminima.cli_support.claims`)."""
    return Path(out) / "claims" / f"{run_id}.claim"


def fit_args(run: Run, out: str | os.PathLike) -> list[str]:
    """The ``cli.py`` arguments of a run: configs, overrides, seed, logger, summary callback, test after fit."""
    folder = run_dir(out, run.id)
    logger = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(Path(out) / "runs"), "name": run.id, "version": "", "default_hp_metric": False},
    }
    summary = {
        "class_path": "flatminima.callbacks.RunSummary",
        "init_args": {
            "path": str(folder / "summary.json"),
            "run_id": run.id,
            "axes": dict(run.axes),
            "seed": run.seed,
            "finish_after": "test",
        },
    }
    args = ["fit"]
    for config in run.configs:
        args += ["--config", config]
    args += [f"--{key}={cli_value(value)}" for key, value in run.overrides]
    args += [
        f"--seed_everything={run.seed}",
        f"--trainer.logger={_json(logger)}",
        f"--trainer.default_root_dir={folder}",
        "--trainer.enable_progress_bar=false",
        f"--trainer.callbacks+={_json(summary)}",
        "--test_after_fit=true",
    ]
    return args


def command_line(task: Task) -> str:
    """The shell command of a task, run from ``cwd``: ``OMP_NUM_THREADS=<threads> FLATMINIMA_CLAIM=<claim> python
    cli.py fit ...`` (an installed package: ``flatminima fit ...``, the console script); the command claims the
    run while it trains (:func:`flatminima.cli_support.app.entry`)."""
    if CHECKOUT:
        cli_path = ROOT / "cli.py"
        try:
            shown = str(cli_path.relative_to(task.cwd))  # `cli.py` from the repository root
        except ValueError:
            shown = str(cli_path)
        words = ["python", shown, *task.args]
    else:
        words = ["flatminima", *task.args]
    return f"OMP_NUM_THREADS={task.threads} {CLAIM_ENV}={shlex.quote(str(claim_path(task.out, task.id)))} " + " ".join(
        shlex.quote(w) for w in words
    )


def cli_value(value: Any) -> str:
    """A value as LightningCLI parses it from the command line (YAML): strings as given, the rest as YAML."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    if isinstance(value, (int, float)):
        return repr(value)
    return _json(value)


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


# ---------------------------------------------------------------------------------------- status on disk
def read_run_summary(out: str | os.PathLike, run_id: str) -> Summary | None:
    """The run's ``summary.json`` (numbers decoded), or None when absent or unreadable."""
    return read_summary(run_dir(out, run_id) / "summary.json")


def is_done(task: Task) -> bool:
    """True when the summary says finished and the run's arguments are those it was run with."""
    summary = read_run_summary(task.out, task.id)
    if summary is None or summary.get("status") != "finished":
        return False
    recorded = read_json(run_dir(task.out, task.id) / "run.json")
    if recorded is None:
        return True  # a pool trained elsewhere: the summary is all there is
    return recorded.get("args") == list(task.portable)


def attempt_of(task: Task) -> str | None:
    """The id of the run's latest attempt (``run.json``'s ``attempt``, new at each start), None when unknown."""
    recorded = read_json(run_dir(task.out, task.id) / "run.json")
    return recorded.get("attempt") if isinstance(recorded, dict) else None


def write_failed(task: Task, error: str) -> Summary:
    """Record a failed run (keeping what a partial summary already holds); returns the summary."""
    summary = read_run_summary(task.out, task.id) or {}
    summary.update(id=task.id, status="failed", error=error, axes=dict(task.axes), seed=task.seed)
    summary.setdefault("metrics", {})
    write_json(run_dir(task.out, task.id) / "summary.json", summary)
    return summary


# ---------------------------------------------------------------------------------------- one run
def run_task(task: Task) -> RunResult:
    """Run one task in this process (the caller holds its claim); never raises.

    The run's folder is cleared first (a rerun starts clean: no events or checkpoints of an interrupted
    try). ``DIR/runs/<id>/run.json`` records the command, the arguments and a new attempt id (before the
    run), then the worker's host and pid, the task's seconds and the seconds inside ``flatminima.cli_support.app.main``.
    """
    start = time.perf_counter()
    with isolated(task.cwd, task.threads):
        folder = run_dir(task.out, task.id)
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        record = {
            "id": task.id,
            "axes": dict(task.axes),
            "seed": task.seed,
            "command": command_line(task),
            "args": list(task.portable),
            "attempt": uuid.uuid4().hex,
        }
        write_json(folder / "run.json", record)
        failure: BaseException | None = None
        cli_start = time.perf_counter()
        with redirected(folder / "log.txt"):
            try:
                _call_cli(task.args)
            except KeyboardInterrupt:
                raise
            except BaseException as err:  # noqa: BLE001 - a failed run must not stop the worker
                failure = err
                if not isinstance(err, SystemExit):
                    traceback.print_exc()
        cli_seconds = time.perf_counter() - cli_start
        error = _error(failure, folder / "log.txt")
        summary = read_run_summary(task.out, task.id)
        if error is None and (summary is None or summary.get("status") != "finished"):
            error = "the run ended without a finished summary (see log.txt)"
        if error is not None:
            summary = write_failed(task, (summary or {}).get("error") or error)
        seconds = time.perf_counter() - start
        write_json(
            folder / "run.json",
            {**record, "host": processes.host(), "pid": os.getpid(), "seconds": seconds, "cli_seconds": cli_seconds},
        )
    return result_of(task, summary, seconds)


def _call_cli(args: tuple[str, ...] | list[str]) -> None:
    """The one call into the CLI: ``flatminima.cli_support.app.main(args)``, what ``python cli.py`` runs (fit, then test)."""
    from flatminima.cli_support.app import main

    main(list(args))


def warm_up(modules: Sequence[str] = WARM_MODULES) -> None:
    """Import what a run needs (torch, Lightning, the CLI) once per worker process."""
    for name in modules:
        importlib.import_module(name)


def _error(failure: BaseException | None, log: Path) -> str | None:
    """``Type: message`` of an exception; for a ``SystemExit`` of the CLI, its last ``error:`` message on one line."""
    if failure is None:
        return None
    if not isinstance(failure, SystemExit):
        return f"{type(failure).__name__}: {failure}"
    exit_ = failure
    if exit_.code in (0, None):
        return "the CLI exited before training (exit code 0)"
    lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    starts = [i for i, ln in enumerate(lines) if ln.startswith("error:")]
    detail = " ".join(lines[starts[-1] :]) if starts else (lines[-1] if lines else "")
    detail = detail if len(detail) <= 600 else detail[:597] + "..."
    return f"SystemExit({exit_.code}): {detail}" if detail else f"SystemExit({exit_.code})"


# ---------------------------------------------------------------------------------------- isolation
@contextlib.contextmanager
def redirected(path: Path) -> Iterator[None]:
    """Send stdout and stderr to ``path`` (file descriptors 1 and 2, and ``sys.stdout``/``sys.stderr``).

    Both levels: C libraries and handlers bound to the original streams write to the descriptors; code
    that replaced ``sys.stdout`` (e.g. pytest's capture) is covered by the second.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    streams = sys.stdout, sys.stderr
    log = open(path, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115 - closed below
    try:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
        yield
    finally:
        sys.stdout, sys.stderr = streams
        log.close()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


@contextlib.contextmanager
def isolated(cwd: str, threads: int) -> Iterator[None]:
    """Run in ``cwd`` with ``threads`` intra-op threads; restore every global a run can change afterwards."""
    import torch

    environ, workdir, argv = dict(os.environ), os.getcwd(), list(sys.argv)
    os.environ.pop(CLAIM_ENV, None)  # the engine holds the run's claim: the CLI must not claim it again
    state = _torch_state(torch)
    main_thread = threading.current_thread() is threading.main_thread()  # Ray runs trials in a thread
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    levels = {name: logging.getLogger(name).level for name in _lightning_loggers()}
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    os.chdir(cwd)
    sys.argv[:] = [str(ROOT / "cli.py")]  # as `python cli.py`: the CLI reads its arguments from `args` only
    try:
        with warnings.catch_warnings():
            yield
    finally:
        os.chdir(workdir)
        os.environ.clear()
        os.environ.update(environ)
        sys.argv[:] = argv
        _restore_torch(torch, state)
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _torch_state(torch: Any) -> dict[str, Any]:
    return {
        "dtype": torch.get_default_dtype(),
        "threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn": (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32),
        "matmul": torch.get_float32_matmul_precision(),
        "grad": torch.is_grad_enabled(),
        "anomaly": torch.is_anomaly_enabled(),
    }


def _restore_torch(torch: Any, state: dict[str, Any]) -> None:
    torch.set_default_dtype(state["dtype"])
    torch.set_num_threads(state["threads"])
    torch.use_deterministic_algorithms(state["deterministic"], warn_only=state["warn_only"])
    cudnn = torch.backends.cudnn
    cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32 = state["cudnn"]
    torch.set_float32_matmul_precision(state["matmul"])
    torch.set_grad_enabled(state["grad"])
    torch.autograd.set_detect_anomaly(state["anomaly"])


def _lightning_loggers() -> list[str]:
    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] in ("lightning", "pytorch_lightning")]
    return ["", *names]
