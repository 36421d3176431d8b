"""After sharding, the unsharded full ID tables are freed (real 2-rank gloo run): torch's in-backward
optimiser registry would otherwise keep every full table alive beside its shards."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

pytest.importorskip("torchrec")

from dist_utils import run_distributed  # noqa: E402


def _body(rank, world_size):
    from goat_dist.model.embeddings import IdEmbeddings, materialize_
    from goat_dist.parallel.sharding import shard_tables

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.id_emb = IdEmbeddings(300, 200, 8, device="meta")

    model = materialize_(Wrap(), "cpu", seed=0)
    full = {n: p.detach().clone() for n, p in model.id_emb.named_parameters()}
    refs = [weakref.ref(p) for p in model.id_emb.parameters()]
    dmp = shard_tables(model, "row_wise", "rowwise_adagrad", 0.5, torch.device("cpu"))
    gc.collect()
    alive = sum(r() is not None for r in refs)
    # the shards still hold the initial rows and the fused optimiser still updates them
    users = torch.tensor([rank, 150 + rank, 299 - rank])
    u, i = dmp.module.id_emb(users, torch.tensor([0, 199]))
    before = u.detach().clone()
    (u.sum() + i.sum()).backward()
    after = dmp.module.id_emb(users, torch.tensor([0, 199]))[0].detach()
    return {"alive": alive, "n_refs": len(refs), "before": before, "after": after, "users": users,
            "full_user": full[next(n for n in full if "user" in n)]}


def test_unsharded_tables_are_freed_after_sharding():
    for out in run_distributed(_body, 2):
        assert out["n_refs"] == 2 and out["alive"] == 0
        torch.testing.assert_close(out["before"], out["full_user"][out["users"]], rtol=0, atol=0)
        assert not torch.allclose(out["after"], out["before"])  # fused row-wise Adagrad stepped
