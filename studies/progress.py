"""One progress line over the runs of a study: done / failed / remaining, the other processes' work, the time left.

On a terminal the line is rewritten in place (``\\r``); otherwise (a log file, CI) one line is printed per
finished run, and one when the work of other processes on the same study changes. The time left is the
mean wall time of the recent runs (the last two per parallel slot, so the slower first run of each worker
fades out) × the runs left / the runs seen in flight at once.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from .runner import RunResult


class Progress:
    """Progress of a study's runs, written to ``stream`` (default: stderr).

    Args:
        total: Runs of the study.
        skipped: Runs already finished (not run again).
        stream: Where to write.
        tty: Rewrite one line in place (default: whether ``stream`` is a terminal).
    """

    def __init__(self, total: int, skipped: int = 0, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self.total, self.skipped = total, skipped
        self.finished = self.failed = 0
        self.others = (0, 0, 0)  # (finished, failed, running) by other processes
        self.running: set[str] = set()
        self.parallel = 1
        self.durations: list[float] = []
        self.start = time.perf_counter()
        self._width = 0

    @property
    def remaining(self) -> int:
        """Runs neither skipped nor ended (here or in another process)."""
        return self.total - self.skipped - self.finished - self.failed - self.others[0] - self.others[1]

    def elsewhere(self, finished: int, failed: int, running: int) -> None:
        """The runs other processes finished, failed (during this command) and train now; a line when it changed."""
        if (finished, failed, running) == self.others:
            return
        self.others = (finished, failed, running)
        if self.tty:
            self._draw("waiting for other processes" if running else "")
        else:
            self.stream.write(f"{self.line()}\n")
            self.stream.flush()

    def started(self, run_id: str) -> None:
        """A run started."""
        self.running.add(run_id)
        self.parallel = max(self.parallel, len(self.running))
        if self.tty:
            self._draw(f"running {run_id}")

    def ended(self, result: RunResult) -> None:
        """A run of this process ended (``elsewhere``: another process turned out to hold it)."""
        self.running.discard(result.id)
        if result.status == "elsewhere":
            return
        self.durations.append(float(result.seconds or 0.0))
        if result.status == "finished":
            self.finished += 1
        else:
            self.failed += 1
        what = f"{result.status} {result.id} ({result.seconds:.1f} s)"
        if result.status != "finished" and result.error:
            what += f": {_short(result.error)}"
        if self.tty:
            self._draw(what)
        else:
            self.stream.write(f"{self.line()} | {what}\n")
            self.stream.flush()

    def close(self) -> None:
        """End the line (terminal) and print the totals."""
        if self.tty and self._width:
            self.stream.write("\n")
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"{self.line(eta=False)} in {_duration(elapsed)}\n")
        self.stream.flush()

    def line(self, eta: bool = True) -> str:
        """``[9/12] 6 done, 1 failed, 3 left, 2 skipped (finished before); other processes: 2 done, 1 running, ETA 40 s``.

        ``done`` and ``failed`` count this process's runs; the other processes' follow.
        """
        ended = self.finished + self.failed + self.others[0] + self.others[1]
        text = (
            f"[{ended + self.skipped}/{self.total}] {self.finished} done, {self.failed} failed, {self.remaining} left"
        )
        if self.skipped:
            text += f", {self.skipped} skipped (finished before)"
        if any(self.others):
            done, failed, running = self.others
            text += (
                f"; other processes: {done} done, " + (f"{failed} failed, " if failed else "") + f"{running} running"
            )
        if eta and self.remaining and self.durations:
            recent = self.durations[-2 * self.parallel :]
            text += f", ETA {_duration(sum(recent) / len(recent) * self.remaining / self.parallel)}"
        return text

    def _draw(self, what: str) -> None:
        text = f"{self.line()} | {what}"
        width = max(self._width, len(text))
        self.stream.write("\r" + text.ljust(width))
        self.stream.flush()
        self._width = len(text)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, seconds = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _short(error: str, limit: int = 100) -> str:
    line = error.strip().splitlines()[-1] if error.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."
