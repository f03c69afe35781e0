"""Fixtures shared by the test files (pytest finds them here; no import needed).

A test file opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``: only the files that
ran on one thread before do so now, so no test changes the thread count it runs with.
"""

from __future__ import annotations

import pytest
import torch


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
