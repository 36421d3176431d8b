"""The multi-process test helper itself: results per rank, a child's error re-raised, a hung rank
killed at the deadline instead of hanging the suite."""
import os
import time

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed


def _sum_ranks(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return {"rank": rank, "sum": float(t), "pid": os.getpid()}


def _rank1_hangs(rank, world_size, pid_dir):
    open(os.path.join(pid_dir, f"rank{rank}.pid"), "w").write(str(os.getpid()))
    if rank == 1:
        time.sleep(600)
    return rank


def _rank0_fails(rank, world_size):
    if rank == 0:
        raise RuntimeError("rank 0 failed on purpose")
    return rank


def test_results_come_back_per_rank():
    res = run_distributed(_sum_ranks, 2)
    assert [r["rank"] for r in res] == [0, 1] and [r["sum"] for r in res] == [3.0, 3.0]
    assert res[0]["pid"] != res[1]["pid"]


def test_a_child_error_is_reraised():
    with pytest.raises(Exception, match="rank 0 failed on purpose"):
        run_distributed(_rank0_fails, 2)


def test_a_hung_rank_is_killed_at_the_deadline(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[1\] still running after 4 s, killed"):
        run_distributed(_rank1_hangs, 2, str(tmp_path), timeout_s=4.0)
    assert time.monotonic() - t0 < 60
    pid = int((tmp_path / "rank1.pid").read_text())
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):   # reaped: no such process any more
        os.kill(pid, 0)
