"""The local engine: N worker processes of the standard library, each reused across runs.

Workers are forked from a ``multiprocessing`` *forkserver*: a fresh process that imports torch, Lightning
and the CLI once (:data:`studies.runner.WARM_MODULES`), so every worker (a replacement too) starts warm and
clean, and runs task after task (:func:`studies.runner.run_task`). The parent hands a task to an idle worker over
its own pipe and waits on every pipe and every process sentinel at once, so a worker that dies (a
crash, an out-of-memory kill, ``kill -9``) is noticed at once: its run is recorded as failed with the
cause, the worker is replaced, and the other runs go on. ``timeout`` bounds one run's wall time (its
worker is killed and replaced).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from .. import runner

OnStart = Callable[[dict[str, Any], int], None]
OnDone = Callable[[dict[str, Any]], None]


def _worker_main(conn: Connection) -> None:
    """A worker: import once, then run tasks until told to stop or the parent goes away.

    Not a daemon process: a run may start DataLoader workers of its own.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    runner.warm_up()
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        try:
            conn.send(("started", task["id"]))
            conn.send(("done", runner.run_task(task)))
        except (BrokenPipeError, OSError):
            return


@dataclass
class _Worker:
    process: mp.process.BaseProcess
    conn: Connection
    task: dict[str, Any] | None = None
    started: float | None = None


class LocalEngine:
    """Run tasks on ``workers`` reused processes, each with ``threads`` intra-op threads.

    Args:
        workers: Number of worker processes (at most one per pending run is started).
        threads: ``OMP_NUM_THREADS`` of each worker (set before torch is imported).
        timeout: Seconds one run may take before its worker is killed (None: no limit).
    """

    def __init__(self, workers: int = 1, threads: int = 1, timeout: float | None = None) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"Invalid workers: {workers!r}; expected an integer >= 1")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"Invalid timeout: {timeout!r}; expected seconds > 0 or None")
        self.workers = workers
        self.threads = threads
        self.timeout = timeout
        self._context = mp.get_context("forkserver")
        self._context.set_forkserver_preload(list(runner.WARM_MODULES))

    def run(self, tasks: list[dict[str, Any]], on_start: OnStart | None = None,
            on_done: OnDone | None = None) -> list[dict[str, Any]]:
        """Run every task; returns one result per task (``{id, status, error, seconds, summary}``)."""
        pending = deque(tasks)
        results: list[dict[str, Any]] = []
        pool = [self._spawn() for _ in range(min(self.workers, len(tasks)))]
        try:
            while pending or any(w.task is not None for w in pool):
                for worker in pool:
                    if worker.task is None and pending:
                        worker.task = pending.popleft()
                        worker.conn.send(worker.task)
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

    # ------------------------------------------------------------------ workers
    def _spawn(self) -> _Worker:
        parent, child = self._context.Pipe()
        process = self._context.Process(target=_worker_main, args=(child,), daemon=False, name="study-worker")
        with _environ(OMP_NUM_THREADS=str(self.threads), PYTHONPATH=_pythonpath()):  # the forkserver's, at its start
            process.start()
        child.close()
        return _Worker(process, parent)

    def _poll(self, worker: _Worker, on_start: OnStart | None) -> dict[str, Any] | None:
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
                worker.task, worker.started = None, None
                return payload
        if not worker.process.is_alive():
            return self._lost(worker, _death(worker.process))
        if self.timeout is not None and worker.started is not None:
            if time.perf_counter() - worker.started > self.timeout:
                worker.process.kill()
                worker.process.join()
                return self._lost(worker, f"timed out after {self.timeout:g} s (worker killed)")
        return None

    @staticmethod
    def _lost(worker: _Worker, error: str) -> dict[str, Any]:
        task, started = worker.task, worker.started
        worker.task, worker.started = None, None
        summary = runner.write_failed(task, error)
        seconds = 0.0 if started is None else time.perf_counter() - started
        return {"id": task["id"], "status": "failed", "error": error, "seconds": seconds, "summary": summary}

    def _wait(self, pool: list[_Worker]) -> None:
        busy = [w for w in pool if w.task is not None]
        if not busy:
            return
        handles = [w.conn for w in busy] + [w.process.sentinel for w in busy]
        wait(handles, timeout=1.0 if self.timeout is not None else None)

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


def _pythonpath() -> str:
    """This checkout first, so workers import it even where an editable install points elsewhere."""
    current = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join(p for p in (str(runner.ROOT), current) if p)


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
