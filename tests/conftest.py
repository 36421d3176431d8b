"""Shared test fixtures: paths to the real datasets (skip when absent) and a tmp dataset maker."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_dataset(name: str) -> Path:
    """Path of ``../shared/data/<name>``; skips the test when it is not there."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real dataset {path} not available")
    return path


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long accuracy runs (make test-accuracy), not in CI")
    config.addinivalue_line("markers", "dist: real multi-process gloo tests")


@pytest.fixture(autouse=True)
def _one_thread():
    """Test tensors are tiny: one intra-op thread beats two (thread hand-offs cost more than the
    maths, ~40x on a loaded 2-core machine). Restored after every test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _package_logs_reach_caplog():
    """``setup_logging`` (run by CLI tests) stops package records propagating to the root logger,
    where pytest's caplog listens; every test starts with propagation on again."""
    logging.getLogger("goat_dist").propagate = True
    yield
