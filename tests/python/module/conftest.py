"""The module tests run thousands of ops on tiny tensors: one thread each (see the fixture)."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread_for_tiny_tensors():
    """These tests run thousands of ops on tensors of a few dozen elements, where threads
    only add synchronisation: on a loaded 2-core machine one OpenMP parallel region costs
    ~20 ms instead of microseconds. Every test module in this folder runs single-threaded;
    the previous setting is restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
