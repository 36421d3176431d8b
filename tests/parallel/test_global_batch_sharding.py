"""TripleSampler(shard="global_batch"): the ranks' batch i together are the single-process batch i
(triples, order, negatives), every rank has the same number of batches, short batches split evenly."""
from __future__ import annotations

import pytest
import torch

from goat_dist.graph.csr import CSR
from goat_dist.sampling.triples import TripleSampler


def sampler(batch, rank=0, world=1, **kw):
    g = torch.Generator().manual_seed(0)
    users = torch.randint(0, 20, (103,), generator=g)
    items = torch.randint(0, 30, (103,), generator=g)
    key = torch.unique(users * 30 + items)
    users, items = key // 30, key % 30
    csr = CSR.from_edges(users, items, 20, 30)
    return TripleSampler(users, items, 30, csr, batch, seed=5, rank=rank, world_size=world, **kw)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_union_of_ranks_is_the_single_process_batch(world):
    single = sampler(6 * world)
    ranks = [sampler(6, r, world, shard="global_batch") for r in range(world)]
    assert all(s.num_batches == single.num_batches for s in ranks)
    assert sum(s.shard_size for s in ranks) == single.num_interactions
    for epoch in (0, 1):
        for i in range(single.num_batches):
            parts = [s.batch(i, epoch) for s in ranks]
            sizes = [p[0].numel() for p in parts]
            assert max(sizes) - min(sizes) <= 1
            for k, ref in enumerate(single.batch(i, epoch)):
                assert torch.equal(torch.cat([p[k] for p in parts]), ref)


def test_default_is_unchanged_and_bad_mode_rejected():
    assert sampler(4).shard_mode == "strided"
    with pytest.raises(ValueError, match="shard must be one of"):
        sampler(4, shard="bogus")
