"""The "shares" loss convention of RecGOAT.compute_loss in real gloo worlds: every rank reports the
global-batch loss, and per-rank parameter gradients SUM to the single-process gradient on the
concatenated batch (OAT statistics all-reduced with autograd, W term trained, InfoNCE all-gathered)."""
import pytest
import torch
import torch.distributed.nn.functional as dist_fn

from dist_utils import run_distributed
from goat_dist.config import LossConfig
from ref_blocks import TinyData
from test_recgoat import build

N_TRIPLES = 10


def triples(data):
    g = torch.Generator().manual_seed(7)
    users = torch.randint(0, data.n_users, (N_TRIPLES,), generator=g).tolist()
    pos = [int(data.user_items.indices[data.user_items.indptr[u]]) for u in users]
    neg = torch.randint(0, data.n_items, (N_TRIPLES,), generator=g).tolist()
    return users, pos, neg


def step(rank, world_size, sizes, knn=False, aligned=False):
    data = TinyData(seed=11)
    extra = {"item_knn_id_layers": 1} if knn else {}
    if aligned:   # the FREEDOM protocol: ID item scores, OAT's aligned views in the modality BPR
        extra["score_fused"] = False
    model = build(data, 2, True, "oat", dropout=0.0, seed=0, **extra)
    model.ot_cfg.w_weight = 0.3
    users, pos, neg = triples(data)
    lo = sum(sizes[:rank])
    sl = slice(lo, lo + sizes[rank])
    batch = data.batch(users[sl], pos[sl], neg[sl], id_layers=2, gat_layers=1)
    reduce = dist_fn.all_reduce if world_size > 1 else None
    deg = {**data.deg, **{f"knn_{m}": g.degrees().float() for m, g in data.item_graphs.items()}}
    out = model(batch, data.item_features, data.user_features, degrees=deg, reduce_stats=reduce)
    loss, parts = model.compute_loss(out, batch, LossConfig(l2=0.01, cmcl_weight=0.5, temperature=0.3,
                                                            modality_bpr_weight=0.4 if knn else 0.0,
                                                            modality_bpr_views="aligned" if aligned else "raw"),
                                     rank, world_size)
    loss.backward()
    return {"parts": {k: float(v) for k, v in parts.items()},
            "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}


@pytest.mark.dist
@pytest.mark.parametrize("sizes,knn,aligned", [([6, 4], False, False), ([3, 0, 7], False, False),
                                               ([6, 4], True, False), ([6, 4], True, True)])
def test_distributed_loss_and_summed_gradients_equal_single_process(sizes, knn, aligned):
    """``knn``: with the item-item ID propagation and the per-modality BPR term on; ``aligned``:
    besides, ``score_fused: false`` and the modality BPR over OAT's aligned views."""
    single = step(0, 1, [N_TRIPLES], knn, aligned)
    if knn:
        assert single["parts"]["mod_bpr"] > 0
    if aligned:
        assert single["grads"]["fusion.delta"].abs().sum() > 0
    results = run_distributed(step, len(sizes), sizes, knn, aligned)
    for res in results:
        for k, v in single["parts"].items():
            assert res["parts"][k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    for name, g in single["grads"].items():
        summed = sum(res["grads"][name] if name in res["grads"] else torch.zeros_like(g) for res in results)
        torch.testing.assert_close(summed, g, rtol=1e-4, atol=1e-6, msg=name)
