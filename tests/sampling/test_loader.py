"""MiniBatchSampler / make_loader: MiniBatch contents, independence of num_workers, epochs with
persistent workers, exact resume."""
from __future__ import annotations

import pytest
import torch

from _sampling_ref import random_csr
from goat_dist.graph.csr import CSR
from goat_dist.sampling.blocks import ITEM, USER, MiniBatch, item_item_relation
from goat_dist.sampling.loader import MiniBatchSampler, make_loader
from goat_dist.sampling.triples import TripleSampler

N_USERS, N_ITEMS = 60, 45


def build(seed: int = 0, rank: int = 0, world: int = 1, fanouts=None) -> MiniBatchSampler:
    g = torch.Generator().manual_seed(seed)
    users = torch.randint(0, N_USERS, (400,), generator=g)
    items = torch.randint(0, N_ITEMS, (400,), generator=g)
    ui = CSR.from_edges(users, items, N_USERS, N_ITEMS, torch.rand(400, generator=g))
    triples = TripleSampler(users, items, N_ITEMS, ui, 32, seed=11, rank=rank, world_size=world)
    return MiniBatchSampler(triples, ui, ui.transpose(), hops={"user_item": 2, "item_item": 1, "user_user": 1},
                            fanouts=fanouts or {"user_item": [4, 3], "item_item": [3], "user_user": [2]},
                            item_item={"image": random_csr(N_ITEMS, N_ITEMS, 200, 1),
                                       "text": random_csr(N_ITEMS, N_ITEMS, 150, 2)},
                            user_user=random_csr(N_USERS, N_USERS, 240, 3))


def flatten(mb: MiniBatch) -> list:
    out = [mb.users, mb.pos_items, mb.neg_items, mb.unique_users, mb.unique_items,
           mb.user_index, mb.pos_index, mb.neg_index]
    for sg in [mb.ui, *mb.item_item.values(), mb.user_user]:
        for b in (sg.blocks if sg is not None else []):
            out += [b.src_nodes[t] for t in sorted(b.src_nodes)]
            out += [b.edge_index[r] for r in sorted(b.edge_index)]
            out += [b.edge_weight[r] for r in sorted(b.edge_weight) if b.edge_weight[r] is not None]
    return out


def same(a: MiniBatch, b: MiniBatch) -> bool:
    fa, fb = flatten(a), flatten(b)
    return len(fa) == len(fb) and all(torch.equal(x, y) for x, y in zip(fa, fb))


def test_minibatch_contents():
    s = build()
    mb = s.batch(0)
    assert torch.equal(mb.unique_users[mb.user_index], mb.users)
    assert torch.equal(mb.unique_items[mb.pos_index], mb.pos_items)
    assert torch.equal(mb.unique_items[mb.neg_index], mb.neg_items)
    assert mb.unique_users.unique().numel() == mb.unique_users.numel()
    assert torch.equal(mb.ui.seeds[USER], mb.unique_users) and torch.equal(mb.ui.seeds[ITEM], mb.unique_items)
    assert len(mb.ui.blocks) == 2 and set(mb.item_item) == {"image", "text"}
    for sg in mb.item_item.values():
        assert len(sg.blocks) == 1 and torch.equal(sg.blocks[-1].src_nodes[ITEM][:mb.unique_items.numel()],
                                                   mb.unique_items)
    assert torch.equal(mb.user_user.blocks[-1].src_nodes[USER][:mb.unique_users.numel()], mb.unique_users)
    assert s.batch(1, epoch=0) is not None and not same(s.batch(0, epoch=0), s.batch(0, epoch=1))


def test_loader_output_independent_of_num_workers_and_follows_epochs():
    ref = build()
    expected = {e: [ref.batch(i, e) for i in range(ref.num_batches)] for e in (0, 1)}
    for workers in (0, 2):
        s = build()
        loader = make_loader(s, num_workers=workers, prefetch_factor=2, persistent_workers=True)
        if workers:  # graph tensors go to workers through shared memory, not copies
            assert all(c.indices.is_shared() for ns in s.samplers() for c in ns.graphs.values())
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            got = list(loader)
            assert len(got) == len(expected[epoch]) == len(loader)
            assert all(same(a, b) for a, b in zip(got, expected[epoch])), (workers, epoch)


def test_loader_resume_mid_epoch():
    s = build()
    full = [s.batch(i, 3) for i in range(s.num_batches)]
    loader = make_loader(build(), num_workers=0)
    loader.set_epoch(3)
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    assert state == {"epoch": 3, "position": 2}
    resumed = make_loader(build(), num_workers=0)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(full) - 2 and all(same(a, b) for a, b in zip(rest, full[2:]))
    assert len(list(resumed)) == len(full)  # the next pass restarts at batch 0


def test_ranks_differ_and_full_fanout_is_deterministic_in_batch_content():
    a, b = build(rank=0, world=2), build(rank=1, world=2)
    assert not torch.equal(a.batch(0).users, b.batch(0).users) or not torch.equal(a.batch(0).pos_items,
                                                                                  b.batch(0).pos_items)
    full = build(fanouts=-1)
    assert same(full.batch(2), full.batch(2))


def test_item_item_hops_per_modality_and_fanout_prefix():
    """``hops["item_item"]`` as modality -> hops: each kNN graph gets its own depth, a shallower one
    the first (nearest-seed) fanouts of the per-hop list, 0 none; the mapping form draws what the
    single count does given the same stream; stray or negative entries are errors naming the modality."""
    g = torch.Generator().manual_seed(0)
    users = torch.randint(0, N_USERS, (400,), generator=g)
    items = torch.randint(0, N_ITEMS, (400,), generator=g)
    ui = CSR.from_edges(users, items, N_USERS, N_ITEMS)
    triples = TripleSampler(users, items, N_ITEMS, ui, 32, seed=11)
    graphs = {"image": random_csr(N_ITEMS, N_ITEMS, 200, 1), "text": random_csr(N_ITEMS, N_ITEMS, 150, 2)}

    def make(item_hops, fan=(4, 2, 1)):
        return MiniBatchSampler(triples, ui, ui.transpose(), hops={"user_item": 1, "item_item": item_hops},
                                fanouts={"user_item": [3], "item_item": list(fan)}, item_item=graphs)

    s = make({"image": 3, "text": 1})
    assert s.fanouts[item_item_relation("image")] == [4, 2, 1] and s.fanouts[item_item_relation("text")] == [4]
    mb = s.batch(0)
    assert len(mb.item_item["image"].blocks) == 3 and len(mb.item_item["text"].blocks) == 1
    # the text block: at most 4 (the first fanout) real kNN neighbours per seed item
    blk, rel = mb.item_item["text"].blocks[0], item_item_relation("text")
    src, dst = blk.edge_index[rel]
    assert torch.bincount(dst, minlength=mb.unique_items.numel()).max() <= 4
    text = graphs["text"]
    for s_id, d_id in zip(blk.src_nodes[ITEM][src].tolist(), mb.unique_items[dst].tolist()):
        assert s_id in text.indices[text.indptr[d_id]:text.indptr[d_id + 1]].tolist()
    # the mapping form at 1 hop draws what the single count does, given the same stream
    one = MiniBatchSampler(triples, ui, ui.transpose(), hops={"user_item": 1, "item_item": 1},
                           fanouts={"user_item": [3], "item_item": [4]}, item_item={"text": graphs["text"]})
    ref = one.minibatch(mb.users, mb.pos_items, mb.neg_items, torch.Generator().manual_seed(5))
    got = MiniBatchSampler(triples, ui, ui.transpose(), hops={"user_item": 1, "item_item": {"text": 1}},
                           fanouts={"user_item": [3], "item_item": [4]}, item_item={"text": graphs["text"]}
                           ).minibatch(mb.users, mb.pos_items, mb.neg_items, torch.Generator().manual_seed(5))
    assert same(ref, got)
    # a modality left out (or at 0) gets no subgraph
    assert set(make({"image": 3}).batch(0).item_item) == {"image"}
    assert set(make({"image": 3, "text": 0}).batch(0).item_item) == {"image"}
    with pytest.raises(ValueError, match=r"names modalities \['audio'\] that have no item-item graph"):
        make({"image": 3, "audio": 1})
    with pytest.raises(ValueError, match=r"must be >= 0 for every modality, got \{'text': -1\}"):
        make({"image": 3, "text": -1})
