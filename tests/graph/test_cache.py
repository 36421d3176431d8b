"""The on-disk graph cache: hits are identical, changed inputs/parameters rebuild, broken entries
are never used."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from goat_dist.config import GraphConfig
from goat_dist.data.dataset import Interactions, RecDataset
from goat_dist.graph import CSR, build_graphs, cached, content_hash, knn_graph
from goat_dist.graph.cache import cache_path


class Counter:
    """A build function that counts its calls."""

    def __init__(self, features: np.ndarray, k: int):
        self.features, self.k, self.calls = features, k, 0

    def __call__(self) -> CSR:
        self.calls += 1
        return knn_graph(self.features, self.k, device="cpu")


def same(a: CSR, b: CSR) -> bool:
    return (a.n_cols == b.n_cols and torch.equal(a.indptr, b.indptr) and torch.equal(a.indices, b.indices)
            and torch.equal(a.values, b.values))


@pytest.fixture
def feats():
    return np.random.default_rng(0).standard_normal((80, 6)).astype(np.float32)


def test_hit_returns_identical_arrays(tmp_path, feats, caplog):
    build = Counter(feats, 4)
    with caplog.at_level(logging.INFO, logger="goat_dist"):
        first = cached(tmp_path, "item_knn", {"features": feats, "k": 4}, build)
        second = cached(tmp_path, "item_knn", {"features": feats.copy(), "k": 4}, build)
    assert build.calls == 1
    assert same(first, second) and same(second, build())
    assert "graph cache miss" in caplog.text and "graph cache hit" in caplog.text
    assert not list((tmp_path / "item_knn").glob(".tmp-*"))  # the temporary directory was renamed away


def test_changed_feature_value_or_k_rebuilds(tmp_path, feats):
    build = Counter(feats, 4)
    cached(tmp_path, "item_knn", {"features": feats, "k": 4}, build)
    changed = feats.copy()
    changed[17, 3] += 1e-3
    build_changed = Counter(changed, 4)
    out = cached(tmp_path, "item_knn", {"features": changed, "k": 4}, build_changed)
    assert build_changed.calls == 1 and same(out, build_changed())
    build_k = Counter(feats, 5)
    out = cached(tmp_path, "item_knn", {"features": feats, "k": 5}, build_k)
    assert build_k.calls == 1 and (out.degrees() >= 6).all()
    assert len(list((tmp_path / "item_knn").iterdir())) == 3


def test_memmap_hashes_like_its_content(tmp_path, feats):
    np.save(tmp_path / "f.npy", feats.astype(np.float16))
    mm = np.load(tmp_path / "f.npy", mmap_mode="r")
    assert content_hash(mm) == content_hash(feats.astype(np.float16))
    assert content_hash(mm) != content_hash(feats)  # dtype is part of the key
    assert content_hash(feats, 4) != content_hash(feats, 5)


@pytest.mark.parametrize("damage", ["truncate_indices", "drop_meta", "bad_meta", "drop_values"])
def test_partial_or_stale_entry_is_rebuilt(tmp_path, feats, damage):
    key = {"features": feats, "k": 4}
    build = Counter(feats, 4)
    good = cached(tmp_path, "item_knn", key, build)
    entry = cache_path(tmp_path, "item_knn", key)
    if damage == "truncate_indices":
        data = (entry / "indices.npy").read_bytes()
        (entry / "indices.npy").unlink()  # a new inode: ``good`` keeps its mapping of the old file
        (entry / "indices.npy").write_bytes(data[:len(data) // 2])
    elif damage == "drop_meta":
        (entry / "meta.json").unlink()
    elif damage == "bad_meta":
        (entry / "meta.json").write_text('{"version": "graph-cache-0"}')
    else:
        (entry / "values.npy").unlink()
    out = cached(tmp_path, "item_knn", key, build)
    assert build.calls == 2 and same(out, good)
    assert cached(tmp_path, "item_knn", key, build) is not None and build.calls == 2  # repaired


def test_build_graphs_through_the_cache(tmp_path):
    rng = np.random.default_rng(1)
    n_users, n_items = 30, 20
    users, items = rng.integers(0, n_users, 120).astype(np.int32), rng.integers(0, n_items, 120).astype(np.int32)
    ds = RecDataset(n_users, n_items, {"train": Interactions(users, items)},
                    item_features={"image": rng.standard_normal((n_items, 5)).astype(np.float16),
                                   "text": rng.standard_normal((n_items, 3)).astype(np.float32)})
    cfg = GraphConfig(item_knn_k=3, user_knn_k=2, cache_dir=str(tmp_path), device="cpu")
    g = build_graphs(ds, cfg, ["image", "text"], use_user_branch=True)
    assert g.ui.n_users == n_users and g.ui.nnz == len(set(zip(users.tolist(), items.tolist())))
    assert set(g.item_item) == {"image", "text"} and g.item_item["text"].n_rows == n_items
    assert g.user_user is not None and g.user_user.n_rows == n_users  # co-interaction (no user features)
    assert len(g.relations()) == 5
    again = build_graphs(ds, cfg, ["image", "text"], use_user_branch=True)
    assert same(again.ui.user_items, g.ui.user_items) and same(again.ui.item_users, g.ui.item_users)
    assert same(again.item_item["image"], g.item_item["image"]) and same(again.user_user, g.user_user)
    assert torch.equal(again.ui.item_degree, g.ui.item_degree)

    ds.user_features["profile"] = rng.standard_normal((n_users, 4)).astype(np.float32)
    with_emb = build_graphs(ds, cfg, ["text"], use_user_branch=True)
    assert same(with_emb.user_user, knn_graph(ds.user_features["profile"], 2, device="cpu"))
    assert build_graphs(ds, cfg, [], use_user_branch=False).user_user is None
    with pytest.raises(KeyError, match="audio"):
        build_graphs(ds, cfg, ["audio"], use_user_branch=False)
