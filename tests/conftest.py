"""Fixtures shared by the test files (pytest finds them here; no import needed).

A test file opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``: only the files that
ran on one thread before do so now, so no test changes the thread count it runs with.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pytest  # noqa: E402
import torch  # noqa: E402

import cli  # noqa: E402,F401  (this checkout is the package flatminima, whatever else is installed)


@pytest.fixture
def one_thread():
    """Run the test on one intra-op thread, then restore the previous count.

    Tiny models and tensors run fastest on one thread; on a shared CPU, OpenMP threads waiting for each
    other cost up to 100×.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ddp_step_runs(tmp_path_factory) -> Path:
    """The folder of tests/ddp_step_script.py's two-process DDP runs (one subprocess for test_ddp*.py)."""
    script = Path(__file__).with_name("ddp_step_script.py")
    out = tmp_path_factory.mktemp("ddp")
    proc = subprocess.run(
        [sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=300, cwd=script.parents[1]
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out
