"""One progress line over the runs of a study: done / failed / remaining, and the time left.

On a terminal the line is rewritten in place (``\\r``); otherwise (a log file, CI) one line is printed per
finished run. The time left is the mean wall time of the recent runs (the last two per parallel slot, so
the slower first run of each worker fades out) × the runs left / the runs seen in flight at once.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


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
        self.running: set[str] = set()
        self.parallel = 1
        self.durations: list[float] = []
        self.start = time.perf_counter()
        self._width = 0

    @property
    def remaining(self) -> int:
        """Runs neither skipped nor ended."""
        return self.total - self.skipped - self.finished - self.failed

    def started(self, run_id: str) -> None:
        """A run started."""
        self.running.add(run_id)
        self.parallel = max(self.parallel, len(self.running))
        if self.tty:
            self._draw(f"running {run_id}")

    def ended(self, result: dict[str, Any]) -> None:
        """A run ended (``result`` has ``id``, ``status``, ``seconds`` and, when failed, ``error``)."""
        self.running.discard(result["id"])
        self.durations.append(float(result.get("seconds") or 0.0))
        if result["status"] == "finished":
            self.finished += 1
        else:
            self.failed += 1
        what = f"{result['status']} {result['id']} ({result.get('seconds', 0.0):.1f} s)"
        if result["status"] != "finished" and result.get("error"):
            what += f": {_short(result['error'])}"
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
        """``[7/12] 6 done, 1 failed, 5 left, 2 skipped, ETA 40 s``."""
        ended = self.finished + self.failed
        text = (f"[{ended + self.skipped}/{self.total}] {self.finished} done, {self.failed} failed, "
                f"{self.remaining} left")
        if self.skipped:
            text += f", {self.skipped} skipped (finished before)"
        if eta and self.remaining and self.durations:
            recent = self.durations[-2 * self.parallel:]
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
