"""CSR construction (chunked counting sort) against a brute-force Python reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from goat_dist.graph.csr import CSR


def reference(rows, cols, vals, n_rows):
    """Row -> sorted unique columns, and the FIRST value seen for every (row, col)."""
    first = {}
    for r, c, v in zip(rows.tolist(), cols.tolist(), vals.tolist()):
        first.setdefault((r, c), v)
    adj = [sorted(c for (r, c) in first if r == row) for row in range(n_rows)]
    return adj, first


def rows_of(csr: CSR) -> list[list[int]]:
    return [csr.indices[csr.indptr[r]:csr.indptr[r + 1]].tolist() for r in range(csr.n_rows)]


@pytest.mark.parametrize("seed", range(12))
def test_from_edges_matches_reference(seed):
    rng = np.random.default_rng(seed)
    n_rows, n_cols = (int(x) for x in rng.integers(1, 25, 2))
    e = int(rng.integers(0, 300))
    rows = rng.integers(0, n_rows, e).astype(np.int32)
    cols = rng.integers(0, n_cols, e).astype(np.int64)
    vals = rng.random(e).astype(np.float32)
    chunk = int(rng.integers(1, 64))  # small chunks exercise the cross-chunk bookkeeping
    csr = CSR.from_edges(rows, cols, n_rows, n_cols, vals, chunk=chunk)
    adj, first = reference(rows, cols, vals, n_rows)

    assert rows_of(csr) == adj
    assert csr.indptr.dtype == torch.int64 and csr.indices.dtype == torch.int32
    assert csr.degrees().tolist() == [len(a) for a in adj]
    assert csr.nnz == len(first)
    got_vals = {(r, c): v for r in range(n_rows)
                for c, v in zip(rows_of(csr)[r], csr.values[csr.indptr[r]:csr.indptr[r + 1]].tolist())}
    assert got_vals == first

    t = csr.transpose(chunk=chunk)
    assert t.n_rows == n_cols and t.n_cols == n_rows
    assert rows_of(t) == [sorted(r for (r, c) in first if c == col) for col in range(n_cols)]
    assert {(r, c): v for c in range(n_cols)
            for r, v in zip(rows_of(t)[c], t.values[t.indptr[c]:t.indptr[c + 1]].tolist())} == first


@pytest.mark.parametrize("n_cols", [50, 2**32])
def test_row_sorted_input_and_int64_columns(n_cols):
    """Input grouped by row takes the copy-through path; partly sorted rows the shift-only path;
    more than 2**31 columns need int64 indices."""
    rng = np.random.default_rng(42)
    n_rows = 20
    rows = np.sort(rng.integers(0, n_rows, 200))  # non-decreasing everywhere
    cols = rng.integers(0, n_cols, 200)
    cols[:100] = np.sort(cols[:100])  # rows in this span have sorted columns
    same_row = np.flatnonzero(rows[101:] == rows[100:-1])[::3] + 101
    cols[same_row] = cols[same_row - 1]  # and a few duplicates
    vals = rng.random(200).astype(np.float32)
    csr = CSR.from_edges(rows, cols, n_rows, n_cols, vals, chunk=16)
    adj, first = reference(rows, cols, vals, n_rows)
    assert rows_of(csr) == adj
    assert csr.indices.dtype == (torch.int32 if n_cols < 2**31 else torch.int64)
    assert csr.values.tolist() == [first[(r, c)] for r in range(n_rows) for c in adj[r]]


def test_from_edges_accepts_tensors_memmaps_and_no_values(tmp_path):
    rows = np.array([2, 0, 2, 2, 1], dtype=np.int64)
    cols = np.array([1, 3, 0, 1, 3], dtype=np.int32)
    path = tmp_path / "rows.npy"
    np.save(path, rows)
    mm = np.load(path, mmap_mode="r")
    for r in (torch.from_numpy(rows), mm):
        csr = CSR.from_edges(r, cols, 3, 4)
        assert csr.values is None
        assert csr.indptr.tolist() == [0, 1, 2, 4]
        assert csr.indices.tolist() == [3, 3, 0, 1]


def test_empty_graph():
    csr = CSR.from_edges(np.zeros(0, np.int64), np.zeros(0, np.int64), 3, 2)
    assert csr.indptr.tolist() == [0, 0, 0, 0] and csr.nnz == 0
    assert csr.transpose().indptr.tolist() == [0, 0, 0]


@pytest.mark.parametrize("rows,cols,msg", [([0, 3], [0, 0], "row ids"), ([0, 1], [0, -1], "col ids"),
                                           ([0], [0, 1], "equal 1-D")])
def test_from_edges_rejects_bad_ids(rows, cols, msg):
    with pytest.raises(ValueError, match=msg):
        CSR.from_edges(np.array(rows), np.array(cols), 3, 2)


def test_from_edge_chunks_equals_from_edges():
    """The streamed builder (chunks of any size, duplicates across chunks) against from_edges."""
    rng = np.random.default_rng(21)
    n_rows, n_cols, e = 60, 45, 900
    rows = torch.from_numpy(rng.integers(0, n_rows, e))
    cols = torch.from_numpy(rng.integers(0, n_cols, e))
    vals = torch.from_numpy(rng.standard_normal(e).astype(np.float32))
    ref = CSR.from_edges(rows, cols, n_rows, n_cols, vals)
    for step in (1, 7, 1000):
        def chunks(step=step):
            for s in range(0, e, step):
                yield rows[s:s + step], cols[s:s + step], vals[s:s + step]
        got = CSR.from_edge_chunks(chunks, n_rows, n_cols, e, True, chunk=64)
        assert torch.equal(got.indptr, ref.indptr) and torch.equal(got.indices, ref.indices)
        assert torch.equal(got.values, ref.values)  # first value of a repeated pair kept, as from_edges


def test_from_edge_chunks_rejects_bad_streams():
    rows, cols = torch.tensor([0, 1, 2]), torch.tensor([1, 5, 0])
    with pytest.raises(ValueError, match=r"col ids must lie in \[0, 3\)"):
        CSR.from_edge_chunks(lambda: iter([(rows, cols, None)]), 3, 3, 3, False)
    ok = torch.tensor([1, 2, 0])
    with pytest.raises(ValueError, match="expected nnz=4"):
        CSR.from_edge_chunks(lambda: iter([(rows, ok, None)]), 3, 3, 4, False)


@pytest.mark.parametrize("hops", [1, 2])
def test_khop_subgraph_against_bruteforce(hops):
    rng = np.random.default_rng(5 + hops)
    n = 80
    rows, cols = rng.integers(0, n, 240), rng.integers(0, n, 240)
    g = CSR.from_edges(np.concatenate([rows, np.arange(n)]), np.concatenate([cols, np.arange(n)]), n, n)
    adj = rows_of(g)
    seeds = torch.tensor([17, 3, 42])
    nodes, local = g.khop_subgraph(seeds, hops)
    assert nodes[:3].tolist() == [17, 3, 42] and len(set(nodes.tolist())) == nodes.numel()
    dist = {int(s): 0 for s in seeds}
    for h in range(hops):
        for v in [v for v, d in dist.items() if d == h]:
            for u in adj[v]:
                dist.setdefault(u, h + 1)
    assert set(nodes.tolist()) == set(dist)
    for i, v in enumerate(nodes.tolist()):
        got = sorted(nodes[local.indices[local.indptr[i]:local.indptr[i + 1]].long()].tolist())
        assert got == (adj[v] if dist[v] < hops else [])
    with pytest.raises(ValueError, match="distinct"):
        g.khop_subgraph(torch.tensor([1, 1]), 1)
