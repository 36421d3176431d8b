"""Communication measurement and its analytic model.

- ``parallel.comm_meter`` on real 2-process gloo runs: exact byte counts for collectives of known
  sizes, call-site tags (explicit and from the stack), the backward phase, patches restored.
- ``parallel.cost_model`` against the meter on a real 2-process run of the DistributedTrainer (bytes
  per collective within 10%), and its parts against obviously-correct references (occupancy vs
  simulation, byte formulas on hand-counted shapes)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from goat_dist.parallel.cost_model import (Network, StepShape, expected_distinct, expected_lookups, predict_bytes,
                                           project, remote_fraction, shape_at)
from parallel_fixtures import tiny_cfg

STEPS = 3


def _shape(W=2, **kw) -> StepShape:
    base = dict(world_size=W, batch=16, dim=8, n_modalities=2, user_branch=True, n_dense=540, user_ids=60,
                item_ids=40)
    base.update(kw)
    return StepShape(**base)


def test_hand_counted_bytes():
    p = predict_bytes(_shape())
    assert p["emb_a2a_ids"]["payload_bytes"] == 48 + 960 + 800        # splits, lengths [2 keys x 60 x W], ids
    assert p["emb_a2a_out"]["payload_bytes"] == 100 * 8 * 4
    assert p["infonce_allgather"]["calls"] == 20                        # 5 terms x (2 views + 2 id vectors)
    assert p["infonce_allgather"]["payload_bytes"] == 5 * (2 * 16 * 8 * 4 + 2 * 16 * 8)
    assert p["infonce_allgather_grad"]["payload_bytes"] == 5 * 2 * 2 * 16 * 8 * 4
    assert p["oat_stats"]["payload_bytes"] == 4 * (2 * 8 + 8 + 2 * 64 + 1)
    assert p["zero_param_allgather"]["payload_bytes"] == 4 * 270
    assert predict_bytes(_shape(W=1)) == {}
    assert "infonce_allgather" not in predict_bytes(_shape(cmcl=False))
    assert _shape(user_branch=False).infonce_terms == 4


def test_expected_distinct_matches_simulation():
    g = torch.Generator().manual_seed(0)
    deg = torch.randint(1, 50, (500,), generator=g).double()
    p = deg / deg.sum()
    for draws in (10, 300, 3000):
        sims = [torch.multinomial(p, draws, replacement=True, generator=g).unique().numel() for _ in range(200)]
        assert expected_distinct(p, draws) == pytest.approx(sum(sims) / len(sims), rel=0.02)


def test_expected_lookups_monotone_and_bounded():
    du, di = torch.full((100,), 5.0), torch.full((50,), 10.0)
    u1, i1 = expected_lookups(8, [2], du, di)
    u2, i2 = expected_lookups(8, [2, 2], du, di)
    assert 8 * (1 - 0.1) < u1 < u2 <= 100 and i1 < i2 <= 50


def test_projection_grows_with_world_size():
    s = _shape(batch=1024, dim=64, n_dense=200_000, user_ids=20_000, item_ids=15_000)
    rows = [project(shape_at(s, w), other_compute_s=0.01) for w in (8, 64, 512)]
    assert all(r["projected"] for r in rows)
    assert rows[0]["sent_bytes_per_gpu"] < rows[1]["sent_bytes_per_gpu"] < rows[2]["sent_bytes_per_gpu"]
    # the global-batch InfoNCE gather grows linearly in W: it dominates at 512 GPUs
    assert max(rows[2]["sent_bytes_by_tag"], key=rows[2]["sent_bytes_by_tag"].get).startswith("infonce")
    net = Network()
    assert net.collective_s(50e9, 16) > net.collective_s(50e9, 8)      # crossing nodes is slower


def _body(rank, world_size, cfg, run_dir):
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from goat_dist.engine.distributed import DistributedTrainer
    from goat_dist.parallel.comm_meter import comm_meter

    tr = DistributedTrainer(cfg, run_dir).build()
    it = iter(tr.loader)
    batches = [next(it) for _ in range(STEPS)]
    shapes = []
    n_parts = []
    with comm_meter() as meter:
        for b in batches:
            n_parts.append(len([k for k in tr.train_step(b) if k != "grad_norm"]))
    for b in batches:
        src = b.ui.blocks[0].src_nodes
        shapes.append({"batch": b.users.numel(), "U": src["user"].numel(), "I": src["item"].numel(),
                       "f": remote_fraction(src["user"], src["item"], tr.dataset.n_users, tr.dataset.n_items,
                                            world_size, rank)})
    n_dense = sum(p.numel() for p in tr.engine.module.parameters())
    # optional checks the trainer's code switches on (read from the code, not from the measurement)
    checks = {"nonfinite": "_nonfinite_flags" in DistributedTrainer.__dict__,
              "overflow": bool(getattr(tr.engine.optimizer, "check_grad_overflow", False))}
    for sh, n in zip(shapes, n_parts):
        sh["parts"] = n
    tr.close()
    return {"records": meter.as_dicts(), "shapes": shapes, "n_dense": n_dense, "checks": checks}


@pytest.mark.dist
def test_predicted_bytes_match_measured_world2(tmp_path):
    """Per step and per collective (tag), summed over both ranks: predicted payload and sent bytes
    within 10% of the measured ones, and the same number of calls."""
    cfg = tiny_cfg(tmp_path, 16, "sampling.fanouts={user_item: [3, 3], item_item: [3], user_user: [3]}")
    res = run_distributed(_body, 2, cfg, tmp_path / "w2")
    measured: dict = {}
    predicted: dict = {}
    for r in res:
        for rec in r["records"]:
            m = measured.setdefault(rec["tag"], {"calls": 0, "payload_bytes": 0, "sent_bytes": 0})
            m["calls"] += 1
            m["payload_bytes"] += rec["payload_bytes"]
            m["sent_bytes"] += rec["sent_bytes"]
        n_max = [max(res[0]["shapes"][k]["batch"], res[1]["shapes"][k]["batch"]) for k in range(STEPS)]
        for k, sh in enumerate(r["shapes"]):
            s = StepShape(world_size=2, batch=sh["batch"], dim=8, n_modalities=2, user_branch=True,
                          n_dense=r["n_dense"], user_ids=sh["U"], item_ids=sh["I"], remote_fraction=sh["f"],
                          infonce_rows=n_max[k], nonfinite_parts=sh["parts"] if r["checks"]["nonfinite"] else 0,
                          zero_overflow_check=r["checks"]["overflow"])
            for tag, v in predict_bytes(s).items():
                p = predicted.setdefault(tag, {"calls": 0, "payload_bytes": 0.0, "sent_bytes": 0.0})
                for key in p:
                    p[key] += v[key]
    # lookups really are sampled (not the whole tables), so the test exercises the data-dependent part
    assert all(sh["U"] + sh["I"] < 100 for r in res for sh in r["shapes"])
    assert set(measured) == set(predicted), set(measured) ^ set(predicted)
    for tag, m in measured.items():
        p = predicted[tag]
        assert m["calls"] == p["calls"], (tag, m, p)
        for key in ("payload_bytes", "sent_bytes"):
            assert math.isclose(m[key], p[key], rel_tol=0.10), (tag, key, m[key], p[key])


# ---- comm_meter ----------------------------------------------------------------------------------


def _meter_body(rank, world_size):
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


@pytest.mark.dist
def test_comm_meter_exact_bytes_two_ranks():
    res = run_distributed(_meter_body, 2)
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
