"""Full-ranking top-K metrics with training-item masking.

For a user u with held-out set H_u (|H_u| >= 1) and the top-K list R_u of items ranked by score
over ALL items except u's training items (and any other excluded set):

    Recall@K    = |R_u ∩ H_u| / |H_u|
    Precision@K = |R_u ∩ H_u| / K
    HitRate@K   = 1[|R_u ∩ H_u| > 0]
    NDCG@K      = sum_{r < K, R_u[r] in H_u} 1 / log2(r + 2)  /  sum_{j < min(K, |H_u|)} 1 / log2(j + 2)

Each metric is averaged over users with at least one held-out item (the protocol of LightGCN/MMRec
and of the published numbers for the datasets in ``../shared/data``). Users are scored in batches
and only per-batch [b, n_items] score matrices ever exist. ``metric_sums`` returns sums and the
user count so that a distributed caller can all-reduce them before ``finalize``.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from goat_dist.graph.csr import CSR

METRICS = ("recall", "ndcg", "precision", "hitrate")


def csr_rows_coo(csr: CSR, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Edges of the given rows as (local row position, column) pairs, vectorised.

    **Shapes:** ``rows`` [b] -> (pos [E_b], cols [E_b]) where ``pos`` indexes ``rows``."""
    rows = rows.to(torch.int64)
    start = csr.indptr[rows]
    deg = csr.indptr[rows + 1] - start
    pos = torch.repeat_interleave(torch.arange(rows.numel()), deg)
    offsets = torch.arange(int(deg.sum())) - torch.repeat_interleave(torch.cumsum(deg, 0) - deg, deg)
    cols = csr.indices[start[pos] + offsets].to(torch.int64)
    return pos, cols


def metric_sums(score_fn: Callable[[torch.Tensor], torch.Tensor], users: torch.Tensor, heldout: CSR,
                exclude: Iterable[CSR], ks: list[int], batch_size: int = 1024,
                progress_fn: Callable | None = None) -> dict[str, float]:
    """Sums of every metric@k over ``users`` that have >= 1 held-out item, plus ``"n_users"``.

    ``score_fn(user_ids [b]) -> scores [b, n_items]``; ``exclude`` are CSRs (rows = users) whose
    items are masked out of the ranking (the training split; at test time NOT the valid split, as in
    the published protocol). **Shapes:** ``users`` [U] global ids."""
    users = users.to(torch.int64)
    has_heldout = heldout.degrees()[users] > 0
    users = users[has_heldout]
    k_max = max(ks)
    sums = {f"{m}@{k}": 0.0 for m in METRICS for k in ks}
    sums["n_users"] = float(users.numel())
    discounts = 1.0 / torch.log2(torch.arange(2, k_max + 2, dtype=torch.float64))
    batches = range(0, users.numel(), batch_size)
    for start in (progress_fn(batches) if progress_fn else batches):
        ub = users[start:start + batch_size]
        scores = score_fn(ub).float()
        for csr in exclude:
            pos, cols = csr_rows_coo(csr, ub)
            scores[pos, cols] = -torch.inf
        topk = torch.topk(scores, k_max, dim=1).indices
        truth = torch.zeros_like(scores, dtype=torch.bool)
        pos, cols = csr_rows_coo(heldout, ub)
        truth[pos, cols] = True
        n_true = heldout.degrees()[ub].to(torch.float64)
        hits = torch.gather(truth, 1, topk).to(torch.float64)  # [b, k_max]
        cum_hits = torch.cumsum(hits, 1)
        dcg = torch.cumsum(hits * discounts, 1)
        idcg_table = torch.cumsum(discounts, 0)
        for k in ks:
            h = cum_hits[:, k - 1]
            idcg = idcg_table[(torch.clamp(n_true, max=k) - 1).long()]
            sums[f"recall@{k}"] += float((h / n_true).sum())
            sums[f"precision@{k}"] += float((h / k).sum())
            sums[f"hitrate@{k}"] += float((h > 0).sum())
            sums[f"ndcg@{k}"] += float((dcg[:, k - 1] / idcg).sum())
    return sums


def finalize(sums: dict[str, float]) -> dict[str, float]:
    """Averages from ``metric_sums`` output (possibly all-reduced across ranks)."""
    n = sums["n_users"]
    out = {k: (v / n if n else 0.0) for k, v in sums.items() if k != "n_users"}
    out["n_users"] = int(n)
    return out


def rank_metrics(user_reps: torch.Tensor, item_reps: torch.Tensor, heldout: CSR, exclude: Iterable[CSR],
                 ks: list[int], users: torch.Tensor | None = None, batch_size: int = 1024) -> dict[str, float]:
    """Dot-product scoring ``user_reps @ item_reps.T`` and the averaged metrics (single process).

    **Shapes:** ``user_reps`` [n_users, d], ``item_reps`` [n_items, d]."""
    if users is None:
        users = torch.arange(user_reps.shape[0])
    item_t = item_reps.t().contiguous()
    return finalize(metric_sums(lambda ub: user_reps[ub] @ item_t, users, heldout, list(exclude), ks, batch_size))
