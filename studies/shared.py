"""A study folder that several processes share: the claims of runs, the state of the pool, the analysis once.

Any number of ``study run`` processes, on one machine or on several sharing DIR (and ``python cli.py
fit`` commands printed by ``--dry-run``), may work on one study at once:

* a process claims a run (``DIR/claims/<id>.claim``, :mod:`flatminima.cli_support.claims`) before training it and
  releases the claim once the run's summary is written, so each run is trained by one process; a claim
  whose owner is gone (killed, its machine down) is taken over, and the run redone in a cleared folder;
* each process runs what it can claim, then waits (polling every :data:`POLL_S` seconds) for the runs
  the others train, and ends when every run is settled: finished, or failed during this command (by it
  or by another process; a later command tries failed runs again);
* the analysis is written once, by the last process out, under its own claim (``DIR/claims/analysis``):
  a process that finds it written, since it started, for the same summaries leaves it as it is.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from flatminima.cli_support import claims
from flatminima.formats.summary import read_json, write_json

from . import runner
from .runner import Task

POLL_S = 2.0
"""Seconds between two looks at the runs other processes train (``FLATMINIMA_STUDY_POLL_S`` overrides)."""


def poll_seconds() -> float:
    """:data:`POLL_S`, or ``FLATMINIMA_STUDY_POLL_S`` when set."""
    text = os.environ.get("FLATMINIMA_STUDY_POLL_S")
    return float(text) if text else POLL_S


class Ledger:
    """This process's claims of runs (the :class:`flatminima.studies.engines.Claims` the engines use), kept alive by a heartbeat.

    A claim is kept only while the run still needs training once it is held (checked again then: another
    process may have finished it between the look at the pool and the claim).

    Args:
        out: The study folder.
        heartbeat: The heartbeat of this process's owner (its claims are touched and, on exit, released).
        attempts_at_start: Each run's latest attempt when this command started (:func:`attempts`).
        stream: Where to say that a stale claim was taken over.
    """

    def __init__(
        self,
        out: str | os.PathLike,
        heartbeat: claims.Heartbeat,
        attempts_at_start: dict[str, str | None],
        stream: TextIO | None = None,
    ) -> None:
        self.out = Path(out)
        self.heartbeat = heartbeat
        self.attempts_at_start = attempts_at_start
        self.stream = stream or sys.stderr
        self.attempted: set[str] = set()

    @property
    def owner(self) -> claims.Owner:  # noqa: D401 - a property
        """The owner this process's claims name."""
        return self.heartbeat.owner

    def path(self, task: Task) -> Path:
        """The task's claim file."""
        return runner.claim_path(self.out, task.id)

    def acquire(self, task: Task) -> bool:
        """Claim ``task`` (taking a stale claim over) if it still needs training; False when it does not or
        another live process holds it."""
        outcome = claims.acquire(self.path(task), self.owner)
        if not outcome.acquired:
            return False
        if not needs_training(task, self.attempts_at_start):
            claims.release(self.path(task), self.owner)
            return False
        self.track(task)
        if outcome.replaced is not None:
            self.stream.write(f"{task.id}: took over the claim of {outcome.replaced.describe()}, which is gone\n")
        return True

    def track(self, task: Task) -> None:
        """Count ``task`` as attempted by this process and keep its claim alive (a Ray trial claimed it for us)."""
        self.attempted.add(task.id)
        self.heartbeat.track(self.path(task))

    def release(self, task: Task) -> None:
        """Give ``task``'s claim up."""
        self.heartbeat.untrack(self.path(task))
        claims.release(self.path(task), self.owner)

    def untrack(self, task: Task) -> None:
        """Stop keeping ``task``'s claim alive (a Ray trial released it)."""
        self.heartbeat.untrack(self.path(task))

    def forget(self, task: Task) -> None:
        """``task`` turned out to be another process's (a Ray trial found its claim held): not attempted here."""
        self.attempted.discard(task.id)
        self.heartbeat.untrack(self.path(task))

    def lost(self, task: Task) -> bool:
        """Whether ``task``'s claim was taken over by another process."""
        return self.path(task) in self.heartbeat.lost()

    def holds(self, task: Task) -> bool:
        """Whether this process holds ``task``'s claim."""
        current = claims.holder(self.path(task))
        return current is not None and current.token == self.owner.token


@dataclass(frozen=True)
class PoolState:
    """Where each run of a study stands, as one process sees it."""

    finished: tuple[str, ...]
    failed_elsewhere: tuple[str, ...]
    running_elsewhere: tuple[str, ...]
    pending: tuple[Task, ...]


def attempts(tasks: Sequence[Task]) -> dict[str, str | None]:
    """Each run's latest attempt id (to tell, later, the runs another process tried since)."""
    return {task.id: runner.attempt_of(task) for task in tasks}


def needs_training(task: Task, attempts_at_start: dict[str, str | None]) -> bool:
    """Not finished, and not failed in an attempt made since this command started (by any process)."""
    if runner.is_done(task):
        return False
    summary = runner.read_run_summary(task.out, task.id)
    tried_since = runner.attempt_of(task) != attempts_at_start.get(task.id)
    return not (tried_since and summary is not None and summary.get("status") == "failed")


def survey(tasks: Sequence[Task], ledger: Ledger) -> PoolState:
    """The runs finished, failed by another process during this command, trained by another now, and to run here.

    A run this process attempted is never pending again in this command (a later command retries it).
    """
    finished, failed, running, pending = [], [], [], []
    for task in tasks:
        if runner.is_done(task):
            finished.append(task.id)
            continue
        status, owner = claims.state(ledger.path(task))
        if status == "live" and (owner is None or owner.token != ledger.owner.token):
            running.append(task.id)
            continue
        if task.id in ledger.attempted:
            continue  # failed here: settled for this command
        if status == "free" and not needs_training(task, ledger.attempts_at_start):
            failed.append(task.id)
        else:
            pending.append(task)  # never tried, failed before this command, or left half done by a dead owner
    return PoolState(tuple(finished), tuple(failed), tuple(running), tuple(pending))


# ---------------------------------------------------------------------------------------- the analysis, once
def analysis_claim(out: str | os.PathLike) -> Path:
    """``DIR/claims/analysis``: held while a process writes the analysis."""
    return Path(out) / "claims" / "analysis"


def analysis_stamp(out: str | os.PathLike) -> Path:
    """``DIR/claims/analysis.json``: which summaries the last analysis was written from, and by whom."""
    return Path(out) / "claims" / "analysis.json"


def signature(out: str | os.PathLike) -> str:
    """A digest of the study file and of every summary's size and modification time."""
    out = Path(out)
    digest = hashlib.sha256()
    for path in [out / "study.yaml", *sorted(out.glob("runs/*/summary.json"))]:
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        digest.update(f"{path.relative_to(out)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def analyze_once(out: str | os.PathLike, owner: claims.Owner, stamp_at_start: object, analyze, stream: TextIO) -> bool:
    """Run ``analyze()`` unless another process wrote the analysis of these very summaries since this one started.

    Waits while another process writes it. Returns whether this process wrote it.
    """
    lock = analysis_claim(out)
    while not claims.acquire(lock, owner).acquired:
        time.sleep(poll_seconds())
    try:
        current = signature(out)
        stamp = read_json(analysis_stamp(out))
        if stamp != stamp_at_start and isinstance(stamp, dict) and stamp.get("signature") == current:
            stream.write(
                f"analysis: written by {stamp.get('by', 'another process')} for the same runs: "
                f"{Path(out) / 'analysis.md'}\n"
            )
            return False
        analyze()
        write_json(analysis_stamp(out), {"signature": current, "by": owner.describe()})
        return True
    finally:
        claims.release(lock, owner)
