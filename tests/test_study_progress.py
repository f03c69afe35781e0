"""The study progress line: one line per finished run in a log, one line rewritten in place on a terminal."""

from __future__ import annotations

import io

from flatminima.studies.progress import Progress
from flatminima.studies.runner import RunResult


def test_a_log_gets_one_line_per_finished_run_with_counts():
    """ETA: the mean time of the recent runs × the runs left / the runs seen at once (here one)."""
    out = io.StringIO()
    progress = Progress(5, skipped=1, stream=out, tty=False)
    progress.started("a")
    assert out.getvalue() == ""  # starts are not printed in a log
    progress.ended(RunResult("a", "finished", None, 2.0))
    progress.ended(RunResult("b", "failed", "Traceback...\nValueError: bad lr", 1.0))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("[2/5] 1 done, 0 failed, 3 left, 1 skipped (finished before), ETA 6 s |")
    assert lines[0].endswith("| finished a (2.0 s)")
    assert lines[1].startswith("[3/5] 1 done, 1 failed, 2 left, 1 skipped (finished before), ETA 3 s |")
    assert lines[1].endswith("| failed b (1.0 s): ValueError: bad lr")
    progress.close()
    assert out.getvalue().splitlines()[-1].startswith("[3/5] 1 done, 1 failed, 2 left, 1 skipped (finished before) in ")


def test_a_terminal_gets_one_line_rewritten_in_place():
    out = io.StringIO()
    progress = Progress(2, stream=out, tty=True)
    progress.started("a")
    progress.ended(RunResult("a", "finished", None, 1.0))
    progress.ended(RunResult("b", "finished", None, 1.0))
    progress.close()
    text = out.getvalue()
    assert text.count("\r") == 3 and text.count("\n") == 2  # updates in place, then the line ends and the totals
    assert "[2/2] 2 done, 0 failed, 0 left" in text.splitlines()[-1]


def test_the_estimate_divides_among_parallel_runs_and_forgets_the_first_slow_ones():
    progress = Progress(10, stream=io.StringIO(), tty=False)
    for run_id in "abcd":
        progress.started(run_id)  # four runs at once
    for run_id, seconds in zip("abcdefghij", [40, 40, 40, 40, 4, 4, 4, 4, 4, 4]):
        progress.ended(RunResult(run_id, "finished", None, seconds))
        if run_id == "b":
            assert progress.line().endswith("ETA 1 min 20 s")  # 40 s × 8 left / 4 at once
    assert progress.remaining == 0
    progress = Progress(10, stream=io.StringIO(), tty=False)
    progress.parallel, progress.durations = 4, [40.0] * 4 + [4.0] * 8
    progress.finished = 2
    assert progress.line().endswith("ETA 8 s")  # the last 8 runs: 4 s × 8 left / 4
