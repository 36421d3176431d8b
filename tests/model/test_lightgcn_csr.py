"""The sparse-CSR aggregation against the obvious gather + index_add reference, forward and backward."""
import pytest
import torch

from goat_dist.model.lightgcn import aggregate
from goat_dist.sampling.blocks import ITEM, ITEM_TO_USER, USER, Block


def _reference(block, h, degrees):
    src, dst = block.edge_index[ITEM_TO_USER]
    n_dst = block.n_dst[USER]
    w = block.edge_weight[ITEM_TO_USER]
    out = h.new_zeros((n_dst, h.shape[1])).index_add(0, dst, h[src] * (1.0 if w is None else w.to(h.dtype)[:, None]))
    if degrees is not None:
        s = torch.bincount(dst, minlength=n_dst).to(h.dtype).clamp_min(1)
        out = out * (degrees[block.src_nodes[USER][:n_dst]].to(h.dtype) / s)[:, None]
    return out


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("sorted_dst", [True, False])
def test_csr_aggregate_matches_index_add(weighted, rescale, sorted_dst):
    g = torch.Generator().manual_seed(0)
    n_edges, n_src, n_dst = 400, 50, 25
    src = torch.randint(0, n_src, (n_edges,), generator=g)
    dst = torch.randint(0, n_dst, (n_edges,), generator=g)
    if sorted_dst:
        dst = dst.sort().values
    w = torch.rand(n_edges, generator=g) if weighted else None
    block = Block({USER: torch.randperm(60, generator=g)[:30], ITEM: torch.arange(n_src)}, {USER: n_dst, ITEM: 0},
                  {ITEM_TO_USER: torch.stack([src, dst])}, {ITEM_TO_USER: w})
    deg = torch.randint(1, 40, (60,), generator=g) if rescale else None
    h = torch.randn(n_src, 8, dtype=torch.float64, generator=g, requires_grad=True)
    out, ref = aggregate(block, ITEM_TO_USER, h, deg), _reference(block, h, deg)
    torch.testing.assert_close(out, ref)
    grad = torch.randn(out.shape, dtype=out.dtype, generator=g)
    torch.testing.assert_close(torch.autograd.grad(out, h, grad)[0], torch.autograd.grad(ref, h, grad)[0])
    with torch.no_grad():
        torch.testing.assert_close(aggregate(block, ITEM_TO_USER, h, deg), ref.detach())


def test_csr_aggregate_empty_relation():
    block = Block({USER: torch.arange(3), ITEM: torch.arange(4)}, {USER: 3, ITEM: 0},
                  {ITEM_TO_USER: torch.empty((2, 0), dtype=torch.int64)}, {ITEM_TO_USER: None})
    assert torch.equal(aggregate(block, ITEM_TO_USER, torch.ones(4, 2)), torch.zeros(3, 2))
