"""The local engine: N worker processes of the standard library, each reused across runs.

Workers are forked from a ``multiprocessing`` *forkserver*: a fresh process that imports torch, Lightning
and the CLI once (:data:`flatminima.studies.runner.WARM_MODULES`), so every worker (a replacement too) starts warm and
clean, and runs task after task (:func:`flatminima.studies.runner.run_task`). The parent claims a task (when given
the study's claims) and hands it to an idle worker over its own pipe, and waits on every pipe and every
process sentinel at once, so a worker that dies (a crash, an out-of-memory kill, ``kill -9``) is noticed
at once: its run is recorded as failed with the cause, the worker is replaced, and the other runs go on.
``timeout`` bounds one run's wall time (its worker is killed and replaced).

**Workers die with their parent.** The forkserver dies with the study process
(:mod:`flatminima.studies.engines.parent_guard`, the first module it imports) and each worker with the forkserver:
a worker asks Linux to kill it when its parent dies (``prctl(PR_SET_PDEATHSIG, SIGKILL)``), checks right
after that its parent is still the forkserver and the study process still runs (either may have died
before the request), and a watchdog thread checks the study process every ``WATCHDOG_S`` seconds (the
fallback where ``prctl`` is missing). So a killed ``study run`` leaves no worker training: its claims go
stale with it and the next ``study run`` redoes those runs in cleared folders.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path

from flatminima.cli_support import processes

from .. import runner
from ..runner import RunResult, Task
from . import Claims, OnDone, OnStart, parent_guard


def die_with_parent(parent: int, parent_start: int | None) -> None:
    """Make this worker end when its forkserver or the study process (named by pid and start time) is gone.

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (a SIGKILL when this process's parent, the forkserver,
    dies), then a check that the parent is still the forkserver and the study process still runs (either
    may have died before the request); everywhere: a watchdog thread on the study process.
    """
    parent_guard.request_parent_death_signal()
    forkserver = os.environ.get(parent_guard.FORKSERVER_ENV)
    if (forkserver and os.getppid() != int(forkserver)) or not processes.alive(parent, parent_start):
        os._exit(1)
    parent_guard.watch(parent, parent_start)


def _worker_main(
    conn: Connection, parent: int, parent_start: int | None, execute: Callable[[Task], RunResult], warm: Sequence[str]
) -> None:
    """A worker: die with the study process, import once, then run tasks until told to stop or the parent goes.

    Not a daemon process: a run may start DataLoader workers of its own.
    """
    die_with_parent(parent, parent_start)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    runner.warm_up(warm)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        try:
            conn.send(("started", task.id))
            conn.send(("done", execute(task)))
        except (BrokenPipeError, OSError):
            return


@dataclass
class _Worker:
    process: mp.process.BaseProcess
    conn: Connection
    task: Task | None = None
    started: float | None = None


class LocalEngine:
    """Run tasks on ``workers`` reused processes, each with ``threads`` intra-op threads.

    Args:
        workers: Number of worker processes (at most one per pending run is started).
        threads: ``OMP_NUM_THREADS`` of each worker (set before torch is imported).
        timeout: Seconds one run may take before its worker is killed (None: no limit).
        execute: What a worker does with a task (a module-level function; default: train it).
        warm: The modules the forkserver imports once (default: torch, Lightning and the CLI).
    """

    def __init__(
        self,
        workers: int = 1,
        threads: int = 1,
        timeout: float | None = None,
        execute: Callable[[Task], RunResult] = runner.run_task,
        warm: Sequence[str] = runner.WARM_MODULES,
    ) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"Invalid workers: {workers!r}; expected an integer >= 1")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"Invalid timeout: {timeout!r}; expected seconds > 0 or None")
        self.workers = workers
        self.threads = threads
        self.timeout = timeout
        self.execute = execute
        self.warm = tuple(warm)
        self._context = mp.get_context("forkserver")
        self._context.set_forkserver_preload([*_checkout_main(), parent_guard.__name__, *self.warm])

    def run(
        self,
        tasks: Sequence[Task],
        claims: Claims | None = None,
        on_start: OnStart | None = None,
        on_done: OnDone | None = None,
    ) -> list[RunResult]:
        """Run every task whose claim this process gets (every task without ``claims``); one result per task run."""
        pending = deque(tasks)
        results: list[RunResult] = []
        self._claims = claims
        pool = [self._spawn() for _ in range(min(self.workers, len(tasks)))]
        try:
            while pending or any(w.task is not None for w in pool):
                for worker in pool:
                    if worker.task is None:
                        self._hand_out(worker, pending)
                ended = False
                for index, worker in enumerate(pool):
                    result = self._poll(worker, on_start)
                    if result is None:
                        continue
                    ended = True
                    results.append(result)
                    if on_done is not None:
                        on_done(result)
                    if not worker.process.is_alive():
                        pool[index] = self._spawn() if pending else worker
                if not ended:  # else hand the freed workers their next task first
                    self._wait(pool)
        finally:
            self._close(pool)
        return results

    def _hand_out(self, worker: _Worker, pending: deque[Task]) -> None:
        """Give ``worker`` the next pending task this process can claim (skipping those others hold)."""
        while pending:
            task = pending.popleft()
            if self._claims is None or self._claims.acquire(task):
                worker.task = task
                worker.conn.send(task)
                return

    # ------------------------------------------------------------------ workers
    def _spawn(self) -> _Worker:
        parent, child = self._context.Pipe()
        me = os.getpid()
        process = self._context.Process(
            target=_worker_main,
            daemon=False,
            name="study-worker",
            args=(child, me, processes.start_time(me), self.execute, self.warm),
        )
        with _environ(
            OMP_NUM_THREADS=str(self.threads),
            PYTHONPATH=runner.checkout_pythonpath(),  # the forkserver's, at its start
            **{parent_guard.PARENT_ENV: f"{me}:{processes.start_time(me) or ''}"},
        ):
            process.start()
        child.close()
        return _Worker(process, parent)

    def _poll(self, worker: _Worker, on_start: OnStart | None) -> RunResult | None:
        """Handle what a busy worker said or did; return a finished task's result, else None."""
        if worker.task is None:
            return None
        while worker.conn.poll():
            try:
                kind, payload = worker.conn.recv()
            except (EOFError, OSError):
                break
            if kind == "started":
                worker.started = time.perf_counter()
                if on_start is not None:
                    on_start(worker.task, worker.process.pid)
            elif kind == "done":
                return self._ended(worker, payload)
        if self._claims is not None and self._claims.lost(worker.task):
            worker.process.kill()
            worker.process.join()
            task, worker.task, worker.started = worker.task, None, None
            return runner.elsewhere(
                task,
                "its claim was taken over by another process (this one was presumed dead); the run was stopped here",
            )
        if not worker.process.is_alive():
            return self._lost(worker, _death(worker.process))
        if self.timeout is not None and worker.started is not None:
            if time.perf_counter() - worker.started > self.timeout:
                worker.process.kill()
                worker.process.join()
                return self._lost(worker, f"timed out after {self.timeout:g} s (worker killed)")
        return None

    def _ended(self, worker: _Worker, result: RunResult) -> RunResult:
        task, worker.task, worker.started = worker.task, None, None
        if self._claims is not None:
            self._claims.release(task)
        return result

    def _lost(self, worker: _Worker, error: str) -> RunResult:
        """The worker died with its task: record the run failed, then give its claim up."""
        seconds = 0.0 if worker.started is None else time.perf_counter() - worker.started
        return self._ended(worker, runner.failed(worker.task, error, seconds))

    def _wait(self, pool: list[_Worker]) -> None:
        busy = [w for w in pool if w.task is not None]
        if not busy:
            return
        handles = [w.conn for w in busy] + [w.process.sentinel for w in busy]
        polling = self.timeout is not None or self._claims is not None
        wait(handles, timeout=1.0 if polling else None)

    @staticmethod
    def _close(pool: list[_Worker]) -> None:
        for worker in pool:
            with contextlib.suppress(OSError, BrokenPipeError):
                if worker.task is None and worker.process.is_alive():
                    worker.conn.send(None)
        deadline = time.monotonic() + 5.0
        for worker in pool:
            if worker.task is not None:
                worker.process.kill()
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()


def _death(process: mp.process.BaseProcess) -> str:
    process.join(1.0)
    code = process.exitcode
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"worker process died ({name})"
    return f"worker process died (exit code {code})"


def _checkout_main() -> list[str]:
    """``["__main__"]`` when this process is ``python cli.py`` of a clone: the forkserver runs that file first
    (as ``__mp_main__``), which makes the clone the package ``flatminima`` there too; else nothing."""
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    return ["__main__"] if runner.CHECKOUT and main and Path(main).resolve() == runner.ROOT / "cli.py" else []


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set environment variables while a child process starts (it inherits them), restored afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
