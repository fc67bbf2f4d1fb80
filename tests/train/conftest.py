"""Training tests run torch on one thread.

On a busy 2-core machine two OpenMP threads that wait for each other at every barrier
made a one-step resnet101 test 10x slower (27 s vs 2 s) than one thread; results are
equally exact either way. The previous thread count is restored after each test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
