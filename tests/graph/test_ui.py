"""User-item graph: both directions, distinct-neighbour degrees, LightGCN normalisation."""
from __future__ import annotations

import numpy as np
import torch

from goat_dist.graph import build_user_item_graph


def test_user_item_graph_degrees_and_normalisation():
    rng = np.random.default_rng(0)
    n_users, n_items = 9, 7
    users = rng.integers(0, n_users - 1, 60).astype(np.int32)  # last user is cold
    items = rng.integers(0, n_items, 60).astype(np.int32)
    g = build_user_item_graph(n_users, n_items, users, items)

    dense = np.zeros((n_users, n_items))
    dense[users, items] = 1  # repeated pairs count once
    du, di = dense.sum(1), dense.sum(0)
    assert g.user_degree.tolist() == du.astype(int).tolist()
    assert g.item_degree.tolist() == di.astype(int).tolist()
    assert g.nnz == int(dense.sum()) and g.n_users == n_users and g.n_items == n_items
    assert g.user_degree[-1] == 0

    for u in range(n_users):
        s, e = g.user_items.indptr[u], g.user_items.indptr[u + 1]
        cols = g.user_items.indices[s:e].tolist()
        assert cols == np.flatnonzero(dense[u]).tolist()
        expect = 1.0 / np.sqrt(du[u] * di[cols])
        np.testing.assert_allclose(g.user_items.values[s:e].numpy(), expect, rtol=1e-6)
    for i in range(n_items):
        s, e = g.item_users.indptr[i], g.item_users.indptr[i + 1]
        rows = g.item_users.indices[s:e].tolist()
        assert rows == np.flatnonzero(dense[:, i]).tolist()
        np.testing.assert_allclose(g.item_users.values[s:e].numpy(), 1.0 / np.sqrt(du[rows] * di[i]), rtol=1e-6)


def test_full_propagation_matrix_is_symmetric_normalised_adjacency():
    rng = np.random.default_rng(1)
    n_users, n_items = 6, 5
    users, items = rng.integers(0, n_users, 25), rng.integers(0, n_items, 25)
    g = build_user_item_graph(n_users, n_items, users, items)
    a = np.zeros((n_users + n_items,) * 2)
    a[users, n_users + items] = 1
    a[n_users + items, users] = 1
    deg = a.sum(1)
    dinv = np.where(deg > 0, 1 / np.sqrt(np.maximum(deg, 1)), 0)
    expect = dinv[:, None] * a * dinv[None, :]
    m = g.full_propagation_matrix()
    assert m.layout == torch.sparse_csr and tuple(m.shape) == expect.shape
    np.testing.assert_allclose(m.to_dense().numpy(), expect, rtol=1e-6)
    x = torch.randn(n_users + n_items, 3)
    np.testing.assert_allclose((m @ x).numpy(), expect @ x.numpy(), rtol=1e-5, atol=1e-6)
