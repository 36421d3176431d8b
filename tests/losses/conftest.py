"""Tiny tensors: one intra-op thread is much faster than two on a loaded 2-core machine (thread
hand-offs cost more than the maths). Restored after every test, so other folders are unaffected."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
