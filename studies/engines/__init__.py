"""Engines that run a study's tasks: ``local`` (reused worker processes) and ``ray`` (Ray Tune trials).

Both follow :class:`Engine`, and both go through the run claims of :class:`Claims` when given one: a task
whose claim another process holds is not run (it is that process's), and a claim is released once the
run's summary is written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from flatminima.cli_support.claims import Owner

from ..runner import RunResult, Task

OnStart = Callable[[Task, int], None]
"""Called with a task and the pid of the process that starts it (0 when unknown)."""
OnDone = Callable[[RunResult], None]
"""Called with the result of each task run here."""


class Claims(Protocol):
    """The claims of runs as an engine sees them (:class:`flatminima.studies.shared.Ledger`)."""

    owner: Owner

    def path(self, task: Task) -> Path:
        """The task's claim file."""

    def acquire(self, task: Task) -> bool:
        """Claim ``task`` for this process; False when another live process holds it."""

    def release(self, task: Task) -> None:
        """Give ``task``'s claim up (its summary is written)."""

    def lost(self, task: Task) -> bool:
        """Whether ``task``'s claim was taken over by another process (this one was presumed dead)."""

    def holds(self, task: Task) -> bool:
        """Whether this process holds ``task``'s claim."""

    def track(self, task: Task) -> None:
        """Keep ``task``'s claim alive (claimed for this process elsewhere, e.g. by a Ray trial); count it attempted."""

    def untrack(self, task: Task) -> None:
        """Stop keeping ``task``'s claim alive (its holder released it)."""

    def forget(self, task: Task) -> None:
        """``task`` turned out to be another process's: neither tracked nor attempted here."""


class Engine(Protocol):
    """Runs tasks and reports each one's result."""

    def run(
        self,
        tasks: Sequence[Task],
        claims: Claims | None = None,
        on_start: OnStart | None = None,
        on_done: OnDone | None = None,
    ) -> list[RunResult]:
        """Run the tasks whose claim this process gets (all of them without ``claims``); one result per task run."""
