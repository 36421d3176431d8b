"""Sampling tests run single-threaded: their tensors are small, and on a busy 2-core machine
intra-op threads only add synchronisation stalls. The previous setting is restored after each test."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
