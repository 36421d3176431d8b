"""The model on the real vectorised sampler's blocks (goat_dist.sampling.neighbor): exact at fanout
-1 end to end, and the degree rescaling makes sampled LightGCN unbiased at fanout < degree."""
import torch

from goat_dist.model.lightgcn import lightgcn_blocks
from goat_dist.sampling.blocks import ITEM, ITEM_TO_USER, USER, USER_TO_ITEM, USER_USER, MiniBatch, item_item_relation
from goat_dist.sampling.neighbor import NeighborSampler
from ref_blocks import TinyData
from test_lightgcn import sparse_lightgcn
from test_recgoat import build


def sampled_batch(data, users, pos, neg, id_layers, gat_layers, fanout=-1, seed=0, item_hops=None):
    """``item_hops``: modality -> item-item hops (default ``gat_layers`` for every kNN graph)."""
    users, pos, neg = (torch.tensor(x) for x in (users, pos, neg))
    uu, ui = torch.unique(users, return_inverse=True)
    ii, inv = torch.unique(torch.cat([pos, neg]), return_inverse=True)
    b = pos.numel()
    mb = MiniBatch(users, pos, neg, uu, ii, ui, inv[:b], inv[b:])
    g = torch.Generator().manual_seed(seed)
    mb.ui = NeighborSampler({ITEM_TO_USER: data.user_items, USER_TO_ITEM: data.item_users},
                            {ITEM_TO_USER: [fanout] * id_layers, USER_TO_ITEM: [fanout] * id_layers}).sample(
        {USER: uu, ITEM: ii}, g)
    for m, csr in data.item_graphs.items():
        rel = item_item_relation(m)
        hops = gat_layers if item_hops is None else item_hops[m]
        if item_hops is not None and hops == 0:   # as MiniBatchSampler: no subgraph for that graph
            continue
        mb.item_item[m] = NeighborSampler({rel: csr}, {rel: [fanout] * hops}).sample({ITEM: ii}, g)
    mb.user_user = NeighborSampler({USER_USER: data.user_graph}, {USER_USER: [fanout] * gat_layers}).sample(
        {USER: uu}, g)
    return mb


def test_eval_forward_on_sampler_blocks_equals_full_graph_inference():
    data = TinyData(seed=8)
    model = build(data, 2, True, "oat", id_layers=2, gat_layers=1)
    model(data.random_batch(8, seed=0, id_layers=2, gat_layers=1), data.item_features, data.user_features)
    users, items = model.compute_all_representations(data.user_items, data.item_users, data.item_features,
                                                     data.user_features, data.item_graphs, data.user_graph)
    model.eval()
    batch = sampled_batch(data, [0, 5, 5, 9], [1, 2, 3, 4], [7, 7, 0, 11], id_layers=2, gat_layers=1)
    with torch.no_grad():
        out = model(batch, data.item_features, data.user_features, degrees=data.deg)
    torch.testing.assert_close(out["user"], users[batch.unique_users], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["item"], items[batch.unique_items], rtol=1e-5, atol=1e-5)


def test_sampled_lightgcn_is_unbiased_with_degrees():
    data = TinyData(n_users=12, n_items=10, n_edges=70, seed=9)
    g = torch.Generator().manual_seed(0)
    e_u, e_i = torch.randn(data.n_users, 4, generator=g), torch.randn(data.n_items, 4, generator=g)
    ref_u, _ = sparse_lightgcn(data, e_u, e_i, 1)
    seeds = torch.arange(data.n_users)
    assert int(data.deg[USER].max()) > 2
    est_w, est_wo = [], []
    for s in range(400):
        batch = sampled_batch(data, seeds.tolist(), [0] * 12, [1] * 12, id_layers=1, gat_layers=1, fanout=2, seed=s)
        sub = batch.ui
        x_u, x_i = e_u[sub.blocks[0].src_nodes[USER]], e_i[sub.blocks[0].src_nodes[ITEM]]
        est_w.append(lightgcn_blocks(sub, x_u, x_i, data.deg)[0])
        est_wo.append(lightgcn_blocks(sub, x_u, x_i)[0])
    ref = ref_u[batch.unique_users]
    # z-scores of the Monte Carlo means: unbiased -> all within a few standard errors;
    # without the D/s factor the bias is many standard errors
    def z(est):
        est = torch.stack(est).double()
        stderr = est.std(0) / len(est) ** 0.5
        return ((est.mean(0) - ref).abs() / stderr.clamp_min(1e-6)).max()

    z_w, z_wo = z(est_w), z(est_wo)
    assert z_w < 4.5 and z_wo > 10, (float(z_w), float(z_wo))
