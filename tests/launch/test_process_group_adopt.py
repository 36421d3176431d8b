"""``parallel.init_process_group`` adopts a default group that a launcher (Ray Train, a test harness)
already initialised: same rank and world, not owned (never destroyed by us), backend mismatch refused."""
from __future__ import annotations

import pytest
import torch.distributed as dist

from dist_utils import run_distributed
from goat_dist.config import DistConfig
from goat_dist.parallel.process_group import destroy_process_group, init_process_group


def _adopt_body(rank, world_size):
    env = init_process_group(DistConfig())
    gloo = init_process_group(DistConfig(backend="gloo"))
    try:
        init_process_group(DistConfig(backend="nccl"))
        mismatch = None
    except ValueError as exc:
        mismatch = str(exc)
    destroy_process_group(env)  # not ours: must leave the launcher's group alone
    still = dist.is_initialized()
    dist.all_reduce(t := __import__("torch").ones(1))  # the group still works
    return {"rank": env.rank, "world": env.world_size, "owns": env.owns_group, "backend": env.backend,
            "gloo_owns": gloo.owns_group, "mismatch": mismatch, "still": still, "sum": float(t)}


@pytest.mark.dist
def test_init_process_group_adopts_an_initialised_group():
    out = run_distributed(_adopt_body, 2)
    for rank, r in enumerate(out):
        assert (r["rank"], r["world"], r["backend"]) == (rank, 2, "gloo")
        assert r["owns"] is False and r["gloo_owns"] is False and r["still"] is True and r["sum"] == 2.0
        assert r["mismatch"] is not None and "'nccl' is configured" in r["mismatch"] and "uses 'gloo'" in r["mismatch"]
