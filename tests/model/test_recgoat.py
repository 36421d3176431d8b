import itertools

import pytest
import torch

from goat_dist.config import LossConfig, ModelConfig, OTConfig
from goat_dist.model import RecGOAT, materialize_
from ref_blocks import TinyData
from ref_infonce import reference


def build(data: TinyData, n_mod=2, user_branch=True, fusion="oat", id_layers=2, gat_layers=1, device="meta",
          seed=0, **cfg):
    mods = ["image", "text"][:n_mod]
    mc = ModelConfig(dim=8, id_layers=id_layers, gat_layers=gat_layers, modalities=mods,
                     use_item_modalities=n_mod > 0, use_user_branch=user_branch, fusion=fusion, **cfg)
    model = RecGOAT(mc, OTConfig(eps=0.05, max_iter=100), data.n_users, data.n_items,
                    {m: data.item_features[m].shape[1] for m in data.item_features},
                    data.user_features.shape[1] if user_branch else None, device=device)
    if device == "meta":
        materialize_(model, "cpu", seed)
    return model


def batch_for(data, model, size=10, seed=0):
    return data.random_batch(size, seed, id_layers=model.cfg.id_layers, gat_layers=model.cfg.gat_layers,
                             modalities=model.modalities, user_branch=model.use_user_branch)


def test_builds_on_meta_without_memory_and_materialises_deterministically():
    data = TinyData()
    cfg = ModelConfig(dim=8, modalities=["image", "text"])
    model = RecGOAT(cfg, OTConfig(), 10**9, 10**9, {"image": 10, "text": 7}, 6, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(b.device.type == "meta" for b in model.buffers())
    a, b = build(data, seed=3), build(data, seed=3)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    emb = a.id_emb.collection.embeddings["user"].weight
    assert 0.08 < float(emb.std()) < 0.12


@pytest.mark.parametrize("n_mod,user_branch", [(0, False), (1, True), (2, False), (2, True)])
def test_forward_backward_every_fusion(n_mod, user_branch):
    data = TinyData(seed=1)
    for fusion in ("oat", "concat", "sum", "none"):
        model = build(data, n_mod, user_branch, fusion)
        batch = batch_for(data, model)
        out = model(batch, data.item_features, data.user_features)
        U, I = batch.unique_users.numel(), batch.unique_items.numel()
        assert out["user"].shape == (U, 8) and out["item"].shape == (I, 8)
        assert set(out["item_views"]) == {"id", *model.modalities}
        assert out["item_emb0"].shape == (I, 8) and out["user_emb0"].shape == (U, 8)
        assert (out["W"] is not None) == (fusion == "oat" and n_mod > 0)
        loss, parts = model.compute_loss(out, batch, LossConfig(l2=1e-3, cmcl_weight=0.1))
        assert torch.isfinite(loss) and set(parts) == {"bpr", "l2", "cmcl", "w", "loss"}
        assert float(parts["cmcl"]) > 0
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), (fusion, name)
        emb_grad = model.id_emb.collection.embeddings["item"].weight.grad
        assert emb_grad[batch.unique_items].abs().sum() > 0


def test_loss_parts_combine_with_weights():
    data = TinyData(seed=2)
    model = build(data)
    model.ot_cfg.w_weight = 0.5
    batch = batch_for(data, model)
    out = model(batch, data.item_features, data.user_features)
    cfg = LossConfig(l2=0.01, cmcl_weight=0.2)
    loss, p = model.compute_loss(out, batch, cfg)
    p = {k: float(v) for k, v in p.items()}
    assert p["w"] > 0
    assert loss.item() == pytest.approx(p["bpr"] + 0.01 * p["l2"] + 0.2 * p["cmcl"] + 0.5 * p["w"], rel=1e-5)
    # BPR on (user repr, fused items): by hand
    u, i = out["user"][batch.user_index], out["item"]
    bpr = -torch.nn.functional.logsigmoid((u * i[batch.pos_index]).sum(1) - (u * i[batch.neg_index]).sum(1)).mean()
    assert p["bpr"] == pytest.approx(bpr.item(), rel=1e-5)


def test_out_of_range_ids_are_rejected():
    data = TinyData()
    model = build(data, 0, False, "none")
    with pytest.raises(IndexError, match="item ids must lie in"):
        model.id_emb(torch.tensor([0]), torch.tensor([data.n_items]))
    with pytest.raises(IndexError, match="user ids"):
        model.id_emb(torch.tensor([-1]), torch.tensor([0]))


@pytest.mark.parametrize("fusion,user_branch", [("oat", True), ("concat", False), ("none", False)])
def test_full_graph_inference_equals_eval_minibatch(fusion, user_branch):
    """compute_all_representations (chunked CSR propagation) == eval-mode forward on fanout -1 blocks,
    with the OAT plan of the training EMA in both."""
    data = TinyData(seed=5)
    model = build(data, 2, user_branch, fusion, gat_layers=2)
    model.train()
    model(batch_for(data, model, seed=1), data.item_features, data.user_features)   # one EMA update
    users, items = model.compute_all_representations(
        data.user_items, data.item_users, data.item_features, data.user_features, data.item_graphs,
        data.user_graph, chunk_size=7)
    assert model.training
    model.eval()
    batch = batch_for(data, model, seed=2)
    with torch.no_grad():
        out = model(batch, data.item_features, data.user_features)
    torch.testing.assert_close(out["user"], users[batch.unique_users], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["item"], items[batch.unique_items], rtol=1e-5, atol=1e-5)


def auc(users, items, data):
    """P(score of an unseen same-cluster item > score of an other-cluster item), over users."""
    s = users @ items.t()
    same = data.user_cluster.unsqueeze(1) == data.item_cluster.unsqueeze(0)
    seen = torch.zeros_like(same)
    for u in range(data.n_users):
        seen[u, data.user_items.indices[data.user_items.indptr[u]:data.user_items.indptr[u + 1]].long()] = True
    pos = s.masked_fill(~(same & ~seen), float("nan"))
    neg = s.masked_fill(same, float("nan"))
    wins = (pos.unsqueeze(2) > neg.unsqueeze(1)).float()
    valid = (~torch.isnan(pos)).unsqueeze(2) & (~torch.isnan(neg)).unsqueeze(1)
    return float((wins * valid).sum() / valid.sum())


def test_training_on_planted_problem_reduces_loss_and_learns_clusters():
    data = TinyData.planted()
    model = build(data, 2, True, "oat", id_layers=2, gat_layers=1, seed=0, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    cfg = LossConfig(l2=1e-4, cmcl_weight=0.1, temperature=0.2)
    users0, items0 = model.compute_all_representations(data.user_items, data.item_users, data.item_features,
                                                       data.user_features, data.item_graphs, data.user_graph)
    history = []
    g = torch.Generator().manual_seed(0)
    for step in range(50):
        u = torch.randint(0, data.n_users, (32,), generator=g)
        pos = torch.tensor([int(data.user_items.indices[torch.randint(int(data.user_items.indptr[x]),
                                                                      int(data.user_items.indptr[x + 1]), (1,),
                                                                      generator=g)]) for x in u])
        neg = torch.randint(0, data.n_items, (32,), generator=g)
        batch = data.batch(u.tolist(), pos.tolist(), neg.tolist(), id_layers=2, gat_layers=1)
        out = model(batch, data.item_features, data.user_features, degrees=data.deg)
        loss, parts = model.compute_loss(out, batch, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({k: float(v) for k, v in parts.items()})
    first = sum(h["loss"] for h in history[:5]) / 5
    last = sum(h["loss"] for h in history[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert sum(h["cmcl"] for h in history[-5:]) < sum(h["cmcl"] for h in history[:5])
    users, items = model.compute_all_representations(data.user_items, data.item_users, data.item_features,
                                                     data.user_features, data.item_graphs, data.user_graph)
    assert auc(users, items, data) > max(0.9, auc(users0, items0, data))


@pytest.mark.parametrize("gat_layers", [0, 1, 2])
def test_user_ids_runs_the_user_branch_on_their_neighbourhood_only(gat_layers, monkeypatch):
    """compute_all_representations(user_ids=ids) == the full call's rows ids (any order), and the user
    GAT never sees the whole user set (its k-hop neighbourhood of ids only)."""
    data = TinyData(seed=6)
    model = build(data, 2, True, "oat", gat_layers=gat_layers)
    model.train()
    model(batch_for(data, model, seed=3), data.item_features, data.user_features)
    args = (data.user_items, data.item_users, data.item_features, data.user_features, data.item_graphs,
            data.user_graph)
    full_u, full_i = model.compute_all_representations(*args, chunk_size=5)
    seen = []
    real = model.user_encoder.full_graph

    def spy(graph, features, n_nodes, *a, **kw):
        seen.append(n_nodes)
        return real(graph, features, n_nodes, *a, **kw)

    monkeypatch.setattr(model.user_encoder, "full_graph", spy)
    ids = torch.randperm(data.n_users, generator=torch.Generator().manual_seed(0))[:3]
    sub_u, sub_i = model.compute_all_representations(*args, chunk_size=5, user_ids=ids)
    assert seen and max(seen) < data.n_users
    torch.testing.assert_close(sub_u, full_u[ids], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sub_i, full_i, rtol=0, atol=0)
    # the streamed LightGCN pass (no [n_users, d] buffer): the same representations up to rounding
    st_u, st_i = model.compute_all_representations(*args, chunk_size=5, user_ids=ids, stream_users=True)
    torch.testing.assert_close(st_u, full_u[ids], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st_i, full_i, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("terms", [["user_item"], ["item_views"], ["user_views"], ["user_item", "user_views"],
                                   ["user_item", "item_views", "user_views"]])
def test_cmcl_terms_select_the_infonce_terms_averaged(terms):
    data = TinyData(seed=4)
    model = build(data, 2, True, "oat")
    batch = batch_for(data, model, seed=3)
    out = model(batch, data.item_features, data.user_features)
    cfg = LossConfig(l2=0.0, cmcl_weight=1.0, temperature=0.3, infonce_symmetric=False, cmcl_terms=terms)
    _, parts = model.compute_loss(out, batch, cfg)
    pos = batch.pos_index
    expected = []
    if "user_item" in terms:
        expected.append(reference(out["user"][batch.user_index], out["item"][pos], 0.3, ids_b=batch.pos_items,
                                  symmetric=False))
    if "item_views" in terms:
        v = out["item_views"]
        expected += [reference(v[a][pos], v[b][pos], 0.3, ids_b=batch.pos_items, symmetric=False)
                     for a, b in itertools.combinations(["id", "image", "text"], 2)]
    if "user_views" in terms:
        uv = out["user_views"]
        expected.append(reference(uv["id"][batch.user_index], uv["pref"][batch.user_index], 0.3, ids_b=batch.users,
                                  symmetric=False))
    assert float(parts["cmcl"]) == pytest.approx(float(torch.stack(expected).mean()), rel=1e-5)


def test_cmcl_terms_that_leave_nothing_raise():
    data = TinyData(seed=4)
    model = build(data, 2, False, "oat")
    batch = batch_for(data, model)
    out = model(batch, data.item_features, data.user_features)
    with pytest.raises(ValueError, match="loss.cmcl_terms"):
        model.compute_loss(out, batch, LossConfig(cmcl_weight=0.1, cmcl_terms=["user_views"]))
    _, parts = model.compute_loss(out, batch, LossConfig(cmcl_weight=0.0, cmcl_terms=["user_views"]))
    assert float(parts["cmcl"]) == 0.0
