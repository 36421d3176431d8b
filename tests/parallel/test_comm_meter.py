"""comm_meter on real 2-process gloo runs: exact byte counts for collectives of known sizes, call-site
tags (explicit and from the stack), backward phase, and the patched functions restored afterwards."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed

pytestmark = pytest.mark.dist


def _body(rank, world_size):
    import torch.distributed.nn.functional as dist_fn

    from goat_dist.parallel.comm_meter import comm_meter

    original = dist.all_reduce
    with comm_meter() as meter:
        with meter.tag("ar"):
            dist.all_reduce(torch.ones(10))                                   # float32: 40 bytes
        with meter.tag("ag"):
            dist.all_gather([torch.empty(3, dtype=torch.int64) for _ in range(2)], torch.ones(3, dtype=torch.int64))
        with meter.tag("a2a"):
            # rank 0 sends rows [2 | 3] (16 bytes each) to ranks [0 | 1]; rank 1 sends [1 | 4]
            in_splits = [2, 3] if rank == 0 else [1, 4]
            out_splits = [2, 1] if rank == 0 else [3, 4]
            out = torch.empty(sum(out_splits), 4)
            dist.all_to_all_single(out, torch.full((5, 4), float(rank)), out_splits, in_splits)
        with meter.tag("bc"):
            dist.broadcast(torch.zeros(7, dtype=torch.float64), src=0)
        with meter.tag("agt"):
            dist.all_gather_into_tensor(torch.empty(2 * 6), torch.ones(6))
        x = torch.ones(5, requires_grad=True)
        y = dist_fn.all_reduce(x * 2.0)                                      # untagged: classified by stack
        y.sum().backward()                                                    # its backward all-reduces too
        a2a_ok = bool((out[: out_splits[0]] == 0).all() and (out[out_splits[0]:] == 1).all())
    restored = dist.all_reduce is original
    return {"records": meter.as_dicts(), "summary": meter.summary(), "a2a_ok": a2a_ok, "restored": restored}


def test_exact_bytes_two_ranks():
    res = run_distributed(_body, 2)
    for rank, r in enumerate(res):
        s = r["summary"]
        assert r["restored"] and r["a2a_ok"]
        assert (s["ar"]["payload_bytes"], s["ar"]["sent_bytes"], s["ar"]["recv_bytes"]) == (40, 40, 40)
        assert (s["ag"]["payload_bytes"], s["ag"]["sent_bytes"], s["ag"]["recv_bytes"]) == (24, 24, 24)
        sent, recv = (3 * 16, 1 * 16) if rank == 0 else (1 * 16, 3 * 16)
        assert (s["a2a"]["payload_bytes"], s["a2a"]["sent_bytes"], s["a2a"]["recv_bytes"]) == (80, sent, recv)
        assert (s["bc"]["sent_bytes"], s["bc"]["recv_bytes"]) == ((56, 0) if rank == 0 else (0, 56))
        assert (s["agt"]["payload_bytes"], s["agt"]["sent_bytes"], s["agt"]["recv_bytes"]) == (24, 24, 24)
        untagged = [rec for rec in r["records"] if rec["tag"] not in ("ar", "ag", "a2a", "bc", "agt")]
        # forward of torch.distributed.nn.functional.all_reduce, then its backward (an all_reduce of the grad)
        assert [(rec["op"], rec["phase"], rec["payload_bytes"]) for rec in untagged] == [
            ("all_reduce", "forward", 20), ("all_reduce", "backward", 20)]
        assert untagged[1]["tag"] == "oat_stats_grad"


def test_meter_does_not_nest_and_restores():
    from goat_dist.parallel.comm_meter import comm_meter

    before = dist.all_gather
    with comm_meter():
        with pytest.raises(RuntimeError, match="already active"):
            with comm_meter():
                pass
        assert dist.all_gather is not before
    assert dist.all_gather is before


def test_classify_call_sites():
    from goat_dist.parallel.comm_meter import classify

    sp = "/x/site-packages/"
    assert classify("all_to_all_single", [(sp + "torch/distributed/distributed_c10d.py", "all_to_all_single"),
                                          (sp + "torchrec/distributed/comm_ops.py", "backward")]) == "emb_a2a_grad"
    assert classify("all_to_all_single", [(sp + "torchrec/distributed/comm_ops.py", "forward")]) == "emb_a2a_out"
    assert classify("all_to_all_single", [(sp + "torchrec/distributed/dist_data.py", "__init__")]) == "emb_a2a_ids"
    assert classify("all_gather", [("/r/goat_dist/losses/infonce.py", "forward")]) == "infonce_allgather"
    assert classify("all_reduce", [(sp + "deepspeed/comm/torch.py", "all_reduce"),
                                   (sp + "deepspeed/runtime/zero/stage_1_and_2.py", "allreduce_bucket")]
                    ) == "zero_grad_reduce"
    assert classify("all_gather_into_tensor", [(sp + "deepspeed/runtime/utils.py", "all_gather_dp_groups")]
                    ) == "zero_param_allgather"
    assert classify("all_reduce", [("/r/foo.py", "bar")]) == "other:/r/foo.py:bar"
