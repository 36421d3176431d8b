import pytest
import torch

from goat_dist.graph.csr import CSR
from goat_dist.model.lightgcn import aggregate, full_graph_lightgcn, lightgcn_blocks
from goat_dist.sampling.blocks import ITEM, ITEM_TO_USER, USER, USER_TO_ITEM, Block
from ref_blocks import TinyData, unique_in_order, full_subgraph


def sparse_lightgcn(data: TinyData, e_u, e_i, layers):
    """Plain full-graph LightGCN: E^(k+1) = A_hat E^(k) with a torch sparse matrix, mean of layers."""
    nu, ni = data.n_users, data.n_items
    ui = data.user_items
    r = torch.repeat_interleave(torch.arange(nu), ui.degrees())
    c = ui.indices.long() + nu
    idx = torch.cat([torch.stack([r, c]), torch.stack([c, r])], 1)
    a = torch.sparse_coo_tensor(idx, torch.cat([ui.values, ui.values]).double(), (nu + ni, nu + ni))
    e = torch.cat([e_u, e_i]).double()
    acc = e.clone()
    for _ in range(layers):
        e = torch.sparse.mm(a, e)
        acc += e
    acc /= layers + 1
    return acc[:nu], acc[nu:]


@pytest.mark.parametrize("layers", [1, 3, 4])
def test_minibatch_equals_full_graph_with_fanout_all(layers):
    data = TinyData(seed=layers)
    g = torch.Generator().manual_seed(0)
    e_u, e_i = torch.randn(data.n_users, 8, generator=g), torch.randn(data.n_items, 8, generator=g)
    ref_u, ref_i = sparse_lightgcn(data, e_u, e_i, layers)
    batch = data.random_batch(9, seed=1, id_layers=layers, gat_layers=1)
    sub = batch.ui
    u, i = lightgcn_blocks(sub, e_u[sub.blocks[0].src_nodes[USER]], e_i[sub.blocks[0].src_nodes[ITEM]])
    assert (u.double() - ref_u[batch.unique_users]).abs().max() <= 1e-5
    assert (i.double() - ref_i[batch.unique_items]).abs().max() <= 1e-5
    # passing the full degrees changes nothing when every neighbour is kept
    u2, _ = lightgcn_blocks(sub, e_u[sub.blocks[0].src_nodes[USER]], e_i[sub.blocks[0].src_nodes[ITEM]], data.deg)
    torch.testing.assert_close(u2, u)
    # chunked full-graph inference agrees too
    fu, fi = full_graph_lightgcn(data.user_items, data.item_users,
                                 lambda t, ids: (e_u if t == USER else e_i)[ids], layers, 8, chunk_size=5)
    assert (fu.double() - ref_u).abs().max() <= 1e-5 and (fi.double() - ref_i).abs().max() <= 1e-5


def test_sampled_rescaling_is_unbiased():
    """One user with D = 3 items, fanout 2: averaging the rescaled estimate over all 3 equally likely
    neighbour subsets gives the full sum exactly."""
    w = torch.tensor([0.5, 0.25, 0.125])
    h = torch.randn(3, 4)
    full = (w.unsqueeze(1) * h).sum(0)
    estimates = []
    for keep in ([0, 1], [0, 2], [1, 2]):
        block = Block({USER: torch.tensor([0]), ITEM: torch.tensor(keep)}, {USER: 1, ITEM: 0},
                      {ITEM_TO_USER: torch.tensor([[0, 1], [0, 0]])}, {ITEM_TO_USER: w[keep]})
        estimates.append(aggregate(block, ITEM_TO_USER, h[keep], degrees=torch.tensor([3]))[0])
    torch.testing.assert_close(torch.stack(estimates).mean(0), full)
    # without degrees the 2-of-3 estimate is biased low (the test above can fail)
    block = Block({USER: torch.tensor([0]), ITEM: torch.tensor([0, 1])}, {USER: 1, ITEM: 0},
                  {ITEM_TO_USER: torch.tensor([[0, 1], [0, 0]])}, {ITEM_TO_USER: w[:2]})
    assert not torch.allclose(aggregate(block, ITEM_TO_USER, h[:2]) * 1.5, aggregate(block, ITEM_TO_USER, h[:2]))


def test_no_layers_is_the_embedding():
    data = TinyData()
    batch = data.random_batch(4, seed=0, id_layers=0, gat_layers=0)
    e_u, e_i = torch.randn(len(batch.unique_users), 4), torch.randn(len(batch.unique_items), 4)
    u, i = lightgcn_blocks(batch.ui, e_u, e_i)
    torch.testing.assert_close(u, e_u)
    torch.testing.assert_close(i, e_i)
