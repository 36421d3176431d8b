"""Blockwise kNN graphs against brute-force dense references on small inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from goat_dist.graph import build_user_item_graph, knn_graph, user_graph_from_interactions, user_knn_from_embeddings
from goat_dist.graph.knn import GROUP, IVFParams, faiss_topk, normalized_rows, resolve_backend, topk_neighbours


def dense_cosine(f: np.ndarray) -> np.ndarray:
    x = f.astype(np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    x = np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)
    return x @ x.T


def reference_topk(score: np.ndarray, k: int, eligible: np.ndarray | None = None) -> list[list[int]]:
    """Per row: the k columns != row with the largest score, ties -> smaller column (sorted ids).
    ``eligible`` [N, N] bool restricts the candidates (fewer than k may remain)."""
    n = score.shape[0]
    ids = np.arange(n)
    out = []
    for i in range(n):
        ok = (ids != i) if eligible is None else (ids != i) & eligible[i]
        cand = ids[ok]
        order = np.lexsort((cand, -score[i, cand]))  # primary: score descending; then id ascending
        out.append(sorted(cand[order[:k]].tolist()))
    return out


def graph_rows(csr) -> list[list[int]]:
    return [csr.indices[csr.indptr[r]:csr.indptr[r + 1]].tolist() for r in range(csr.n_rows)]


def symmetric_with_self_loops(nbrs: list[list[int]]) -> list[list[int]]:
    sets = [set(a) | {i} for i, a in enumerate(nbrs)]
    for i, a in enumerate(nbrs):
        for j in a:
            sets[j].add(i)
    return [sorted(s) for s in sets]


@pytest.mark.parametrize("n,d,k,block", [(500, 16, 4, 11), (500, 16, 4, 4096), (150, 8, 10, 13), (30, 4, 29, 4)])
def test_topk_is_exact(n, d, k, block):
    """Covers the pruned path (n > GROUP * (k + 2)) and the whole-row path, several block sizes."""
    rng = np.random.default_rng(n + k)
    f = rng.standard_normal((n, d)).astype(np.float32)
    x = normalized_rows(f, "cpu", pad_to=GROUP)
    cols, sims = topk_neighbours(x, n, k, block_size=block, show_progress=False)
    s = dense_cosine(f)
    assert [c.tolist() for c in cols] == reference_topk(s, k)
    np.testing.assert_allclose(sims.numpy(), np.take_along_axis(s, cols.numpy(), 1), atol=1e-5)


def test_ties_and_zero_rows_break_by_smallest_index():
    """One-hot features: similarities are exactly 0 or 1, so nearly every choice is a tie."""
    rng = np.random.default_rng(3)
    n, d, k = 500, 6, 5  # n > GROUP * (k + 2): the pruned path, then the full-row tie fallback
    f = np.zeros((n, d), np.float32)
    f[np.arange(n), rng.integers(0, d, n)] = rng.integers(1, 4, n)  # scaled one-hots
    f[::37] = 0  # all-zero rows: cosine 0 with everything
    g = knn_graph(f, k, block_size=97, device="cpu")
    nbrs = reference_topk(dense_cosine(f), k)
    assert graph_rows(g) == symmetric_with_self_loops(nbrs)
    assert torch.isfinite(g.values).all()
    zero_row = 37
    assert nbrs[zero_row] == [j for j in range(k + 1) if j != zero_row][:k]


def test_knn_graph_symmetric_self_loops_and_values():
    rng = np.random.default_rng(5)
    n, k = 200, 6
    f = rng.standard_normal((n, 12)).astype(np.float32)
    g = knn_graph(f, k, block_size=32, device="cpu")
    s = dense_cosine(f)
    assert graph_rows(g) == symmetric_with_self_loops(reference_topk(s, k))
    rows = np.repeat(np.arange(n), g.degrees().numpy())
    cols = g.indices.numpy()
    dense = np.full((n, n), np.nan)
    dense[rows, cols] = g.values.numpy()
    np.testing.assert_array_equal(dense, dense.T)  # same value stored for i->j and j->i
    expect = np.where(rows == cols, 1.0, s[rows, cols])
    np.testing.assert_allclose(g.values.numpy(), expect, atol=1e-5)

    plain = knn_graph(f, k, block_size=32, device="cpu", symmetrize=False, self_loops=False, with_values=False)
    assert plain.values is None and (plain.degrees() == k).all()


def test_block_size_does_not_change_the_graph():
    rng = np.random.default_rng(7)
    f = rng.standard_normal((400, 10)).astype(np.float32)
    small = knn_graph(f, 5, block_size=7, device="cpu")
    large = knn_graph(f, 5, block_size=100000, device="cpu")
    assert torch.equal(small.indptr, large.indptr) and torch.equal(small.indices, large.indices)
    np.testing.assert_allclose(small.values.numpy(), large.values.numpy(), atol=1e-6)
    capped = knn_graph(f, 5, block_size=100000, device="cpu", max_block_bytes=4 * 448 * 9)  # 9 rows a block
    assert torch.equal(capped.indices, large.indices)


def test_float16_memmap_input(tmp_path):
    rng = np.random.default_rng(9)
    f16 = rng.standard_normal((300, 8)).astype(np.float16)
    np.save(tmp_path / "item_image.npy", f16)
    mm = np.load(tmp_path / "item_image.npy", mmap_mode="r")
    g = knn_graph(mm, 4, block_size=50, device="cpu")
    ref = knn_graph(f16.astype(np.float32), 4, block_size=300, device="cpu")
    assert torch.equal(g.indices, ref.indices) and torch.equal(g.indptr, ref.indptr)
    assert user_knn_from_embeddings(mm, 4, block_size=50, device="cpu").indices.equal(g.indices)


def test_rejects_non_finite_features():
    f = np.ones((5, 3), np.float32)
    f[2, 1] = np.nan
    with pytest.raises(ValueError, match="row 2"):
        knn_graph(f, 2, device="cpu")


@pytest.mark.parametrize("pair_budget", [1 << 20, 40, 1])
def test_co_interaction_user_graph_matches_bruteforce(pair_budget):
    """Small integer counts make ties common; pair_budget=1 forces the dense per-user fallback."""
    rng = np.random.default_rng(11)
    n_users, n_items, k = 40, 15, 3
    users = rng.integers(0, n_users - 2, 150)  # the last two users are cold
    items = rng.integers(0, n_items, 150)
    g = build_user_item_graph(n_users, n_items, users, items)
    a = np.zeros((n_users, n_items))
    a[users, items] = 1
    co = a @ a.T  # the dense reference, fine at this size
    nbrs = reference_topk(co, k, eligible=co > 0)
    out = user_graph_from_interactions(g, k, pair_budget=pair_budget)
    assert graph_rows(out) == symmetric_with_self_loops(nbrs)
    rows = np.repeat(np.arange(n_users), out.degrees().numpy())
    np.testing.assert_array_equal(out.values.numpy(), co[rows, out.indices.numpy()])
    assert graph_rows(out)[-1] == [n_users - 1]  # cold user: self-loop only


# --------------------------------------------------------------------------------------------------
# faiss backends: faiss_flat is exact (continuous data: no ties), ivf is approximate with a recall bound.

@pytest.mark.parametrize("n,d,k", [(700, 16, 5), (90, 8, 10)])
def test_faiss_flat_equals_exact(n, d, k):
    rng = np.random.default_rng(n + d)
    f = rng.standard_normal((n, d)).astype(np.float32)
    exact = knn_graph(f, k, device="cpu", backend="exact")
    flat = knn_graph(f, k, device="cpu", backend="faiss_flat")
    assert torch.equal(exact.indptr, flat.indptr) and torch.equal(exact.indices, flat.indices)
    np.testing.assert_allclose(exact.values.numpy(), flat.values.numpy(), atol=1e-6)  # both exact cosines
    cols, sims = faiss_topk(f, k, backend="faiss_flat", show_progress=False)
    ref = reference_topk(dense_cosine(f), k)
    assert [sorted(c) for c in cols.tolist()] == ref
    s = dense_cosine(f)
    np.testing.assert_allclose(sims.numpy(), np.take_along_axis(s, cols.long().numpy(), 1), atol=1e-5)


def clustered(n: int, d: int, n_clusters: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d))
    return (centres[rng.integers(0, n_clusters, n)] + noise * rng.standard_normal((n, d))).astype(np.float32)


def recall_at_k(approx: torch.Tensor, exact: list[list[int]]) -> float:
    hits = sum(len(set(a) & set(e)) for a, e in zip(approx.tolist(), exact))
    return hits / sum(len(e) for e in exact)


def test_ivf_recall_on_clustered_input():
    """4,000 points around 40 centres: IVF (nlist 64, nprobe 8) must find >= 90% of the exact top-10;
    nprobe = nlist scans every list and is exact."""
    f = clustered(4000, 16, 40, 0.5, seed=1)
    k = 10
    exact = reference_topk(dense_cosine(f), k)
    cols, _ = faiss_topk(f, k, backend="ivf", ivf=IVFParams(nlist=64, nprobe=8), show_progress=False)
    assert recall_at_k(cols, exact) >= 0.9
    full, _ = faiss_topk(f, k, backend="ivf", ivf=IVFParams(nlist=64, nprobe=64), show_progress=False)
    assert recall_at_k(full, exact) >= 0.999
    worse, _ = faiss_topk(f, k, backend="ivf", ivf=IVFParams(nlist=64, nprobe=1), show_progress=False)
    assert recall_at_k(worse, exact) < recall_at_k(full, exact)


@pytest.mark.parametrize("quantizer,codec", [("hnsw", "Flat"), ("flat", "SQfp16")])
def test_ivf_variants_recall_and_graph_contract(quantizer, codec):
    f = clustered(3000, 16, 30, 0.5, seed=2)
    k = 8
    ivf = IVFParams(nlist=48, nprobe=8, quantizer=quantizer, codec=codec)
    g = knn_graph(f, k, device="cpu", backend="ivf", ivf=ivf)
    s = dense_cosine(f)
    rows = np.repeat(np.arange(3000), g.degrees().numpy())
    cols = g.indices.numpy()
    assert (rows == cols).sum() == 3000  # one self-loop each
    assert np.array_equal(np.sort(rows * 3000 + cols), np.sort(cols * 3000 + rows))  # symmetric edge set
    # values are the cosines (to float32 rounding for Flat storage, fp16 rounding for SQfp16) and
    # symmetric bit for bit
    np.testing.assert_allclose(g.values.numpy(), np.where(rows == cols, 1.0, s[rows, cols]),
                               atol=1e-5 if codec == "Flat" else 2e-3)
    dense = np.full((3000, 3000), np.nan, np.float32)
    dense[rows, cols] = g.values.numpy()
    np.testing.assert_array_equal(dense, dense.T)
    out_deg = np.bincount(rows, minlength=3000)
    assert (out_deg >= k + 1).all()
    nbr, _ = faiss_topk(f, k, backend="ivf", ivf=ivf, show_progress=False)
    assert recall_at_k(nbr, reference_topk(s, k)) >= 0.9


def test_auto_backend_and_bad_names():
    assert resolve_backend("auto", 1000, exact_max_rows=1000) == "exact"
    assert resolve_backend("auto", 1001, exact_max_rows=1000) == "ivf"
    with pytest.raises(ValueError, match="knn_backend"):
        resolve_backend("annoy", 10)
    f = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="quantizer"):
        knn_graph(f, 3, backend="ivf", ivf=IVFParams(quantizer="pq"))


def test_faiss_paths_report_bad_rows_and_zero_rows(caplog):
    f = np.random.default_rng(4).standard_normal((200, 6)).astype(np.float32)
    f[150, 2] = np.inf
    with pytest.raises(ValueError, match="row 150"):
        knn_graph(f, 3, backend="faiss_flat")
    f[150] = 0
    g = knn_graph(f, 3, backend="faiss_flat")
    assert "1 of 200 feature rows are all zero" in caplog.text
    assert torch.isfinite(g.values).all()


def test_knn_options_resolve_backend_and_cache_key():
    from goat_dist.config import GraphConfig
    from goat_dist.graph import knn_options
    from goat_dist.graph.cache import cache_path

    cfg = GraphConfig(knn_backend="auto", knn_exact_max_rows=100, knn_nprobe=3, knn_ivf_quantizer="hnsw")
    kw, key = knn_options(cfg, 100)
    assert kw["backend"] == "exact" and key == {}  # exact keeps the pre-backend cache key
    kw, key = knn_options(cfg, 100_000)
    assert kw["backend"] == "ivf" and kw["ivf"].nprobe == 3 and kw["ivf"].quantizer == "hnsw"
    assert key["backend"] == "ivf" and key["nlist"] == round(4 * 100_000 ** 0.5) and key["nprobe"] == 3
    assert knn_options(cfg, 1000)[1]["nlist"] == 1000 // 8  # capped: at least 8 rows per list
    _, flat_key = knn_options(GraphConfig(knn_backend="faiss_flat"), 1000)
    paths = {str(cache_path("c", "item_knn", {"k": 5, **k})) for k in ({}, key, flat_key)}
    assert len(paths) == 3
