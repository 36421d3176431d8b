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


# ------------------------------------------------------------------------------------------
# Full-graph LightGCN: the memory-lean pass against the straightforward one it replaced

from goat_dist.graph.csr import CSR  # noqa: E402
import goat_dist.model.lightgcn as lightgcn_mod  # noqa: E402
from goat_dist.model.lightgcn import (csr_norm_values, csr_rows_spmm, csr_spmm, csr_t_spmm_add,  # noqa: E402
                                     full_graph_lightgcn)


def _dense(csr):
    """The normalised adjacency as a dense float64 matrix."""
    a = torch.zeros(csr.n_rows, csr.n_cols, dtype=torch.float64)
    rows = torch.repeat_interleave(torch.arange(csr.n_rows), csr.degrees())
    a.index_put_((rows, csr.indices.to(torch.int64)), csr_norm_values(csr).to(torch.float64), accumulate=True)
    return a


def _reference_full_graph(user_items, item_users, table_u, table_i, num_layers):
    """The obvious LightGCN in float64: dense normalised adjacency matmuls, fresh layer tensors."""
    a_ui, a_iu = _dense(user_items), _dense(item_users)
    h_u, h_i = table_u.double(), table_i.double()
    acc_u, acc_i = h_u.clone(), h_i.clone()
    for _ in range(num_layers):
        h_u, h_i = a_ui @ h_i, a_iu @ h_u
        acc_u, acc_i = acc_u + h_u, acc_i + h_i
    return acc_u / (num_layers + 1), acc_i / (num_layers + 1)


def _random_graph(n_users, n_items, n_edges, seed, empty_users=(), empty_items=()):
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(0, n_users, (n_edges,), generator=g)
    i = torch.randint(0, n_items, (n_edges,), generator=g)
    keep = ~torch.isin(u, torch.tensor(list(empty_users), dtype=torch.int64)) & \
        ~torch.isin(i, torch.tensor(list(empty_items), dtype=torch.int64))
    u, i = u[keep], i[keep]
    ui = CSR.from_edges(u.numpy(), i.numpy(), n_users, n_items)
    iu = CSR.from_edges(i.numpy(), u.numpy(), n_items, n_users)
    return ui, iu


def _counting_lookup(table_u, table_i, chunk_size):
    """``lookup(node_type, ids)`` over the two tables that checks the chunk bound and records every
    call's size in the returned list."""
    calls = []

    def lookup(t, ids):
        calls.append(ids.numel())
        assert ids.numel() <= chunk_size
        return (table_u if t == "user" else table_i)[ids]
    return lookup, calls


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 65536])
@pytest.mark.parametrize("num_layers", [0, 1, 3])
def test_full_graph_lightgcn_lean_matches_reference(chunk_size, num_layers):
    n_users, n_items, d = 257, 130, 16
    ui, iu = _random_graph(n_users, n_items, 1500, seed=chunk_size + num_layers, empty_users=(0, 100, 256),
                           empty_items=(5, 129))
    g = torch.Generator().manual_seed(1)
    table_u, table_i = torch.randn(n_users, d, generator=g), torch.randn(n_items, d, generator=g)
    lookup, calls = _counting_lookup(table_u, table_i, chunk_size)

    ref_u, ref_i = _reference_full_graph(ui, iu, table_u, table_i, num_layers)
    got_u, got_i = full_graph_lightgcn(ui, iu, lookup, num_layers, d, chunk_size=chunk_size)
    assert got_u.dtype == torch.float32 and got_u.shape == (n_users, d) and got_i.shape == (n_items, d)
    torch.testing.assert_close(got_u.double(), ref_u, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_i.double(), ref_i, atol=1e-6, rtol=1e-6)
    assert sum(calls) == n_users + n_items
    # a user subset (any order, repeats): the same rows, bit for bit
    ids = torch.tensor([256, 3, 0, 3, 200, 17])
    sub_u, sub_i = full_graph_lightgcn(ui, iu, lookup, num_layers, d, chunk_size=chunk_size, user_ids=ids)
    assert torch.equal(sub_u, got_u[ids]) and torch.equal(sub_i, got_i)


def test_csr_spmm_rows_and_out_buffer():
    ui, _ = _random_graph(300, 90, 2000, seed=3, empty_users=range(40, 60))
    h = torch.randn(95, 8)  # padded: more rows than the CSR has columns
    full = csr_spmm(ui, h, chunk_size=32)
    ref = _dense(ui) @ h[:90].double()
    torch.testing.assert_close(full.double(), ref, atol=1e-6, rtol=1e-6)
    out = torch.full((200, 8), float("nan"))
    part = csr_spmm(ui, h, chunk_size=13, out=out, rows=(35, 170))
    assert part.data_ptr() == out.data_ptr() and torch.equal(part, full[35:170])  # empty rows zeroed
    ids = torch.tensor([299, 45, 0, 45, 120])
    assert torch.equal(csr_rows_spmm(ui, ids, h, chunk_size=2), full[ids])


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 65536])
@pytest.mark.parametrize("num_layers", [0, 1, 2, 3])
def test_streamed_user_subset_matches_reference(chunk_size, num_layers):
    """stream_users=True (no [n_users, d] buffer): the kept users and all items equal the float64
    dense reference and the buffered pass up to float rounding; lookups as in the buffered pass."""
    n_users, n_items, d = 263, 91, 8
    ui, iu = _random_graph(n_users, n_items, 1700, seed=11 * chunk_size + num_layers, empty_users=(0, 7, 262),
                           empty_items=(3, 90))
    g = torch.Generator().manual_seed(chunk_size + 5 * num_layers)
    table_u, table_i = torch.randn(n_users, d, generator=g), torch.randn(n_items, d, generator=g)
    lookup, calls = _counting_lookup(table_u, table_i, chunk_size)

    ids = torch.tensor([262, 3, 0, 3, 200, 17, 7, 130])
    ref_u, ref_i = _reference_full_graph(ui, iu, table_u, table_i, num_layers)
    got_u, got_i = full_graph_lightgcn(ui, iu, lookup, num_layers, d, chunk_size=chunk_size, user_ids=ids,
                                       stream_users=True)
    assert got_u.shape == (ids.numel(), d) and got_i.shape == (n_items, d) and got_u.dtype == torch.float32
    torch.testing.assert_close(got_u.double(), ref_u[ids], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_i.double(), ref_i, atol=1e-6, rtol=1e-6)
    assert sum(calls) == n_users + n_items
    buf_u, buf_i = full_graph_lightgcn(ui, iu, lookup, num_layers, d, chunk_size=chunk_size, user_ids=ids)
    torch.testing.assert_close(got_u, buf_u, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_i, buf_i, atol=1e-6, rtol=1e-6)


def test_streamed_users_needs_user_ids_and_one_process():
    ui, iu = _random_graph(20, 10, 60, seed=0)
    lookup = lambda t, ids: torch.zeros(ids.numel(), 4)  # noqa: E731
    with pytest.raises(ValueError, match="needs user_ids"):
        full_graph_lightgcn(ui, iu, lookup, 2, 4, stream_users=True)


@pytest.mark.parametrize("compiled", [True, False])
def test_csr_t_spmm_add_matches_dense_transpose(compiled):
    """The transposed product of a row range added into ``out``: numba loop and index_add_ path
    against the dense float64 A[r0:r1]^T @ h, on fresh random inputs (padded out, empty rows)."""
    if compiled and lightgcn_mod._t_spmm_add is None:
        pytest.skip("numba not installed")
    ui, _ = _random_graph(120, 45, 900, seed=int(torch.randint(0, 10_000, ()).item()), empty_users=range(30, 50))
    dense = _dense(ui)
    h = torch.randn(120, 6)
    for r0, r1 in [(0, 120), (25, 55), (31, 40), (70, 70)]:
        start = torch.randn(50, 6)
        out = start.clone()
        got = csr_t_spmm_add(ui, h[r0:r1], out, (r0, r1), compiled=compiled)
        assert got is out
        ref = start.double().clone()
        ref[:45] += dense[r0:r1].t() @ h[r0:r1].double()
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="rows"):
        csr_t_spmm_add(ui, h[:3], torch.zeros(45, 6), (0, 4), compiled=compiled)
