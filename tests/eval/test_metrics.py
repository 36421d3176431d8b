"""Full-ranking metrics against a brute-force per-user Python reference on random scores."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from goat_dist.eval.metrics import finalize, metric_sums, rank_metrics
from goat_dist.graph.csr import CSR


def brute_force(scores: np.ndarray, train: list[set], held: list[set], ks):
    out = {f"{m}@{k}": [] for m in ("recall", "ndcg", "precision", "hitrate") for k in ks}
    for u in range(scores.shape[0]):
        if not held[u]:
            continue
        ranked = [i for i in sorted(range(scores.shape[1]), key=lambda i: -scores[u, i]) if i not in train[u]]
        for k in ks:
            top = ranked[:k]
            hits = [1 if i in held[u] else 0 for i in top]
            out[f"recall@{k}"].append(sum(hits) / len(held[u]))
            out[f"precision@{k}"].append(sum(hits) / k)
            out[f"hitrate@{k}"].append(1.0 if sum(hits) else 0.0)
            dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
            idcg = sum(1 / math.log2(j + 2) for j in range(min(k, len(held[u]))))
            out[f"ndcg@{k}"].append(dcg / idcg)
    return {k: float(np.mean(v)) for k, v in out.items()}


def sets_to_csr(sets, n_cols):
    rows = [u for u, s in enumerate(sets) for _ in s]
    cols = [i for s in sets for i in sorted(s)]
    return CSR.from_edges(torch.tensor(rows, dtype=torch.int64), torch.tensor(cols, dtype=torch.int64),
                          len(sets), n_cols)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_brute_force(seed):
    rng = random.Random(seed)
    n_users, n_items, ks = 37, 60, [1, 5, 10, 20]
    train = [set(rng.sample(range(n_items), rng.randint(0, 15))) for _ in range(n_users)]
    held = [set(rng.sample([i for i in range(n_items) if i not in train[u]], rng.randint(0, 6)))
            for u in range(n_users)]
    # continuous random scores: no ties, so the ranking is unique
    user_reps = torch.randn(n_users, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    item_reps = torch.randn(n_items, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 100))
    scores = (user_reps @ item_reps.T).numpy()
    expected = brute_force(scores, train, held, ks)
    got = rank_metrics(user_reps, item_reps, sets_to_csr(held, n_items), [sets_to_csr(train, n_items)], ks,
                       batch_size=5)
    assert got["n_users"] == sum(1 for h in held if h)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_masking_changes_the_result():
    """A user whose best-scored items are training items: masking must push them out of the top-K."""
    item_reps = torch.eye(4)
    user_reps = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    held = sets_to_csr([{2}], 4)
    masked = rank_metrics(user_reps, item_reps, held, [sets_to_csr([{0, 1}], 4)], [1])
    unmasked = rank_metrics(user_reps, item_reps, held, [], [1])
    assert masked["recall@1"] == 1.0 and unmasked["recall@1"] == 0.0


def test_sums_add_across_user_shards():
    """Per-shard sums (as ranks would all-reduce them) equal the single-pass metrics."""
    g = torch.Generator().manual_seed(3)
    user_reps, item_reps = torch.randn(20, 4, generator=g), torch.randn(30, 4, generator=g)
    held = sets_to_csr([{u % 30, (7 * u) % 30} for u in range(20)], 30)
    score = lambda ub: user_reps[ub] @ item_reps.T  # noqa: E731
    whole = finalize(metric_sums(score, torch.arange(20), held, [], [5, 10]))
    a = metric_sums(score, torch.arange(0, 20, 2), held, [], [5, 10])
    b = metric_sums(score, torch.arange(1, 20, 2), held, [], [5, 10])
    merged = finalize({k: a[k] + b[k] for k in a})
    for k in whole:
        assert merged[k] == pytest.approx(whole[k], abs=1e-12)
