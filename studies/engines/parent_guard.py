"""The first module the local engine's forkserver imports: it makes the forkserver die with the study process.

The local engine forks its workers from a ``multiprocessing`` forkserver, a child of the ``study run``
process. The forkserver would outlive a killed study process (it waits for every worker to exit first),
so its workers would too. Imported in the forkserver (:data:`flatminima.studies.engines.local.LocalEngine` puts this
module first in the forkserver's preload list, and the study process's pid and start time in
``FLATMINIMA_STUDY_PARENT``), this module

* asks Linux for a SIGKILL when the forkserver's parent dies (``prctl(PR_SET_PDEATHSIG, SIGKILL)``),
  then checks that the study process still runs (it may have died before the request), and exits if not;
* starts a watchdog thread that kills the forkserver once the study process is gone (where ``prctl`` is
  missing);
* records the forkserver's pid (``FLATMINIMA_FORKSERVER_PID``), which every worker forked from it
  inherits: a worker asks for the same signal when the forkserver dies, then checks that its parent is
  still that forkserver (:func:`flatminima.studies.engines.local.die_with_parent`).

So ``kill -9`` of ``study run`` ends the forkserver, which ends every worker, within milliseconds.
Importing it anywhere else (the variable unset) does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time

from flatminima.cli_support import processes

PARENT_ENV = "FLATMINIMA_STUDY_PARENT"
FORKSERVER_ENV = "FLATMINIMA_FORKSERVER_PID"
PR_SET_PDEATHSIG = 1
WATCHDOG_S = float(os.environ.get("FLATMINIMA_STUDY_WATCHDOG_S") or 0.5)
"""Seconds between two checks of a watchdog thread (the fallback of the parent-death signal)."""


def request_parent_death_signal() -> bool:
    """Linux: ask for SIGKILL when this process's parent dies; False where that cannot be asked."""
    if not sys.platform.startswith("linux"):
        return False
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    return False


def watch(pid: int, start: int | None, every: float = WATCHDOG_S) -> threading.Thread:
    """A daemon thread that kills this process (SIGKILL) once process ``pid`` (with that start time) is gone."""

    def run() -> None:
        while processes.alive(pid, start):
            time.sleep(every)
        os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=run, name="parent-watchdog", daemon=True)
    thread.start()
    return thread


def parent_from_environment() -> tuple[int, int | None] | None:
    """``(pid, start time)`` of the study process, from ``FLATMINIMA_STUDY_PARENT``; None when unset."""
    text = os.environ.get(PARENT_ENV)
    if not text:
        return None
    pid, _, start = text.partition(":")
    return int(pid), (int(start) if start else None)


def _guard_forkserver() -> None:
    parent = parent_from_environment()
    if parent is None or os.environ.get(FORKSERVER_ENV):
        return  # not a forkserver of the local engine (or this module is imported again in a worker)
    request_parent_death_signal()
    if not processes.alive(*parent):
        os._exit(1)
    watch(*parent)
    os.environ[FORKSERVER_ENV] = str(os.getpid())


_guard_forkserver()
