"""NeighborSampler: exact neighbourhoods at fanout -1, block invariants, without-replacement
uniformity (with a biased sampler that the same check must reject), determinism, devices."""
from __future__ import annotations

import math
from itertools import combinations

import pytest
import torch

from _sampling_ref import (CHI2_CRIT_999, adjacency, chi_square_uniform, full_neighbourhood_reference,
                           global_edges, random_csr)
from goat_dist.graph.csr import CSR
from goat_dist.sampling.blocks import ITEM, ITEM_TO_USER, USER, USER_TO_ITEM, item_item_relation
from goat_dist.sampling.neighbor import NeighborSampler, floyd_sample, pyg_lib_available, sample_rows

II = item_item_relation("image")


def hetero_graphs(seed: int = 0) -> dict:
    ui = random_csr(30, 25, 110, seed)                      # rows users, cols items
    return {ITEM_TO_USER: ui, USER_TO_ITEM: ui.transpose(), II: random_csr(25, 25, 70, seed + 1)}


def gen(seed: int, device="cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


SEEDS = {USER: torch.tensor([0, 7, 3, 29]), ITEM: torch.tensor([5, 1])}


@pytest.mark.parametrize("hops,seeds", [(1, SEEDS), (3, SEEDS), (2, {USER: torch.tensor([4, 2])}),
                                         (2, {ITEM: torch.empty(0, dtype=torch.int64)})])
def test_fanout_all_equals_bruteforce_neighbourhood(hops, seeds):
    graphs = hetero_graphs()
    sampler = NeighborSampler(graphs, {r: [-1] * hops for r in graphs})
    sg = sampler.sample(seeds, gen(0))
    ref = full_neighbourhood_reference(graphs, {t: v.tolist() for t, v in seeds.items()}, hops)
    assert len(sg.blocks) == hops
    for h, (ref_nodes, ref_edges) in enumerate(ref):
        block = sg.blocks[hops - 1 - h]
        for t, ids in ref_nodes.items():
            assert sorted(block.src_nodes[t].tolist()) == sorted(ids), (h, t)
        for rel, es in ref_edges.items():
            got = global_edges(block, rel)
            assert len(got) == len(set(got)), "duplicate edge"
            assert set(got) == es, (h, rel)


def test_block_invariants_and_real_edges():
    graphs = hetero_graphs(3)
    fanouts = {ITEM_TO_USER: [3, 2, 2], USER_TO_ITEM: [2, 2, 1], II: [4, -1, 2]}
    sg = NeighborSampler(graphs, fanouts).sample(SEEDS, gen(1))
    adj = {rel: adjacency(csr) for rel, csr in graphs.items()}
    blocks = sg.blocks
    for t in (USER, ITEM):
        assert torch.equal(blocks[-1].src_nodes[t][:blocks[-1].n_dst[t]], SEEDS[t])
        assert torch.equal(sg.seeds[t], SEEDS[t])
    for i in range(len(blocks) - 1):
        for t in (USER, ITEM):
            assert torch.equal(blocks[i + 1].src_nodes[t], blocks[i].src_nodes[t][:blocks[i].n_dst[t]])
    for i, block in enumerate(blocks):
        hop = len(blocks) - 1 - i
        for t, ids in block.src_nodes.items():
            assert ids.dtype == torch.int64 and ids.unique().numel() == ids.numel()
        for rel, ei in block.edge_index.items():
            s, _, d = rel
            assert ei.dtype == torch.int64 and ei.shape[0] == 2
            assert int(ei[0].min()) >= 0 and int(ei[0].max()) < block.src_nodes[s].numel()
            assert int(ei[1].min()) >= 0 and int(ei[1].max()) < block.n_dst[d]
            w = block.edge_weight[rel]
            assert w is not None and w.dtype == torch.float32 and w.numel() == ei.shape[1]
            for src, dst, wt in global_edges(block, rel):
                assert src in adj[rel][dst], "not a graph edge"
                assert math.isclose(adj[rel][dst][src], wt, abs_tol=1e-6)
            # Without replacement: each neighbour at most once per destination; count = min(deg, f).
            pairs = ei.t().tolist()
            assert len(pairs) == len({tuple(p) for p in pairs})
            f = fanouts[rel][hop]
            counts = torch.bincount(ei[1], minlength=block.n_dst[d])
            dst_ids = block.src_nodes[d][:block.n_dst[d]]
            deg = graphs[rel].degrees()[dst_ids]
            assert torch.equal(counts, deg if f < 0 else deg.clamp(max=f))


def test_deterministic_for_generator_state_and_seed_sensitive():
    graphs = hetero_graphs(5)
    sampler = NeighborSampler(graphs, {r: [2, 2] for r in graphs})

    def flat(sg):
        return [(t, b.src_nodes[t].tolist()) for b in sg.blocks for t in sorted(b.src_nodes)] + \
               [(r, b.edge_index[r].tolist()) for b in sg.blocks for r in sorted(b.edge_index)]

    a, b, c = (sampler.sample(SEEDS, gen(s)) for s in (7, 7, 8))
    assert flat(a) == flat(b)
    assert flat(a) != flat(c)


def test_seed_errors():
    graphs = hetero_graphs()
    sampler = NeighborSampler(graphs, {r: [2] for r in graphs})
    with pytest.raises(ValueError, match="unique"):
        sampler.sample({USER: torch.tensor([1, 1])}, gen(0))
    with pytest.raises(ValueError, match="lie in"):
        sampler.sample({USER: torch.tensor([30])}, gen(0))
    # The failed calls must not leave stale scratch state behind.
    sg = sampler.sample({USER: torch.tensor([1])}, gen(0))
    assert sg.blocks[0].src_nodes[USER][0] == 1
    with pytest.raises(ValueError, match="same number of hops"):
        NeighborSampler(graphs, {ITEM_TO_USER: [2], USER_TO_ITEM: [2, 2], II: [2]})
    with pytest.raises(ValueError, match="nodes"):
        NeighborSampler({ITEM_TO_USER: random_csr(3, 4, 5, 0), USER_TO_ITEM: random_csr(5, 3, 5, 0)},
                        {ITEM_TO_USER: [1], USER_TO_ITEM: [1]})


# ---- uniformity ------------------------------------------------------------------------------------

def subset_counts(sample_fn, deg: int, k: int, n_draws: int, seed: int) -> torch.Tensor:
    """Draw ``n_draws`` k-subsets of a degree-``deg`` row (one vectorised call over identical rows)
    and count how often each of the C(deg, k) subsets came out."""
    rows = torch.arange(n_draws).repeat_interleave(deg)
    cols = torch.arange(deg).repeat(n_draws)
    csr = CSR.from_edges(rows, cols, n_draws, deg)
    dst, nbr, _ = sample_fn(csr, torch.arange(n_draws), k, gen(seed))
    assert torch.equal(torch.bincount(dst, minlength=n_draws), torch.full((n_draws,), k))
    index = {c: i for i, c in enumerate(combinations(range(deg), k))}
    order = torch.argsort(dst * deg + nbr)
    chosen = nbr[order].view(n_draws, k).tolist()
    counts = torch.zeros(len(index), dtype=torch.int64)
    for row in chosen:
        counts[index[tuple(row)]] += 1
    return counts


def biased_sampler(csr: CSR, rows: torch.Tensor, k: int, generator):
    """Deliberately biased without-replacement sampler: neighbour j drawn with weight j + 1."""
    deg = int(csr.degrees()[0])
    w = torch.arange(1, deg + 1, dtype=torch.float64).expand(rows.numel(), deg)
    off = torch.multinomial(w, k, replacement=False, generator=generator)
    dst = torch.arange(rows.numel()).repeat_interleave(k)
    nbr = csr.indices[(csr.indptr[rows].unsqueeze(1) + off).reshape(-1)].long()
    return dst, nbr, None


@pytest.mark.parametrize("deg,k", [(6, 2), (7, 3), (10, 1)])
def test_without_replacement_sampling_is_uniform(deg, k):
    n_cells = math.comb(deg, k)
    counts = subset_counts(sample_rows, deg, k, 40 * n_cells, seed=deg * 100 + k)
    assert chi_square_uniform(counts) < CHI2_CRIT_999[n_cells - 1]


@pytest.mark.parametrize("deg,k", [(6, 2), (7, 3)])
def test_uniformity_check_rejects_a_biased_sampler(deg, k):
    n_cells = math.comb(deg, k)
    counts = subset_counts(biased_sampler, deg, k, 40 * n_cells, seed=1)
    assert chi_square_uniform(counts) > CHI2_CRIT_999[n_cells - 1]


def test_floyd_large_degrees_distinct_in_range_and_unbiased_marginals():
    deg = torch.tensor([10**6, 10**9, 11, 40] * 500)
    out = floyd_sample(deg, 10, gen(3)).t()
    assert out.shape == (2000, 10)
    assert bool((out >= 0).all()) and bool((out < deg.unsqueeze(1)).all())
    srt = out.sort(1).values
    assert bool((srt[:, 1:] != srt[:, :-1]).all())
    # Marginal of a degree-40 row: every offset equally likely (df = 39 is not tabled; bucket by 2).
    d40 = floyd_sample(torch.full((4000,), 40), 10, gen(4)).reshape(-1)
    counts = torch.bincount(d40 // 2, minlength=20)
    assert chi_square_uniform(counts) < CHI2_CRIT_999[19]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu_at_full_fanout_and_keeps_invariants():
    graphs = hetero_graphs(2)
    cpu = NeighborSampler(graphs, {r: [-1, -1] for r in graphs}).sample(SEEDS, gen(0))
    gpu = NeighborSampler({r: c.to("cuda") for r, c in graphs.items()}, {r: [-1, -1] for r in graphs}
                          ).sample({t: v.cuda() for t, v in SEEDS.items()}, gen(0, "cuda"))
    for bc, bg in zip(cpu.blocks, gpu.blocks):
        for t in bc.src_nodes:
            assert torch.equal(bc.src_nodes[t], bg.src_nodes[t].cpu())
        for r in bc.edge_index:
            assert torch.equal(bc.edge_index[r], bg.edge_index[r].cpu())
    counts = subset_counts(lambda c, r, k, g: sample_rows(c.to("cuda"), r.cuda(), k, gen(9, "cuda")),
                           6, 2, 600, 0)
    assert chi_square_uniform(counts) < CHI2_CRIT_999[14]


@pytest.mark.skipif(not pyg_lib_available(), reason="pyg_lib not installed")
def test_pyg_lib_backend_same_distribution_and_invariants():
    from goat_dist.sampling.neighbor import _sample_rows_pyg_lib

    def fn(csr, rows, k, g):
        return _sample_rows_pyg_lib(csr, csr.indices.long(), rows, k, g)

    counts = subset_counts(fn, 6, 2, 600, 0)
    assert chi_square_uniform(counts) < CHI2_CRIT_999[14]
    graphs = hetero_graphs(3)
    sg = NeighborSampler(graphs, {r: [2, 2] for r in graphs}, backend="pyg_lib").sample(SEEDS)
    adj = {rel: adjacency(csr) for rel, csr in graphs.items()}
    for block in sg.blocks:
        for rel in block.edge_index:
            for src, dst, _ in global_edges(block, rel):
                assert src in adj[rel][dst]
