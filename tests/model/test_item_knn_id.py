"""Item-item propagation of the ID embeddings (``model.item_knn_id_layers``, FREEDOM-style) and the
per-modality BPR term (``loss.modality_bpr_weight``): the sampled mini-batch path against a dense
reference, forward and backward, and against full-graph inference."""
import pytest
import torch
import torch.nn.functional as F

from goat_dist.config import LossConfig, ModelConfig
from goat_dist.losses import bpr_loss
from goat_dist.model.lightgcn import full_graph_knn_propagate
from goat_dist.model.recgoat import item_item_hops, knn_id_modalities
from ref_blocks import TinyData
from test_lightgcn import sparse_lightgcn
from test_recgoat import build
from test_with_sampler import sampled_batch


def knn_degrees(data):
    return {**data.deg, **{f"knn_{m}": g.degrees().float() for m, g in data.item_graphs.items()}}


def dense_knn(data, e_i, layers, mods, combine="last"):
    """mean_m (D^-1/2 A_m D^-1/2)^L e (``combine="mean"``: mean_m 1/L sum_{l=1..L} S_m^l e) with dense
    binary adjacency matrices, float64."""
    outs = []
    for m in mods:
        g = data.item_graphs[m]
        a = torch.zeros(data.n_items, data.n_items, dtype=torch.float64)
        rows = torch.repeat_interleave(torch.arange(data.n_items), g.degrees())
        a[rows, g.indices.long()] = 1.0
        d = a.sum(1).rsqrt()
        s = d[:, None] * a * d[None, :]
        h, hops = e_i.double(), []
        for _ in range(layers):
            h = s @ h
            hops.append(h)
        outs.append(torch.stack(hops).mean(0) if combine == "mean" and hops else h)
    return torch.stack(outs).mean(0)


@pytest.mark.parametrize("knn_layers,gat_layers,knn_mods,per_modality_hops,combine",
                         [(1, 1, None, False, "last"), (2, 1, None, False, "last"), (3, 1, None, False, "last"),
                          (1, 0, None, False, "last"), (2, 1, ["text"], False, "last"),
                          (3, 1, ["text"], True, "last"), (2, 0, ["image"], True, "last"),
                          (1, 1, None, False, "mean"), (3, 1, None, False, "mean"), (3, 1, ["text"], True, "mean"),
                          (2, 3, ["image"], True, "mean")])
def test_sampled_knn_id_propagation_equals_dense_reference_forward_and_backward(knn_layers, gat_layers, knn_mods,
                                                                                per_modality_hops, combine):
    """``per_modality_hops``: each kNN graph sampled only as deep as its consumers read
    (``item_item_hops``, as the trainer samples), instead of the deepest count for all of them.
    ``combine``: the last hop or the mean of hops 1..L (``model.item_knn_id_combine``)."""
    data = TinyData(seed=21)
    model = build(data, 2, False, "oat", id_layers=2, gat_layers=gat_layers, dropout=0.0,
                  item_knn_id_layers=knn_layers, item_knn_id_weight=0.7, item_knn_id_modalities=knn_mods or [],
                  item_knn_id_combine=combine)
    assert model.knn_modalities == (knn_mods or model.modalities) and len(model.modalities) == 2
    torch.manual_seed(3)
    with torch.no_grad():   # fresh random tables (not the init's scale)
        for t in ("user", "item"):
            model.id_emb.collection.embeddings[t].weight.normal_()
    hops = item_item_hops(model.cfg, model.modalities) if per_modality_hops else None
    if per_modality_hops:   # the other modality is sampled shallower than the propagation's
        assert hops == {m: (max(knn_layers, gat_layers) if m in knn_mods else gat_layers) for m in model.modalities}
    batch = sampled_batch(data, [0, 3, 3, 9, 17], [1, 2, 5, 4, 8], [7, 7, 0, 11, 19], id_layers=2,
                          gat_layers=max(knn_layers, gat_layers), item_hops=hops)
    degrees = knn_degrees(data)
    if per_modality_hops:   # only the propagation's modalities need their kNN degrees
        degrees = {k: v for k, v in degrees.items() if not k.startswith("knn_") or k[4:] in knn_mods}
    out = model(batch, data.item_features, degrees=degrees)

    e_u = model.id_emb.collection.embeddings["user"].weight.detach().clone().double().requires_grad_(True)
    e_i = model.id_emb.collection.embeddings["item"].weight.detach().clone().double().requires_grad_(True)
    _, lgcn_i = sparse_lightgcn(data, e_u, e_i, 2)
    ref = lgcn_i + 0.7 * dense_knn(data, e_i, knn_layers, knn_mods or model.modalities, combine)
    ref = ref[batch.unique_items]
    torch.testing.assert_close(out["item_id"].double(), ref, rtol=1e-5, atol=1e-5)
    assert (out["item_id"] - out["item_views"]["id"]).abs().max() == 0

    r = torch.randn(ref.shape, dtype=torch.float64)
    (out["item_id"].double() * r).sum().backward()
    (ref * r).sum().backward()
    for t, ref_g in (("item", e_i.grad), ("user", e_u.grad)):
        g = model.id_emb.collection.embeddings[t].weight.grad
        g = torch.zeros_like(ref_g) if g is None else g.to_dense().double()
        torch.testing.assert_close(g, ref_g, rtol=1e-5, atol=1e-5, msg=t)
    assert e_i.grad.abs().sum() > 0


def test_full_graph_knn_propagation_equals_dense_and_ignores_chunking():
    data = TinyData(seed=4, n_items=37)
    e = torch.randn(data.n_items, 5)
    lookup = lambda t, ids: e[ids]  # noqa: E731
    for layers, combine in ((2, "last"), (1, "mean"), (3, "mean")):
        ref = dense_knn(data, e, layers, ["image"], combine)
        for cs in (4, 11, 1000):
            got = full_graph_knn_propagate(data.item_graphs["image"], lookup, layers, 5, chunk_size=cs,
                                           combine=combine)
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    assert (dense_knn(data, e, 3, ["image"], "mean") - dense_knn(data, e, 3, ["image"])).abs().max() > 1e-3
    torch.testing.assert_close(full_graph_knn_propagate(data.item_graphs["image"], lookup, 0, 5), e)
    with pytest.raises(ValueError, match="combine must be one of last, mean, got 'sum'"):
        full_graph_knn_propagate(data.item_graphs["image"], lookup, 2, 5, combine="sum")


@pytest.mark.parametrize("fusion,knn_mods,combine", [("oat", [], "last"), ("sum", [], "last"),
                                                     ("oat", ["image"], "last"), ("oat", ["image"], "mean")])
def test_full_graph_inference_with_knn_id_equals_eval_minibatch(fusion, knn_mods, combine):
    data = TinyData(seed=6)
    model = build(data, 2, False, fusion, id_layers=2, gat_layers=1, item_knn_id_layers=2,
                  item_knn_id_modalities=knn_mods, item_knn_id_combine=combine)
    deg = knn_degrees(data)
    model(sampled_batch(data, [1, 2], [3, 4], [5, 6], 2, 2), data.item_features, degrees=deg)  # EMA update
    users, items = model.compute_all_representations(data.user_items, data.item_users, data.item_features,
                                                     None, data.item_graphs, chunk_size=6)
    model.eval()
    batch = sampled_batch(data, [0, 5, 5, 9], [1, 2, 3, 4], [7, 7, 0, 11], 2, 2)
    with torch.no_grad():
        out = model(batch, data.item_features, degrees=deg)
    torch.testing.assert_close(out["user"], users[batch.unique_users], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["item"], items[batch.unique_items], rtol=1e-5, atol=1e-5)


def test_sampled_knn_id_propagation_is_unbiased_at_small_fanout():
    """Fanout 2 < kNN degree: the D_v / s_v rescaling makes one layer an unbiased estimate."""
    data = TinyData(seed=13, knn=4)
    model = build(data, 1, False, "sum", id_layers=0, gat_layers=0, item_knn_id_layers=1)
    deg = knn_degrees(data)
    e_i = model.id_emb.collection.embeddings["item"].weight.detach()
    ref = dense_knn(data, e_i, 1, ["image"]).float() + e_i
    items = list(range(data.n_items))
    ests = []
    with torch.no_grad():
        for s in range(300):
            b = sampled_batch(data, [0] * data.n_items, items, items, 0, 1, fanout=2, seed=s)
            ests.append(model(b, data.item_features, degrees=deg)["item_id"][torch.argsort(b.unique_items)])
    est = torch.stack(ests)
    z = (est.mean(0) - ref) / (est.std(0) / len(ests) ** 0.5).clamp_min(1e-6)
    assert int(deg["knn_image"].max()) > 3 and float(est.std(0).max()) > 0
    assert float(z.abs().max()) < 5.0, float(z.abs().max())


def test_modality_bpr_term_value_and_weighting():
    data = TinyData(seed=2)
    model = build(data, 2, False, "oat", dropout=0.0)
    batch = sampled_batch(data, [0, 3, 9], [1, 2, 4], [7, 0, 11], 2, 1)
    out = model(batch, data.item_features)
    cfg = LossConfig(l2=1e-3, cmcl_weight=0.0, modality_bpr_weight=0.25)
    total, parts = model.compute_loss(out, batch, cfg)
    u = out["user_id"][batch.user_index]
    want = sum(float(bpr_loss(u, out["item_views"][m][batch.pos_index], out["item_views"][m][batch.neg_index],
                              denom=3.0)) for m in ("image", "text"))
    manual = float(-F.logsigmoid((u * out["item_views"]["image"][batch.pos_index]).sum(1)
                                 - (u * out["item_views"]["image"][batch.neg_index]).sum(1)).mean())
    assert float(bpr_loss(u, out["item_views"]["image"][batch.pos_index],
                          out["item_views"]["image"][batch.neg_index], denom=3.0)) == pytest.approx(manual, rel=1e-5)
    assert float(parts["mod_bpr"]) == pytest.approx(want, rel=1e-5)
    assert float(total) == pytest.approx(float(parts["bpr"]) + 1e-3 * float(parts["l2"]) + 0.25 * want, rel=1e-5)
    total.backward()
    assert model.item_encoders["image"].proj.weight.grad.abs().sum() > 0
    _, parts_off = model.compute_loss(out, batch, LossConfig(l2=1e-3, cmcl_weight=0.0))
    assert "mod_bpr" not in parts_off


def test_knn_id_bad_configuration_errors():
    data = TinyData(seed=1)
    with pytest.raises(ValueError, match="needs use_item_modalities"):
        build(data, 0, False, "none", item_knn_id_layers=1)
    with pytest.raises(ValueError, match=">= 0"):
        build(data, 2, False, "oat", item_knn_id_layers=-1)
    model = build(data, 2, False, "oat", item_knn_id_layers=2)
    with pytest.raises(ValueError, match=r"degrees\['knn_image'\]"):
        model(sampled_batch(data, [1], [2], [3], 2, 2), data.item_features, degrees=data.deg)
    with pytest.raises(ValueError, match="2 hops need as many"):
        model(sampled_batch(data, [1], [2], [3], 2, 1), data.item_features, degrees=knn_degrees(data))
    with pytest.raises(ValueError, match="lack the kNN graphs"):
        model.compute_all_representations(data.user_items, data.item_users, data.item_features, None, {})
    with pytest.raises(ValueError, match=r"item_knn_id_modalities \['audio'\] are not among the used"):
        build(data, 2, False, "oat", item_knn_id_layers=1, item_knn_id_modalities=["image", "audio"])


def test_item_item_hops_per_modality():
    """Each kNN graph is sampled as deep as its consumers read: its GAT view (``gat_layers``) and,
    for the propagation's modalities only, ``item_knn_id_layers``."""
    mc = ModelConfig(gat_layers=1, item_knn_id_layers=3, item_knn_id_modalities=["image"])
    assert knn_id_modalities(mc, ["audio", "image"]) == ["image"]
    assert item_item_hops(mc, ["audio", "image"]) == {"audio": 1, "image": 3}
    mc = ModelConfig(gat_layers=2, item_knn_id_layers=1)   # all modalities propagate; the GATs are deeper
    assert item_item_hops(mc, ["audio", "image"]) == {"audio": 2, "image": 2}
    mc = ModelConfig(gat_layers=0, item_knn_id_layers=0, item_knn_id_modalities=["image"])   # propagation off
    assert knn_id_modalities(mc, ["image"]) == [] and item_item_hops(mc, ["image", "text"]) == {"image": 0, "text": 0}
    with pytest.raises(ValueError, match=r"item_knn_id_modalities \['text'\] are not among"):
        item_item_hops(ModelConfig(item_knn_id_layers=1, item_knn_id_modalities=["text"]), ["image"])


def full_graph_and_eval_batch(model, data):
    """One training forward (so OAT has EMA statistics), then the full-graph representations and the
    eval-mode mini-batch output of a fixed batch: ``(users, items, batch, out)``."""
    deg = knn_degrees(data)
    model(sampled_batch(data, [1, 2], [3, 4], [5, 6], 2, 1), data.item_features, degrees=deg)  # EMA update
    users, items = model.compute_all_representations(data.user_items, data.item_users, data.item_features,
                                                     None, data.item_graphs, chunk_size=5)
    model.eval()
    batch = sampled_batch(data, [0, 5, 9], [1, 2, 4], [7, 0, 11], 2, 1)
    with torch.no_grad():
        out = model(batch, data.item_features, degrees=deg)
    return users, items, batch, out


def test_score_fused_off_scores_with_the_id_item_in_both_paths():
    """``model.score_fused: false``: the mini-batch scoring item is the ID item (LightGCN + kNN term),
    full-graph inference returns the same rows, and no cold-start export is offered."""
    from goat_dist.checkpoint.export import cold_start_params

    data = TinyData(seed=8)
    model = build(data, 2, False, "oat", id_layers=2, gat_layers=1, item_knn_id_layers=1, score_fused=False)
    users, items, batch, out = full_graph_and_eval_batch(model, data)
    assert out["item"] is out["item_id"]
    assert (out["fusion"].fused - out["item_id"]).abs().max() > 1e-4   # the fusion itself did change it
    torch.testing.assert_close(out["item"], items[batch.unique_items], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["user"], users[batch.unique_users], rtol=1e-5, atol=1e-5)
    assert cold_start_params(model) is None


def test_modality_bpr_over_aligned_views_value_gradient_and_errors():
    data = TinyData(seed=5)
    model = build(data, 2, False, "oat", dropout=0.0, score_fused=False)
    batch = sampled_batch(data, [0, 3, 9, 4], [1, 2, 4, 6], [7, 0, 11, 3], 2, 1)
    out = model(batch, data.item_features)
    fo = out["fusion"]
    # reference: the transported views recomputed by hand from the encoders' outputs and the plan
    u = out["user_id"][batch.user_index]
    want = 0.0
    for k, m in enumerate(model.modalities):
        a = out["item_views"][m] @ (fo.plan[k] + model.fusion.delta[k])
        want += float(-F.logsigmoid((u * a[batch.pos_index]).sum(1) - (u * a[batch.neg_index]).sum(1)).mean())
    cfg = LossConfig(l2=1e-3, cmcl_weight=0.0, modality_bpr_weight=0.5, modality_bpr_views="aligned")
    total, parts = model.compute_loss(out, batch, cfg)
    assert float(parts["mod_bpr"]) == pytest.approx(want, rel=1e-5)
    raw = model.compute_loss(out, batch, LossConfig(l2=1e-3, cmcl_weight=0.0, modality_bpr_weight=0.5))[1]
    assert float(raw["mod_bpr"]) != pytest.approx(want, rel=1e-3)    # the two choices differ
    total.backward()
    assert model.fusion.delta.grad.abs().sum() > 0
    assert model.item_encoders["text"].proj.weight.grad.abs().sum() > 0
    assert model.fusion.logits.grad is None or model.fusion.logits.grad.abs().sum() == 0  # not in any score

    with pytest.raises(ValueError, match="one of raw, aligned, got 'fused'"):
        model.compute_loss(out, batch, LossConfig(modality_bpr_weight=0.5, modality_bpr_views="fused"))
    summed = build(data, 2, False, "sum", dropout=0.0)
    out_s = summed(batch, data.item_features)
    with pytest.raises(ValueError, match="needs model.fusion 'oat'"):
        summed.compute_loss(out_s, batch, cfg)


@pytest.mark.parametrize("fusion", ["oat", "sum"])
def test_score_view_weight_adds_the_views_to_the_scoring_item(fusion):
    """``model.score_view_weight: w`` (with ``score_fused: false``): full-graph inference scores with
    ``id_i + w * sum_m view_m(i)``, the views being OAT's aligned ones (fusion oat, plan from the EMA)
    or the encoders' raw outputs — against the eval-mode mini-batch forward's own views; users and
    the training item are unchanged."""
    data = TinyData(seed=9)
    model = build(data, 2, False, fusion, id_layers=2, gat_layers=1, item_knn_id_layers=1, score_fused=False,
                  dropout=0.0, score_view_weight=0.3)
    users, items, batch, out = full_graph_and_eval_batch(model, data)
    views = out["item_aligned"] if fusion == "oat" else {m: out["item_views"][m] for m in model.modalities}
    assert len(views) == 2
    want = out["item_id"] + 0.3 * sum(views.values())
    assert (want - out["item_id"]).abs().max() > 1e-3          # the views do move the scoring item
    torch.testing.assert_close(items[batch.unique_items], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(users[batch.unique_users], out["user"], rtol=1e-5, atol=1e-5)
    assert out["item"] is out["item_id"]                         # training still ranks with the ID item


def test_score_view_weight_errors():
    data = TinyData(seed=9)
    with pytest.raises(ValueError, match="score_view_weight must be >= 0, got -0.1"):
        build(data, 2, False, "oat", score_fused=False, score_view_weight=-0.1)
    with pytest.raises(ValueError, match=r"needs model.score_fused false.*score_fused True"):
        build(data, 2, False, "oat", score_view_weight=0.1)
    with pytest.raises(ValueError, match=r"at least one item modality.*modalities none"):
        build(data, 0, False, "none", score_fused=False, score_view_weight=0.1)
