"""A ``study run``-like parent for tests/test_study_shared.py: the local engine with workers that only sleep.

``python tests/study_worker_script.py OUT`` starts two workers (no warm imports) and prints each worker's
pid as it starts its task; the test kills this process and watches the workers.
"""

from __future__ import annotations

import sys
import time

from flatminima.studies.engines.local import LocalEngine
from flatminima.studies.runner import RunResult, Task


def sleepy(task: Task) -> RunResult:
    """A task that never ends on its own."""
    time.sleep(600)
    return RunResult(task.id, "finished", None, 600.0)


if __name__ == "__main__":
    tasks = [Task(f"t{i}", {}, i, sys.argv[1], 1, ".", (), ()) for i in range(2)]
    LocalEngine(workers=2, execute=sleepy, warm=()).run(tasks, on_start=lambda task, pid: print(pid, flush=True))
